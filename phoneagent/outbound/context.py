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
