"""Playback accounting for one call: what the agent sent, what the caller heard, barge-ins. No
I/O; the ``Call`` keeps these records up to date."""

from __future__ import annotations

from dataclasses import dataclass, field

from phoneagent.audio import ULAW_BYTES_PER_MS
from phoneagent.transcript import Turn


@dataclass
class AgentItem:
    """Playback accounting for one assistant item: what was sent to Twilio, what was heard."""

    item_id: str
    response_id: str
    turn: Turn
    sent_bytes: int = 0  # μ-law: 8 bytes per ms
    played_ms: int = 0

    @property
    def sent_ms(self) -> int:
        return self.sent_bytes // ULAW_BYTES_PER_MS


@dataclass
class BargeInCandidate:
    """The model heard the caller start speaking over the agent; is it a real interruption?"""

    caller_item_id: str
    loud_ms: int = 0  # caller audio above the persona's energy threshold since then


@dataclass
class CallStats:
    started_at: float
    first_audio_at: float | None = None  # first agent frame sent to Twilio
    barge_ins: int = 0
    barge_ins_ignored: int = 0  # short speech under the persona's guard: the agent went on
    barge_in_reaction_s: list[float] = field(default_factory=list)  # decision → `clear` sent
    discarded_ms: int = 0  # agent audio sent or generated but never heard

    def as_dict(self) -> dict:
        first = self.first_audio_at
        return {
            "first_agent_audio_ms": None
            if first is None
            else round((first - self.started_at) * 1000),
            "barge_ins": self.barge_ins,
            "barge_ins_ignored": self.barge_ins_ignored,
            "barge_in_reaction_ms": [round(s * 1000, 3) for s in self.barge_in_reaction_s],
            "discarded_agent_ms": self.discarded_ms,
        }
