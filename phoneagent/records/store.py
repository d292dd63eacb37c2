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

    async def live(self, limit: int = 100, *, updated_since: float) -> list[CallRecord]:
        """Calls in progress: a stream started (``started_at`` set), not ended, and changed at
        or after ``updated_since`` (a call whose instance died mid-call is never ended: it
        drops out once it has been quiet that long). Latest started first, at most ``limit``."""
        ...

    async def search(
        self,
        number: str | None = None,
        persona: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
    ) -> list[CallRecord]:
        """Recent calls, newest first, at most ``limit``: ``number`` within the caller's or the
        called number, ``persona`` by id, and the call's time (when its stream started, else
        when its record last changed) in [``since``, ``until``)."""
        ...
