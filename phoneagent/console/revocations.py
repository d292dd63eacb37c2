"""Which console sessions are signed out: the sessions revoked one by one (sign-out) and the
time before which every session is (sign out everywhere).

A session is a signed token (``auth.py``): any instance accepts it, so a revocation is a record
every instance reads. It is kept where API keys are (``revocation_store.py``): this instance's
file in ``PHONEAGENT_DATA_DIR``, or the shared PostgreSQL database, which every instance reads.
Only a session's id (a hash of its random part) and its expiry are stored; a revocation is
forgotten once its session would have expired anyway.

How fresh, and what happens when the store is away:

- This instance's memory holds every revocation it made or has read, and honours them all
  without asking the store (a revocation is never forgotten before its session expires).
- The store is read at most once every ``FRESH_SECONDS`` (not at every request), when a request
  comes: a revocation on another instance holds here within that, plus the read's own time.
- A store that cannot be read (the database away) leaves memory as it is: sessions not known to
  be revoked stay signed in (the operator is not locked out), known revocations stay in force,
  and the failure is logged (once per outage): a revocation made meanwhile on another instance
  reaches this one when the store answers again.
- A revocation that cannot be written is kept in memory (in force here at once) and written
  again in the background every few seconds (``RETRY_SECONDS``, then up to
  ``RETRY_MAX_SECONDS`` apart), at the next read, and one last time at shutdown: a revocation
  must reach the other instances even when no request comes here after it (after "sign out
  everywhere" the operator's browser has no cookie to send, and a stolen one is used
  elsewhere). Until then only this instance knows it, and its log says so; it says once when
  the revocations kept reach the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from phoneagent.console.auth import Session
from phoneagent.delivery.outbox import OutboxError
from phoneagent.logs import get_logger

__all__ = [
    "FRESH_SECONDS",
    "RETRY_MAX_SECONDS",
    "RETRY_SECONDS",
    "RevocationList",
    "RevocationStore",
    "SessionRevocations",
    "learned",
]

log = get_logger(__name__)

#: How long what was read from the store is taken as current: the longest a revocation made on
#: another instance goes unseen here (plus one read), and at most one read per this many seconds.
FRESH_SECONDS = 1.0
#: How soon a revocation that could not be written is tried again, doubling up to the maximum:
#: the longest the store is back before the other instances can learn it (plus one read there).
RETRY_SECONDS = 0.5
RETRY_MAX_SECONDS = 4.0


@dataclass
class RevocationList:
    """The revocations known: no I/O. ``sessions``: revoked session ids and their expiry;
    ``signed_out_before``: every session issued before this (wall-clock seconds) is revoked."""

    sessions: dict[str, float] = field(default_factory=dict)
    signed_out_before: float = 0.0

    def revoked(self, session: Session) -> bool:
        return session.id in self.sessions or session.issued_at < self.signed_out_before

    def revoke(self, session: Session) -> None:
        self.sessions[session.id] = session.expires_at

    def revoke_all_before(self, at: float) -> None:
        self.signed_out_before = max(self.signed_out_before, at)

    def learn(self, other: RevocationList) -> None:
        """Add what ``other`` knows (a read of the store): nothing known is ever taken back."""
        for session_id, expires_at in other.sessions.items():
            self.sessions[session_id] = max(expires_at, self.sessions.get(session_id, 0.0))
        self.revoke_all_before(other.signed_out_before)

    def forget_expired(self, now: float) -> None:
        for session_id in [s for s, expires_at in self.sessions.items() if expires_at <= now]:
            del self.sessions[session_id]

    def __bool__(self) -> bool:
        return bool(self.sessions) or self.signed_out_before > 0


class RevocationStore(Protocol):
    """Errors reaching the store come out as ``OutboxError``, naming the file or database."""

    async def read(self, now: float) -> RevocationList:
        """The revocations of sessions not expired at ``now``."""
        ...

    async def write(self, revocations: RevocationList, now: float) -> None:
        """Add ``revocations`` (an earlier ``signed_out_before`` never replaces a later one),
        and forget those expired at ``now``."""
        ...

    async def close(self) -> None: ...


class SessionRevocations:
    """This instance's view of the revocations, kept fresh from ``store``."""

    def __init__(
        self,
        store: RevocationStore,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self._clock, self._monotonic = clock, monotonic
        self._known = RevocationList()
        self._unwritten = RevocationList()  # made here, not yet in the store
        self._read_at: float | None = None  # monotonic; None: never read
        self._reading: asyncio.Task[None] | None = None
        self._store_away = False
        self._retrying: asyncio.Task[None] | None = None  # writes _unwritten until it is empty
        self._closed = False
        self._kept = False  # a write failed: say so when the revocations kept reach the store

    def revoked(self, session: Session) -> bool:
        """Whether ``session`` is revoked, from memory (no I/O): see ``fresh``."""
        return self._known.revoked(session)

    async def fresh(self) -> None:
        """Read the store if what was read is older than FRESH_SECONDS (concurrent callers share
        one read). Never raises: a store that cannot be read leaves memory as it is."""
        if self._read_at is not None and self._monotonic() - self._read_at < FRESH_SECONDS:
            return
        if self._reading is None:
            self._reading = asyncio.create_task(self._read())
            self._reading.add_done_callback(self._read_done)
        await asyncio.shield(self._reading)

    def refresh_soon(self) -> None:
        """``fresh`` in the background, for code that cannot wait (an event stream's check)."""
        if self._reading is None and (
            self._read_at is None or self._monotonic() - self._read_at >= FRESH_SECONDS
        ):
            self._reading = asyncio.create_task(self._read())
            self._reading.add_done_callback(self._read_done)

    async def revoke(self, session: Session) -> bool:
        """Sign ``session`` out: in force here at once; whether the store has it (every instance
        will see it) or it waits in memory for the store to answer."""
        self._known.revoke(session)
        self._unwritten.revoke(session)
        return await self._write()

    async def revoke_all_before(self, at: float) -> bool:
        """Sign out every session issued before ``at``; as ``revoke``."""
        self._known.revoke_all_before(at)
        self._unwritten.revoke_all_before(at)
        return await self._write()

    async def close(self) -> None:
        self._closed = True
        if self._retrying is not None:
            self._retrying.cancel()
            await asyncio.gather(self._retrying, return_exceptions=True)
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)
        if self._unwritten:  # one last try: the other instances would never learn them
            with contextlib.suppress(OutboxError):
                await self._write_unwritten(self._clock())
        if self._unwritten:
            log.warning("console_revocations_not_stored", sessions=len(self._unwritten.sessions),
                        everywhere=self._unwritten.signed_out_before > 0)  # fmt: skip
        await self.store.close()

    def _read_done(self, task: asyncio.Task[None]) -> None:
        self._reading = None

    async def _read(self) -> None:
        now = self._clock()
        try:
            if self._unwritten:
                await self._write_unwritten(now)
            self._known.learn(await self.store.read(now))
        except OutboxError as exc:
            self._retry_unwritten()
            if not self._store_away:
                log.warning("console_revocations_unreadable", error=str(exc))
            self._store_away = True
        else:
            if self._store_away:
                log.info("console_revocations_readable")
            self._store_away = False
        finally:
            self._known.forget_expired(now)
            self._read_at = self._monotonic()

    async def _write(self) -> bool:
        try:
            await self._write_unwritten(self._clock())
        except OutboxError as exc:
            log.warning("console_revocation_kept_in_memory", error=str(exc))
            self._retry_unwritten()
            return False
        return True

    def _retry_unwritten(self) -> None:
        if self._unwritten and self._retrying is None and not self._closed:
            self._retrying = asyncio.create_task(self._retry())

    async def _retry(self) -> None:
        """Write what is kept in memory until the store takes it, whether or not a request
        comes; a read or a sign-out may write it first."""
        delay = RETRY_SECONDS
        try:
            while self._unwritten:
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_SECONDS)
                if self._unwritten:
                    # A failure was said when it was kept, and is again at shutdown if never
                    # written: not at every try.
                    with contextlib.suppress(OutboxError):
                        await self._write_unwritten(self._clock())
        except Exception:  # not the store's answer but a bug: said, and not tried every second
            log.exception("console_revocations_retry_failed")
        finally:
            self._retrying = None

    async def _write_unwritten(self, now: float) -> None:
        pending, self._unwritten = self._unwritten, RevocationList()
        try:
            await self.store.write(pending, now)
        except BaseException:
            pending.learn(self._unwritten)  # written meanwhile: kept with the rest
            self._unwritten = pending
            self._kept = True
            raise
        if self._kept and not self._unwritten:
            log.info("console_revocations_stored", sessions=len(pending.sessions),
                     everywhere=pending.signed_out_before > 0)  # fmt: skip
            self._kept = False


def learned(sessions: Mapping[str, float], signed_out_before: float | None) -> RevocationList:
    """A store's rows as a list."""
    return RevocationList(dict(sessions), signed_out_before or 0.0)
