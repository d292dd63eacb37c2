"""The replay defences (:class:`~phoneagent.twilio.wire.replay.ReplayGuard`) on PostgreSQL,
shared by every instance of ``PHONEAGENT_DATABASE_URL``.

A stream token is claimed by ``INSERT … ON CONFLICT DO NOTHING`` on a table keyed by the token
(its SHA-256: the table never holds a usable token): of two instances claiming one token at
once, the database lets exactly one insert the row. A webhook's answer is kept the same way,
keyed by the request, and the first answer wins: an instance that answered a replay
concurrently sees that its answer was not kept, returns the kept one and starts nothing. Rows
carry their expiry and are purged as claims go by (at most once a minute per instance).

The guard uses the outbox's pool (:meth:`PostgresOutbox.connection`) and its schema (migration
step 2). This instance's own memory is checked first, with no await before it, so a replay on
the same instance is refused without a round trip. While the database cannot be reached, the
guard falls back to that memory (the defence of a single instance), logs it, and calls go on
without waiting on it: a round trip gets ``ROUND_TRIP_SECONDS`` (Twilio gives up on a webhook
after 15 s, and a database host that vanished answers nothing, not an error), and after a
failure, or while the outbox reports the database silent, the guard does not ask it again for
``AWAY_SECONDS`` (``delivery/pg_round_trip.py``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from phoneagent.delivery.outbox import OutboxError
from phoneagent.delivery.pg_outbox import PostgresOutbox, _count
from phoneagent.delivery.pg_round_trip import RoundTrips
from phoneagent.logs import get_logger
from phoneagent.twilio.wire.replay import MemoryReplayGuard

__all__ = ["ANSWER_SECONDS", "PostgresReplayGuard"]

log = get_logger(__name__)

#: How long a webhook's answer is kept: longer than any call (Twilio ends calls at 4 hours).
ANSWER_SECONDS = 24 * 3600.0
PURGE_EVERY = 60.0  # seconds between purges of expired rows, per instance


class PostgresReplayGuard:
    def __init__(
        self,
        outbox: PostgresOutbox,
        *,
        clock: Callable[[], float] = time.time,
        answer_seconds: float = ANSWER_SECONDS,
    ) -> None:
        self._round_trips = RoundTrips(outbox)
        self._clock = clock
        self._answer_seconds = answer_seconds
        self._local = MemoryReplayGuard(clock)
        self._next_purge = 0.0

    async def claim_stream(
        self, token: str, expires_at: float, *, shared_only: bool = False
    ) -> bool:
        # No await before this: a token already used on this instance is refused at once.
        if not self._local.claims.claim(token, expires_at):
            return False
        try:
            async with self._round_trips.connection() as conn:
                await self._purge(conn)
                result = await conn.execute(
                    "INSERT INTO phoneagent_stream_claims (token_hash, expires_at) "
                    "VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    _digest(token),
                    expires_at,
                )
        except OutboxError as exc:
            log.warning("replay_guard_unshared", operation="claim_stream", error=str(exc))
            if shared_only:
                self._local.claims.release(token)  # a stream arriving here may still use it
                return False
            return True  # claimed in this instance's memory
        return _count(result) == 1

    async def answer_for(self, key: str) -> str | None:
        local = await self._local.answer_for(key)
        if local is not None:
            return local
        try:
            async with self._round_trips.connection() as conn:
                twiml = await conn.fetchval(
                    "SELECT twiml FROM phoneagent_answered_webhooks "
                    "WHERE key = $1 AND expires_at >= $2",
                    key,
                    self._clock(),
                )
        except OutboxError as exc:
            log.warning("replay_guard_unshared", operation="answer_for", error=str(exc))
            return None
        if twiml is not None:
            self._local.remember_now(key, twiml)
        return twiml

    async def remember(self, key: str, twiml: str) -> tuple[str, bool]:
        now = self._clock()
        try:
            async with self._round_trips.connection() as conn:
                # A row past its expiry is as good as absent: the new answer replaces it.
                kept = await conn.fetchrow(
                    "INSERT INTO phoneagent_answered_webhooks (key, twiml, expires_at) "
                    "VALUES ($1, $2, $3) ON CONFLICT (key) DO UPDATE "
                    "SET twiml = EXCLUDED.twiml, expires_at = EXCLUDED.expires_at "
                    "WHERE phoneagent_answered_webhooks.expires_at < $4 RETURNING twiml",
                    key,
                    twiml,
                    now + self._answer_seconds,
                    now,
                )
                if kept is None:  # another request's answer came first
                    first = await conn.fetchval(
                        "SELECT twiml FROM phoneagent_answered_webhooks WHERE key = $1", key
                    )
                    if first is not None:
                        self._local.remember_now(key, first)
                        return first, False
        except OutboxError as exc:
            log.warning("replay_guard_unshared", operation="remember", error=str(exc))
            return self._local.remember_now(key, twiml)
        if kept is not None:  # ours is the first: this request's answer, whatever memory holds
            self._local.answered.remember(key, twiml)
            return twiml, True
        return self._local.remember_now(key, twiml)

    async def _purge(self, conn) -> None:
        now = self._clock()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_EVERY
        await conn.execute("DELETE FROM phoneagent_stream_claims WHERE expires_at < $1", now)
        await conn.execute("DELETE FROM phoneagent_answered_webhooks WHERE expires_at < $1", now)

    async def close(self) -> None:
        pass  # the pool is the outbox's, closed with it


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
