"""Events the outbox could not take, held in memory until it can.

A full disk, a data directory turned read-only or a damaged outbox must not cost the business
its events while calls go on. The publisher commits through :class:`EventSpool`: an event the
outbox refuses is kept here, in order, and retried with backoff until a commit succeeds; while
anything is held, later events queue behind it, so each call's events are committed in the order
they happened. Nothing here is durable: the spool bridges an outage the instance lives through,
and the instance reports it (``problem`` makes it unready; the metrics count it) so an operator
frees space before the bound is reached or the instance is stopped.

An event the outbox refuses for good (``OutboxRefused``: the database answered, and a value of
the event is one it cannot store) is not held: holding it would hold every later event behind
it for ever. It is logged as lost (reason ``refused``) and counted, and the next event goes on.

The bound is in bytes of event bodies (a ``call.ended`` carries the transcript: 1 to 100 KB).
When it is reached the new event is not kept: it is logged as lost (id, type, call, never the
transcript) and counted; what is already held keeps its place.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from phoneagent.delivery.events import Event
from phoneagent.delivery.outbox import OutboxError, OutboxRefused
from phoneagent.logs import get_logger

__all__ = ["DEFAULT_LIMIT_BYTES", "EventSpool"]

log = get_logger(__name__)

#: 64 MiB: about a thousand long calls' transcripts, a small share of an instance's memory.
DEFAULT_LIMIT_BYTES = 64 * 1024 * 1024
#: Retry delays: quick at first (a lock held for a moment), then every 5 s (a disk being freed:
#: cheap to try, and events reach the disk within seconds of space returning).
FIRST_RETRY, MAX_RETRY = 0.25, 5.0

Commit = Callable[[Event, str, str], Awaitable[object]]


@dataclass(frozen=True)
class _Held:
    event: Event
    url: str
    secret_env: str
    size: int


class EventSpool:
    """Commits events through ``commit(event, url, secret_env)`` (the worker's ``submit``),
    holding the ones it refuses. ``on_write_failure``/``on_lost(reason)`` feed the metrics."""

    def __init__(
        self,
        commit: Commit,
        *,
        limit_bytes: int = DEFAULT_LIMIT_BYTES,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        on_write_failure: Callable[[], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self._commit = commit
        self.limit_bytes = limit_bytes
        self._sleep = sleep
        self._on_write_failure = on_write_failure
        self._on_lost = on_lost
        self._held: deque[_Held] = deque()
        self._bytes = 0
        self._error: str | None = None
        # One commit at a time, so events reach the outbox in the order they were submitted
        # (the outbox has a single writer thread anyway: this costs no throughput).
        self._lock = asyncio.Lock()
        self._retrier: asyncio.Task[None] | None = None

    @property
    def held(self) -> int:
        """Events waiting in memory for the outbox."""
        return len(self._held)

    @property
    def problem(self) -> str | None:
        """Why events are held, for readiness; None when the outbox takes every event."""
        if not self._held:
            return None
        return f"{len(self._held)} webhook events held in memory, the outbox refuses writes: " + (
            self._error or "unknown error"
        )

    async def submit(self, event: Event, *, url: str, secret_env: str) -> None:
        """Commit ``event``, or hold it if the outbox cannot take it now. Never raises
        OutboxError: an event that cannot even be held is logged and counted as lost."""
        async with self._lock:
            item = _Held(event, url, secret_env, len(event.body()))
            if not self._held:
                try:
                    await self._commit(event, url, secret_env)
                    return
                except OutboxRefused as exc:
                    self._refused(item, exc)
                    return
                except OutboxError as exc:
                    self._failed(exc)
            self._hold(item)
        if self._held and (self._retrier is None or self._retrier.done()):
            self._retrier = asyncio.create_task(self._retry(), name="event spool retry")

    async def close(self) -> None:
        """Stop retrying after one last attempt; whatever is still held is lost, and logged."""
        if self._retrier is not None:
            self._retrier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrier
        async with self._lock:
            await self._drain()
            while self._held:
                self._lose(self._held.popleft(), "shutdown")
            self._bytes = 0

    # --- internals ------------------------------------------------------------------------

    def _failed(self, exc: OutboxError) -> None:
        self._error = str(exc)
        if self._on_write_failure is not None:
            self._on_write_failure()

    def _hold(self, item: _Held) -> None:
        if self._bytes + item.size > self.limit_bytes:
            self._lose(item, "spool_full")
            return
        if not self._held:
            log.error("webhook_events_spooling", error=self._error)
        self._held.append(item)
        self._bytes += item.size
        log.warning(
            "webhook_event_spooled",
            event_id=item.event.id,
            event_type=item.event.type,
            call_sid=item.event.data.get("call_sid"),
            spooled=len(self._held),
        )

    def _refused(self, item: _Held, exc: OutboxRefused) -> None:
        self._lose(item, "refused", error=exc.reason)  # the kind of refusal, never the values

    def _lose(self, item: _Held, reason: str, *, error: str | None = None) -> None:
        log.error(
            "webhook_event_lost",
            reason=reason,
            event_id=item.event.id,
            event_type=item.event.type,
            call_sid=item.event.data.get("call_sid"),
            error=error or self._error,
        )
        if self._on_lost is not None:
            self._on_lost(reason)

    async def _drain(self) -> bool:
        """Commit held events in order until one fails; True when none is left."""
        while self._held:
            item = self._held[0]
            try:
                await self._commit(item.event, item.url, item.secret_env)
            except OutboxRefused as exc:
                self._refused(item, exc)
            except OutboxError as exc:
                self._failed(exc)
                return False
            self._held.popleft()
            self._bytes -= item.size
        return True

    async def _retry(self) -> None:
        delay = FIRST_RETRY
        while True:
            await self._sleep(delay)
            async with self._lock:
                count = len(self._held)
                if await self._drain():
                    log.warning("webhook_events_unspooled", events=count)
                    self._error = None
                    return
            delay = min(delay * 2, MAX_RETRY)
