"""Watchers: the rules that fire because time passed, not because something was said. No I/O.

They are driven by one event, ``Tick``: the shell sends one on a timer, and the ``Call`` sends
one for each caller frame (Twilio's media timestamp is the stream clock). Two clocks, each for a
reason: the time limit, silence and keypad entries run on the stream's own clock (Twilio's
timestamps, so they are deterministic and follow the call, not the server's scheduling); the
nudge and the session renewal run on the injected monotonic clock (they are about the model,
which has no stream time).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from phoneagent.call.machine import Machine, Unexpected
from phoneagent.logs import get_logger

log = get_logger(__name__)

# Before max_call_seconds runs out, the model is told to wrap up this long in advance.
TIME_LIMIT_WARNING_MS = 30_000
# The caller finished a turn and the model has not started answering this long after: nudge it
# (a VAD turn end has been seen to produce no response, reference section 5).
NUDGE_SECONDS = 2.0
# Keypad digits typed within this much audio of each other reach the model as one entry.
DTMF_GAP_MS = 1200


@dataclass(frozen=True)
class Tick:
    stream_ms: int | None  # Twilio's timestamp of the caller frame just in; None: a timer tick
    now: float  # the injected monotonic clock, in seconds


class TimeLimitState(enum.Enum):
    RUNNING = "running"
    WARNED = "warned"  # the model was told to wrap up; at the limit, the goodbye


class TimeLimit(Machine[TimeLimitState]):
    """max_call_seconds, on the stream's clock: warn the model half a minute ahead, then (while
    caller and agent are talking) say goodbye and hang up."""

    TRANSITIONS: ClassVar[dict] = {
        (TimeLimitState.RUNNING, "warn"): TimeLimitState.WARNED,
        # Again after a goodbye the caller talked over: the limit still holds.
        (TimeLimitState.WARNED, "reached"): TimeLimitState.WARNED,
    }

    def __init__(self, max_call_seconds: int, unexpected: Unexpected) -> None:
        super().__init__(TimeLimitState.RUNNING, unexpected)
        self._limit_ms = max_call_seconds * 1000

    def on_tick(self, stream_ms: int, talking: bool) -> str | None:
        """ "warn", "reached" or None."""
        if self.state is TimeLimitState.RUNNING:
            if stream_ms >= self._limit_ms - TIME_LIMIT_WARNING_MS:
                self._fire("warn")
                return "warn"
            return None
        if stream_ms < self._limit_ms or not talking:
            return None
        self._fire("reached")
        return "reached"

    def seconds_left(self, stream_ms: int) -> int:
        return max(0, (self._limit_ms - stream_ms) // 1000)


class SilenceState(enum.Enum):
    LISTENING = "listening"
    ASKED = "asked"  # the caller was asked whether they are still there
    GOODBYE = "goodbye"  # still silent: the agent says goodbye


class Silence(Machine[SilenceState]):
    """A silent line (stream time): ask whether the caller is still there; later, goodbye."""

    TRANSITIONS: ClassVar[dict] = {
        (SilenceState.LISTENING, "silent"): SilenceState.ASKED,
        (SilenceState.ASKED, "silent"): SilenceState.GOODBYE,
        (SilenceState.GOODBYE, "silent"): SilenceState.GOODBYE,  # a goodbye talked over
        (SilenceState.LISTENING, "spoke"): SilenceState.LISTENING,
        (SilenceState.ASKED, "spoke"): SilenceState.LISTENING,
        (SilenceState.GOODBYE, "spoke"): SilenceState.LISTENING,
    }

    def __init__(self, timeout_seconds: int, unexpected: Unexpected) -> None:
        super().__init__(SilenceState.LISTENING, unexpected)
        self._timeout_ms = timeout_seconds * 1000
        # Stream time the line went quiet (None: something just happened; the next tick says
        # when). Twilio's timestamps are the clock, so the timeout is deterministic.
        self._quiet_since_ms: int | None = None
        self._prompts = 0

    def line_active(self) -> None:
        self._quiet_since_ms = None

    def caller_spoke(self) -> None:
        self._prompts = 0
        self._fire("spoke")

    def on_tick(self, stream_ms: int, occupied: bool) -> SilenceState | None:
        """ASKED or GOODBYE when the silence asks for it; *occupied*: the line is not silent
        (the agent speaks, a response is due or in progress, the call is being handed on)."""
        if occupied or self._quiet_since_ms is None:
            self._quiet_since_ms = stream_ms
            return None
        if not self._timeout_ms or stream_ms - self._quiet_since_ms < self._timeout_ms:
            return None
        self._quiet_since_ms = stream_ms
        self._prompts += 1
        log.info("caller_silent", prompts=self._prompts)
        self._fire("silent")
        return self.state


class NudgeState(enum.Enum):
    NOT_WAITING = "not_waiting"
    WAITING = "waiting"  # the caller's turn ended; no response has started since


class Nudge(Machine[NudgeState]):
    """A caller's turn that got no answer in NUDGE_SECONDS (monotonic clock): ask for one."""

    TRANSITIONS: ClassVar[dict] = {
        (NudgeState.NOT_WAITING, "turn_ended"): NudgeState.WAITING,
        (NudgeState.WAITING, "turn_ended"): NudgeState.WAITING,  # a second turn: from its end
        (NudgeState.WAITING, "answered"): NudgeState.NOT_WAITING,
        (NudgeState.NOT_WAITING, "answered"): NudgeState.NOT_WAITING,
        (NudgeState.WAITING, "no_answer_wanted"): NudgeState.NOT_WAITING,  # "mhm"
        (NudgeState.WAITING, "nudged"): NudgeState.NOT_WAITING,
    }

    def __init__(self, unexpected: Unexpected) -> None:
        super().__init__(NudgeState.NOT_WAITING, unexpected)
        self._since: float | None = None

    @property
    def waiting(self) -> bool:
        return self.state is NudgeState.WAITING

    def turn_ended(self, now: float) -> None:
        self._fire("turn_ended")
        self._since = now

    def answered(self) -> None:
        self._fire("answered")
        self._since = None

    def no_answer_wanted(self) -> None:
        if self.waiting:
            self._fire("no_answer_wanted")
            self._since = None

    def on_tick(self, now: float, model_idle: bool) -> bool:
        since = self._since
        if since is None or now - since < NUDGE_SECONDS or not model_idle:
            return False
        self._fire("nudged")
        self._since = None
        log.info("model_nudged", waited_s=round(now - since, 1))
        return True


class KeypadState(enum.Enum):
    EMPTY = "empty"
    TYPING = "typing"  # digits typed, not yet passed to the model


class Keypad(Machine[KeypadState]):
    """Digits typed close together reach the model as one entry (stream clock)."""

    TRANSITIONS: ClassVar[dict] = {
        (KeypadState.EMPTY, "typed"): KeypadState.TYPING,
        (KeypadState.TYPING, "typed"): KeypadState.TYPING,
        (KeypadState.TYPING, "passed"): KeypadState.EMPTY,
    }

    def __init__(self, unexpected: Unexpected) -> None:
        super().__init__(KeypadState.EMPTY, unexpected)
        self._digits = ""
        self._at_ms = 0

    def typed(self, digit: str, stream_ms: int) -> None:
        self._fire("typed")
        self._digits += digit
        self._at_ms = stream_ms

    def on_tick(self, stream_ms: int) -> str | None:
        """The digits to pass to the model, once the caller has stopped typing."""
        if self.state is not KeypadState.TYPING or stream_ms - self._at_ms < DTMF_GAP_MS:
            return None
        self._fire("passed")
        digits, self._digits = self._digits, ""
        return digits


# Caller frames (every 20 ms) drive the watchers, whose rules are in seconds: the first frame of
# each 100 ms of stream time is enough (a rule on a whole 100 ms still fires on its very frame),
# and the per-frame work is the server's hottest path (bench/README.md). A clock that moved on
# without the stream (Twilio's timestamps stalled) is watched as well.
WATCH_EVERY_MS = 100


class Cadence:
    """Which caller frames run the watchers: the first of each WATCH_EVERY_MS."""

    def __init__(self) -> None:
        self._slot = -1  # the 100 ms of stream time last watched
        self._at = float("-inf")  # the clock then

    def due(self, stream_ms: int, now: float) -> bool:
        slot = stream_ms // WATCH_EVERY_MS
        if slot == self._slot and now - self._at < WATCH_EVERY_MS / 1000:
            return False
        self._slot, self._at = slot, now
        return True
