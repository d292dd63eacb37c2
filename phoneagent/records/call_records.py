"""What the server knows about calls, by CallSid: this instance's view, and the shared store.

The voice webhook opens a record, the media stream and Twilio's status callbacks add to it, and
the call's end writes the transcript. It is the source of ``GET /calls/{sid}``, of the context
a call coming back from a transfer resumes with, and of the events delivered to the business's
webhook.

Every change is made at once to this instance's view (memory, read without awaiting by the
call path) and, with a shared store (PostgreSQL), written there too: in the background, in the
order the call made its changes, retried while the database is away (the instance reports
itself unready meanwhile) so nothing is lost when it returns; a change the database refuses
for good (a value it cannot store: :class:`~phoneagent.delivery.outbox.OutboxRefused`) is
given up, logged and counted, and the call's later changes go on. Reads that must see what
other instances wrote (:meth:`CallRecords.fetch`, :meth:`CallRecords.live`,
:meth:`CallRecords.search`) go to the shared store (``fetch`` once this instance's own writes
of the call are in), and fall back to this instance's view if the database is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from phoneagent.delivery.outbox import OutboxError, OutboxRefused
from phoneagent.delivery.policy import RETENTION
from phoneagent.logs import get_logger
from phoneagent.records.memory import RECORDS_KEPT, MemoryCallRecords
from phoneagent.records.record import CallRecord, Change
from phoneagent.records.store import CallRecordStore

log = get_logger(__name__)

RETRY_FIRST, RETRY_MAX = 0.25, 5.0  # seconds between attempts at a write the database refused
MAX_PENDING = 10_000  # changes waiting for the database; past it, new ones are not shared
OWN_WRITES_WAIT = 1.0  # seconds a read waits for this instance's writes of the call
PURGE_EVERY = 3600.0  # seconds between purges of old records in the shared store
# A call not ended whose record has not changed for this long is not live: its instance died
# mid-call (a killed pod's calls are never ended). Live calls change at every finished turn,
# and a quiet caller is asked whether they are still there (silence_timeout_seconds), so an
# hour without a change leaves a wide margin for the quietest call.
LIVE_QUIET_SECONDS = 3600.0


@dataclass
class _CallWrites:
    """One call's writes on their way: one after the other (asyncio's locks are first come,
    first served, and the tasks take it in the order they were made)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    queued: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)


class CallRecords:
    def __init__(
        self,
        shared: CallRecordStore | None = None,
        *,
        limit: int = RECORDS_KEPT,
        retention: float = RETENTION,  # as delivered events
        clock: Callable[[], float] = time.time,
        on_unshared: Callable[[], None] | None = None,
    ) -> None:
        self.local = MemoryCallRecords(limit)
        self.shared = shared
        self.retention = retention
        self._clock = clock
        self._on_unshared = on_unshared  # a change given up: the metrics count it
        self._queues: dict[str, _CallWrites] = {}  # calls with writes not yet in the store
        self._writes: set[asyncio.Task[None]] = set()
        self._failing: str | None = None
        self._next_purge = 0.0
        self.read_problem: str | None = None  # why the last shared read fell back to this view

    # --- this instance's view (no await) ----------------------------------------------------

    def get(self, call_sid: str) -> CallRecord | None:
        return self.local.get_now(call_sid)

    def open(self, call_sid: str) -> CallRecord:
        return self.local.open(call_sid)

    def ended(self) -> list[CallRecord]:
        return self.local.ended()

    def note(self, call_sid: str, change: Change) -> CallRecord:
        """Make ``change`` to the call's record: here at once, in the shared store soon."""
        now = self._clock()
        record = self.local.apply_now(call_sid, change, at=now)
        if self.shared is not None:
            if self.pending >= MAX_PENDING:
                log.error("call_record_not_shared", call_sid=call_sid, reason="too many pending",
                          change=type(change).__name__)  # fmt: skip
                if self._on_unshared is not None:
                    self._on_unshared()
            else:
                queue = self._queues.setdefault(call_sid, _CallWrites())
                queue.queued += 1
                task = asyncio.create_task(self._write(queue, call_sid, change, now))
                self._writes.add(task)
                task.add_done_callback(self._writes.discard)
        return record

    async def written(self, call_sid: str, timeout: float = OWN_WRITES_WAIT) -> bool:
        """Wait (at most ``timeout`` seconds) until this instance's changes to the call are in
        the shared store, so another instance reads them: True once they are (or there is no
        shared store), False when they are still on their way. No wait while the store refuses
        writes: a database that is away holds no call."""
        queue = self._queues.get(call_sid)
        if queue is not None and self._failing is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await queue.drained.wait()
        return call_sid not in self._queues

    # --- what every instance sees -------------------------------------------------------------

    async def fetch(self, call_sid: str) -> CallRecord | None:
        """The call's record as the shared store has it (this instance's writes of it in first),
        else as this instance knows it."""
        if self.shared is None:
            return self.local.get_now(call_sid)
        await self.written(call_sid)
        try:
            shared = await self.shared.get(call_sid)
        except OutboxError as exc:
            log.warning("call_record_read_local", call_sid=call_sid, error=str(exc))
            return self.local.get_now(call_sid)
        return shared if shared is not None else self.local.get_now(call_sid)

    async def live(self, limit: int = 100) -> list[CallRecord]:
        """Calls in progress: on every instance with a shared store, else on this one."""
        since = self._clock() - LIVE_QUIET_SECONDS
        if self.shared is not None:
            try:
                found = await self.shared.live(limit, updated_since=since)
            except OutboxError as exc:
                self._read_failed("live", exc)
            else:
                self.read_problem = None
                return found
        return await self.local.live(limit, updated_since=since)

    async def search(
        self,
        number: str | None = None,
        persona: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
    ) -> list[CallRecord]:
        """Recent calls, newest first (see ``CallRecordStore.search``): every instance's with a
        shared store, else (or while the database is away) this instance's."""
        query = {"number": number, "persona": persona, "since": since, "until": until}
        if self.shared is not None:
            try:
                found = await self.shared.search(**query, limit=limit)
            except OutboxError as exc:
                self._read_failed("search", exc)
            else:
                self.read_problem = None
                return found
        return await self.local.search(**query, limit=limit)

    def _read_failed(self, what: str, exc: OutboxError) -> None:
        log.warning("call_records_read_local", read=what, error=str(exc))
        self.read_problem = (
            f"the shared database cannot be read ({exc}): this instance's calls only"
        )

    @property
    def problem(self) -> str | None:
        """Why call records cannot reach the shared store now (readiness); None when they can."""
        return self._failing

    @property
    def pending(self) -> int:
        """Changes not yet in the shared store."""
        return sum(queue.queued for queue in self._queues.values())

    async def close(self, timeout: float) -> None:
        """Give pending writes ``timeout`` seconds to land; what is left is logged, not kept."""
        if not self._writes:
            return
        _, left = await asyncio.wait(set(self._writes), timeout=timeout)
        for task in left:
            task.cancel()
        if left:
            log.error("call_records_not_shared", pending=len(left))
        await asyncio.gather(*left, return_exceptions=True)

    async def _write(self, queue: _CallWrites, call_sid: str, change: Change, at: float) -> None:
        assert self.shared is not None
        delay = RETRY_FIRST
        try:
            async with queue.lock:
                while True:
                    try:
                        await self.shared.write(call_sid, change, at=at)
                        break
                    except OutboxRefused as exc:
                        # Refused for good (a value the database cannot store): retrying would
                        # hold the call's later changes behind it for ever. The reason names the
                        # kind of error, never the change's values.
                        self._given_up(call_sid, change, exc.reason)
                        break  # the database answered: not a reason to be unready
                    except OutboxError as exc:
                        if self._failing is None:
                            log.error("call_record_write_failed", call_sid=call_sid, error=str(exc))
                        self._failing = f"call records cannot be written: {exc}"
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, RETRY_MAX)
                    except Exception as exc:
                        # A bug of ours (a change the store cannot even build a statement for):
                        # given up the same way, not left in a task nobody awaits.
                        self._given_up(call_sid, change, type(exc).__name__, exc_info=True)
                        break
                if self._failing is not None:
                    log.info("call_record_writes_resumed")
                    self._failing = None
        finally:
            queue.queued -= 1
            if not queue.queued:  # the call's last pending write
                queue.drained.set()
                del self._queues[call_sid]
        await self._purge_now_and_then()

    def _given_up(self, call_sid: str, change: Change, reason: str, exc_info: bool = False) -> None:
        log.error("call_record_not_shared", call_sid=call_sid, reason=reason,
                  change=type(change).__name__, exc_info=exc_info)  # fmt: skip
        if self._on_unshared is not None:
            self._on_unshared()

    async def _purge_now_and_then(self) -> None:
        assert self.shared is not None
        now = self._clock()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_EVERY
        with contextlib.suppress(OutboxError):
            removed = await self.shared.purge(before=now - self.retention)
            if removed:
                log.info("call_records_purged", records=removed)
