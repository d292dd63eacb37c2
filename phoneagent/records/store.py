"""The interface of a call-record store: in memory (``memory.MemoryCallRecords``), or in the
PostgreSQL database every instance shares (``postgres.PostgresCallRecords``)."""

from __future__ import annotations

from typing import Protocol

from phoneagent.records.record import CallRecord, Change


class CallRecordStore(Protocol):
    async def write(self, call_sid: str, change: Change, *, at: float) -> None:
        """Make ``change`` to the record of ``call_sid`` (created if new); ``at`` is when, for
        retention. Raises ``OutboxError`` when a database cannot be reached."""
        ...

    async def get(self, call_sid: str) -> CallRecord | None: ...

    async def purge(self, *, before: float) -> int:
        """Forget the records last changed before ``before``; how many."""
        ...
