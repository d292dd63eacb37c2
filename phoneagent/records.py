"""What this instance knows about recent calls, by CallSid.

The voice webhook opens a record, the media stream and Twilio's status callbacks add to it, and
the call's end writes the transcript. It is the source of ``GET /calls/{sid}`` and of the
events delivered to the business's webhook. Bounded: the oldest records are forgotten.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

RECORDS_KEPT = 1000


@dataclass
class CallRecord:
    call_sid: str
    persona: str = ""
    model_session: str = ""  # the model's session id: StepFun support asks for it
    caller: str = ""  # Twilio's From
    called: str = ""  # Twilio's To: the business's line
    status: str = "ringing"  # the latest CallStatus Twilio reported, or our own view
    started_at: float | None = None  # Unix time the media stream started
    ended_at: float | None = None
    end_reason: str | None = None
    transfer: dict | None = None  # {"target", "number"} once Twilio took a transfer
    transcript: list[dict] = field(default_factory=list)  # finished turns, final once ended
    twilio_events: list[dict] = field(default_factory=list)  # status callbacks, as received
    stats: dict = field(default_factory=dict)  # barge-ins, reaction times, first audio (at end)

    def as_dict(self) -> dict:
        return asdict(self)


class CallRecords:
    def __init__(self, limit: int = RECORDS_KEPT):
        self.limit = limit
        self._records: OrderedDict[str, CallRecord] = OrderedDict()

    def open(self, call_sid: str) -> CallRecord:
        """The record of ``call_sid``, created if this instance has not seen the call yet (the
        webhook and the stream may reach different instances)."""
        record = self._records.get(call_sid)
        if record is None:
            record = self._records[call_sid] = CallRecord(call_sid)
            while len(self._records) > self.limit:
                self._records.popitem(last=False)
        return record

    def get(self, call_sid: str) -> CallRecord | None:
        return self._records.get(call_sid)

    def ended(self) -> list[CallRecord]:
        return [r for r in self._records.values() if r.ended_at is not None]

    def mark_started(self, call_sid: str) -> CallRecord:
        record = self.open(call_sid)
        record.started_at = time.time()
        record.status = "in-progress"
        return record
