"""Call records in this instance's memory: the embedded default, and every instance's own view
of the calls it touches. Bounded: the oldest records are forgotten."""

from __future__ import annotations

import copy
from collections import OrderedDict

from phoneagent.records.record import CallRecord, Change, apply

RECORDS_KEPT = 1000


class MemoryCallRecords:
    """:class:`~phoneagent.records.store.CallRecordStore` in memory. The synchronous methods
    are this instance's view, changed in place with no await between a read and a write."""

    def __init__(self, limit: int = RECORDS_KEPT):
        self.limit = limit
        self._records: OrderedDict[str, CallRecord] = OrderedDict()
        self._updated: dict[str, float] = {}

    def open(self, call_sid: str) -> CallRecord:
        """The record of ``call_sid``, created if this instance has not seen the call yet (the
        webhook and the stream may reach different instances)."""
        record = self._records.get(call_sid)
        if record is None:
            record = self._records[call_sid] = CallRecord(call_sid)
            while len(self._records) > self.limit:
                forgotten, _ = self._records.popitem(last=False)
                self._updated.pop(forgotten, None)
        return record

    def get_now(self, call_sid: str) -> CallRecord | None:
        return self._records.get(call_sid)

    def apply_now(self, call_sid: str, change: Change, *, at: float) -> CallRecord:
        record = self.open(call_sid)
        apply(record, change)
        self._updated[call_sid] = at
        return record

    def ended(self) -> list[CallRecord]:
        return [r for r in self._records.values() if r.ended_at is not None]

    # --- the store interface ----------------------------------------------------------------

    async def write(self, call_sid: str, change: Change, *, at: float) -> None:
        self.apply_now(call_sid, change, at=at)

    async def get(self, call_sid: str) -> CallRecord | None:
        record = self._records.get(call_sid)
        return copy.deepcopy(record) if record is not None else None

    async def purge(self, *, before: float) -> int:
        old = [sid for sid, at in self._updated.items() if at < before]
        for call_sid in old:
            self._records.pop(call_sid, None)
            del self._updated[call_sid]
        return len(old)

    async def live(self, limit: int = 100, *, updated_since: float) -> list[CallRecord]:
        found = [
            record
            for sid, record in self._records.items()
            if record.started_at is not None
            and record.ended_at is None
            and self._updated.get(sid, 0.0) >= updated_since
        ]
        found.sort(key=lambda r: (r.started_at, r.call_sid), reverse=True)
        return [copy.deepcopy(record) for record in found[:limit]]

    async def search(
        self,
        number: str | None = None,
        persona: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
    ) -> list[CallRecord]:
        found = []
        for sid, record in self._records.items():
            when = self._time_of(sid, record)
            if number and number not in record.caller and number not in record.called:
                continue
            if persona and record.persona != persona:
                continue
            if (since is not None and when < since) or (until is not None and when >= until):
                continue
            found.append((when, sid, record))
        found.sort(key=lambda found: found[:2], reverse=True)
        return [copy.deepcopy(record) for _, _, record in found[:limit]]

    def _time_of(self, call_sid: str, record: CallRecord) -> float:
        """When a call happened, for searches: its stream's start, else its last change (a call
        that never reached the agent: busy, the model away)."""
        if record.started_at is not None:
            return record.started_at
        return self._updated.get(call_sid, 0.0)
