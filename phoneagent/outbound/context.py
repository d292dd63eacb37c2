"""What a call record says about a call a persona placed. The call's context (direction
"outbound", its variables and metadata: ``call.context.CallContext``) is written into the
record when the dialer places the call, so the instance Twilio asks when the callee answers —
any instance, with a shared database — finds it; Twilio's answer to the Calls create is the
first of its ``twilio_events`` (``PLACED``). No I/O here.
"""

from __future__ import annotations

from phoneagent.call.context import OUTBOUND
from phoneagent.records import CallRecord

#: The ``path`` of the record's entry for a call we placed (not a URL Twilio requested).
PLACED = "outbound:placed"
#: Where Twilio asks about a placed call: when the callee answers, and as the call progresses.
ANSWER_PATH = "/twilio/outbound/answer"
STATUS_PATH = "/twilio/outbound/status"


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
    if record.direction == OUTBOUND:
        return record.persona == persona_id
    events = record.twilio_events
    return (
        record.started_at is None
        and record.persona in ("", persona_id)
        and bool(events)
        and all(entry.get("path") == STATUS_PATH for entry in events)
    )


def is_outbound(record: CallRecord) -> bool:
    """A call a persona placed: recorded so, or reported by Twilio at our outbound URLs."""
    paths = (PLACED, ANSWER_PATH, STATUS_PATH)
    return record.direction == OUTBOUND or any(
        entry.get("path") in paths for entry in record.twilio_events
    )


def business_line(record: CallRecord) -> str:
    """The persona's own number on the call: the number called for an inbound call, the caller
    ID for one it placed (a transfer shows it to the target; Twilio takes no other)."""
    return record.caller if is_outbound(record) else record.called
