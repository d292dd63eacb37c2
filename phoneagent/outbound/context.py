"""What travels with a placed call from the dialer to its media stream: the persona, that it is
outbound, and the caller's ``variables`` and ``metadata`` (plain values; per-call context for
inbound and outbound calls will replace this carrier).

It is kept in the call record, as the first entry of ``twilio_events`` (what Twilio answered to
the Calls create, with our own fields), so the instance Twilio asks when the callee answers —
any instance, with a shared database — finds it. No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from phoneagent.records import CallRecord

OUTBOUND = "outbound"
#: The ``path`` of the record's entry for a call we placed (not a URL Twilio requested).
PLACED = "outbound:placed"
#: Where Twilio asks about a placed call: when the callee answers, and as the call progresses.
ANSWER_PATH = "/twilio/outbound/answer"
STATUS_PATH = "/twilio/outbound/status"


@dataclass(frozen=True)
class OutboundContext:
    persona: str
    to: str
    from_: str
    variables: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    direction: str = OUTBOUND

    def placed_entry(self, call_status: str) -> dict[str, Any]:
        """The record's entry for the placed call (``TwilioReported``)."""
        return {
            "path": PLACED,
            "CallStatus": call_status,
            "direction": self.direction,
            "persona": self.persona,
            "to": self.to,
            "from": self.from_,
            "variables": dict(self.variables),
            "metadata": dict(self.metadata),
        }


def placed_context(record: CallRecord | None) -> OutboundContext | None:
    """The context of a call we placed, from its record; None for any other call."""
    if record is None:
        return None
    for entry in record.twilio_events:
        if entry.get("path") == PLACED:
            return OutboundContext(
                persona=str(entry.get("persona", "")),
                to=str(entry.get("to", "")),
                from_=str(entry.get("from", "")),
                variables=dict(entry.get("variables") or {}),
                metadata=dict(entry.get("metadata") or {}),
            )
    return None


def answered_by(record: CallRecord | None) -> str:
    """Who Twilio's answering machine detection said answered (``AnsweredBy``), or ""."""
    if record is None:
        return ""
    for entry in reversed(record.twilio_events):
        if entry.get("AnsweredBy"):
            return str(entry["AnsweredBy"])
    return ""


def placed_for(record: CallRecord | None, persona_id: str) -> bool:
    """Whether Twilio's answer request for ``persona_id`` is about a call placed for it: its
    record says so, or there is none (placed by another process without a shared database:
    the persona comes from the answer URL, which Twilio signed), or it holds only Twilio's
    progress callbacks of a placed call. An inbound call's record, or another persona's
    placement, is not."""
    if record is None:
        return True
    context = placed_context(record)
    if context is not None:
        return context.persona == persona_id
    events = record.twilio_events
    return (
        record.started_at is None
        and record.persona in ("", persona_id)
        and bool(events)
        and all(entry.get("path") == STATUS_PATH for entry in events)
    )


def is_outbound(record: CallRecord) -> bool:
    """A call a persona placed: recorded so, or reported by Twilio at our outbound URLs."""
    return any(entry.get("path") in (PLACED, ANSWER_PATH, STATUS_PATH)
               for entry in record.twilio_events)  # fmt: skip


def business_line(record: CallRecord) -> str:
    """The persona's own number on the call: the number called for an inbound call, the caller
    ID for one it placed (a transfer shows it to the target; Twilio takes no other)."""
    return record.caller if is_outbound(record) else record.called
