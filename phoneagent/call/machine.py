"""What every machine of a call shares: a state enum, a transition table, and one log line for
an event its state does not expect. No I/O.

Each machine writes its rules as ``TRANSITIONS = {(state, event_kind): next_state}``, so the
whole machine reads in one place (as in h11's ``_state.py``). An event not in the table leaves
the state as it was and is logged once per machine and kind for the call: a misbehaving peer
shows in the log, without a line per 20 ms frame.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, TypeVar

from phoneagent.logs import get_logger

log = get_logger(__name__)

S = TypeVar("S", bound=enum.Enum)


class Unexpected:
    """The unexpected events of one call, each logged the first time only."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def note(self, machine: str, state: enum.Enum, kind: str) -> None:
        if (machine, kind) in self.seen:
            return
        self.seen.add((machine, kind))
        log.warning("unexpected_event", machine=machine, state=state.value, kind=kind)


class Machine(Generic[S]):
    TRANSITIONS: ClassVar[Mapping[tuple[Any, str], Any]]

    def __init__(self, initial: S, unexpected: Unexpected) -> None:
        self.state: S = initial
        self._unexpected = unexpected

    def _fire(self, kind: str) -> bool:
        """Take the transition for *kind*; False (and a log line, once) if there is none."""
        next_state = self.TRANSITIONS.get((self.state, kind))
        if next_state is None:
            self._unexpected.note(type(self).__name__, self.state, kind)
            return False
        self.state = self._resolve(next_state)
        return True

    def _resolve(self, next_state: Any) -> S:
        """A table entry that is not a state itself (see ModelResponse.SETTLES)."""
        return next_state
