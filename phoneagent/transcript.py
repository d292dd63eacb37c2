"""The transcript of a call: its turns, each with the text the other side heard. No I/O."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class Turn:
    role: str  # "caller" or "agent"
    item_id: str
    start_ms: int  # since the call started
    end_ms: int
    text: str = ""
    interrupted: bool = False  # the caller talked over this agent turn; text is what was heard

    def as_dict(self) -> dict:
        return {
            "role": self.role,
            "text": self.text,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "interrupted": self.interrupted,
        }


def transcript_of(turns: Iterable[Turn]) -> list[dict]:
    """Turns in the order they started, each with the text the other side heard."""
    ordered = sorted(turns, key=lambda t: (t.start_ms, t.role != "caller"))
    return [t.as_dict() for t in ordered if t.text or t.role == "agent"]


def cut_turn(turn: Turn, heard_ms: int, sent_ms: int) -> None:
    """Keep the words the caller heard. The transcript has no word timings, so the cut is
    proportional to the audio heard: good to a word or two at speaking pace."""
    words = turn.text.split()
    if sent_ms > 0 and words:
        keep = round(len(words) * heard_ms / sent_ms)
        turn.text = " ".join(words[:keep])
    turn.interrupted = True
