"""Handing the call on: the agent says a sentence (a transfer announcement, the goodbye), and
only once the caller has heard it does the call change hands. No I/O.

The caller may talk over the sentence: then nothing happens and the call goes on. A sentence the
model does not say within HANDOFF_SENTENCE_DEADLINE_MS is given up on: the call is handed on
without it, so a mute model cannot hold a caller who asked for a person.
"""

from __future__ import annotations

import enum
from typing import ClassVar

from phoneagent.call.actions import EndReason
from phoneagent.call.machine import Machine, Unexpected
from phoneagent.handoff import Handoff, Transfer

# The sentence before a handoff (goodbye, transfer announcement) not said this long after it was
# asked for, and not playing: the call is handed on without it.
HANDOFF_SENTENCE_DEADLINE_MS = 8_000


class HandoffState(enum.Enum):
    NONE = "none"  # no handoff asked for: caller and agent are talking
    ANNOUNCING = "announcing"  # the sentence is asked for, or being said
    SAID = "said"  # its response is done (or given up on): hand on once the caller heard it
    TRANSFERRING = "transferring"  # Twilio was asked to dial a person: its `stop` is expected
    HANGING_UP = "hanging_up"  # Twilio was asked to end the call: its `stop` is expected


class Announcement(Machine[HandoffState]):
    TRANSITIONS: ClassVar[dict] = {
        (HandoffState.NONE, "announce"): HandoffState.ANNOUNCING,
        (HandoffState.ANNOUNCING, "said"): HandoffState.SAID,
        (HandoffState.ANNOUNCING, "deadline"): HandoffState.SAID,  # handed on without it
        (HandoffState.ANNOUNCING, "new_session"): HandoffState.ANNOUNCING,  # asked again
        (HandoffState.SAID, "heard_transfer"): HandoffState.TRANSFERRING,
        (HandoffState.SAID, "heard_hang_up"): HandoffState.HANGING_UP,
        (HandoffState.ANNOUNCING, "barge_in"): HandoffState.NONE,
        (HandoffState.SAID, "barge_in"): HandoffState.NONE,
        (HandoffState.TRANSFERRING, "transfer_failed"): HandoffState.NONE,
    }

    def __init__(self, unexpected: Unexpected) -> None:
        super().__init__(HandoffState.NONE, unexpected)
        self.handoff: Handoff | None = None
        self.response: str | None = None  # the response saying the sentence
        self._asked_at_ms = 0  # stream time the sentence was asked for
        # How a hang-up's `stop` (or the end of the stream after it) reads.
        self.hang_up_reason = EndReason.AGENT_HUNG_UP

    @property
    def announcing(self) -> bool:
        return self.state in (HandoffState.ANNOUNCING, HandoffState.SAID)

    def announce(self, handoff: Handoff, stream_ms: int) -> None:
        self._fire("announce")
        self.handoff, self.response, self._asked_at_ms = handoff, None, stream_ms

    def response_started(self, response_id: str) -> None:
        if self.state is HandoffState.ANNOUNCING and self.response is None:
            self.response = response_id

    def response_done(self, response_id: str) -> None:
        if self.state is HandoffState.ANNOUNCING and response_id == self.response:
            self._fire("said")

    def overdue(self, stream_ms: int, playing: bool) -> bool:
        return (
            self.state is HandoffState.ANNOUNCING
            and stream_ms - self._asked_at_ms >= HANDOFF_SENTENCE_DEADLINE_MS
            and not playing
        )

    def give_up_sentence(self, stream_ms: int) -> int:
        """The deadline passed: how long it waited."""
        self.response = None
        self._fire("deadline")
        return stream_ms - self._asked_at_ms

    def new_session(self) -> bool:
        """A new model session: True if it must be asked for the sentence (not said yet)."""
        if self.state is not HandoffState.ANNOUNCING:
            return False
        self._fire("new_session")
        self.response = None
        return True

    def heard(self, still_playing: bool) -> Handoff | None:
        """The sentence was said and Twilio has played it: the handoff to perform now."""
        if self.state is not HandoffState.SAID or still_playing:
            return None
        handoff, self.handoff = self.handoff, None
        assert handoff is not None
        if isinstance(handoff, Transfer):
            self._fire("heard_transfer")
            return handoff
        self._fire("heard_hang_up")
        if handoff.time_limit:
            self.hang_up_reason = EndReason.TIME_LIMIT
        elif handoff.shutdown:
            self.hang_up_reason = EndReason.DRAIN_GOODBYE
        return handoff

    def cancel(self) -> str:
        """The caller talked over the sentence: the handoff does not happen. What it was."""
        what = "transfer" if isinstance(self.handoff, Transfer) else "hang-up"
        self._fire("barge_in")
        self.handoff = None
        return what

    def transfer_failed(self) -> None:
        self._fire("transfer_failed")
