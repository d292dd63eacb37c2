"""The transcript of a call: its turns, each with the text the other side heard. No I/O."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from phoneagent.call.text_units import cut_units, unit_count


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
    """Keep what the caller heard: the words, or the characters of a script written without
    spaces (``text_units``), in the same proportion as the audio heard. The transcript has no
    timings, so this is good to a unit or two at speaking pace."""
    units = unit_count(turn.text)
    if sent_ms > 0 and units:
        turn.text = cut_units(turn.text, round(units * min(heard_ms, sent_ms) / sent_ms))
    turn.interrupted = True


class Transcript:
    """The turns of one call as they happen; the caller's by the model's item id."""

    def __init__(self) -> None:
        self.turns: list[Turn] = []
        self._caller: dict[str, Turn] = {}
        # The caller's utterance under way (speech_started, no speech_stopped yet): its item.
        self.speaking: str | None = None

    def caller_turn(self, item_id: str, now_ms: int) -> Turn:
        turn = self._caller.get(item_id)
        if turn is None:
            turn = self._caller[item_id] = Turn("caller", item_id, now_ms, now_ms)
            self.turns.append(turn)
        return turn

    def keypad_turn(self, digits: str, now_ms: int) -> None:
        self.caller_turn(f"keypad-{len(self._caller)}", now_ms).text = f"[keypad: {digits}]"

    def agent_turn(self, item_id: str, now_ms: int) -> Turn:
        turn = Turn(role="agent", item_id=item_id, start_ms=now_ms, end_ms=now_ms)
        self.turns.append(turn)
        return turn

    def as_dicts(self) -> list[dict]:
        return transcript_of(self.turns)
