"""The shared outbox: the :class:`~phoneagent.delivery.outbox.Outbox` interface on PostgreSQL.

Several instances open the same database (``PHONEAGENT_DATABASE_URL``) and any of them delivers
any event. A claim is the SQLite outbox's lease, taken with ``SELECT … FOR UPDATE SKIP LOCKED``:
two instances claiming at once lock disjoint rows rather than wait for each other, and the row's
``next_attempt_at`` moves to the end of the lease with a fresh claim token, so a SIGKILLed
instance's in-flight deliveries fall due again for the others when its lease runs out, and its
late ``mark_*`` (if it was only slow) is ignored. ``Retry-After`` is the row's
``next_attempt_at``, which every instance honours; per-receiver room is per worker, as with
SQLite (each instance keeps at most ``per_destination`` requests open to one receiver).

Times are the callers' wall-clock seconds, as in SQLite: instances sharing a database need
synchronised clocks (NTP), which a lease of a minute tolerates by a wide margin.

The schema is versioned in ``phoneagent_schema`` and migrated when an outbox opens, under a
transaction-scoped advisory lock: instances starting together migrate one after the other, and
the second finds nothing to do.

asyncpg is the driver (see pyproject.toml): it has its own connection pool and no dependencies.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from typing import Any

import asyncpg

from phoneagent.config import redact_database_url
from phoneagent.delivery.events import Event
from phoneagent.delivery.outbox import OutboxError, OutboxItem, destination_of
from phoneagent.delivery.status import DeliveryStatus

__all__ = ["SCHEMA_VERSION", "PostgresOutbox", "database_schema", "migrate", "schema_version"]

#: The schema this version reads and writes; ``MIGRATIONS[v]`` goes from v - 1 to v.
SCHEMA_VERSION = 4
#: ``pg_advisory_xact_lock`` key of the schema migration: any fixed 64-bit number of our own.
MIGRATION_LOCK = 0x70686F6E65_01  # "phone", 1
CONNECT_TIMEOUT = 5.0  # seconds: a database that does not answer at start-up is an error, soon
COMMAND_TIMEOUT = 30.0  # seconds: a stuck query fails (and is retried) rather than hangs a worker
POOL_SIZE = 6  # the worker claims and marks; the publisher enqueues; stream claims; webhooks

_PENDING, _DELIVERED, _FAILED = (
    DeliveryStatus.PENDING.value,
    DeliveryStatus.DELIVERED.value,
    DeliveryStatus.FAILED.value,
)

_COLUMNS = (
    "id, type, url, destination, secret_env, body, status, attempts, created_at, "
    "next_attempt_at, claim, last_attempt_at, last_status, last_error, delivered_at"
)

MIGRATIONS: dict[int, str] = {
    1: f"""
CREATE TABLE phoneagent_outbox (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    url TEXT NOT NULL,
    destination TEXT NOT NULL,
    secret_env TEXT NOT NULL,
    body BYTEA NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('{_PENDING}', '{_DELIVERED}', '{_FAILED}')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    claim TEXT,
    last_attempt_at DOUBLE PRECISION,
    last_status INTEGER,
    last_error TEXT,
    delivered_at DOUBLE PRECISION
);
CREATE INDEX phoneagent_outbox_due ON phoneagent_outbox (next_attempt_at)
    WHERE status = '{_PENDING}';
CREATE INDEX phoneagent_outbox_by_status ON phoneagent_outbox (status, created_at);
-- Calls in progress, per instance (owner): another instance's open calls are live, not lost.
CREATE TABLE phoneagent_open_calls (
    call_sid TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    seq BIGSERIAL,
    call TEXT NOT NULL,
    transcript JSONB NOT NULL DEFAULT '[]'::jsonb
);
CREATE INDEX phoneagent_open_calls_owner ON phoneagent_open_calls (owner, seq);
""",
    # Replay defences shared by every instance (twilio/wire/pg_replay.py): a stream token is
    # claimed by the INSERT that creates its row (the SHA-256 of the token, not the token).
    2: """
CREATE TABLE phoneagent_stream_claims (
    token_hash BYTEA PRIMARY KEY,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX phoneagent_stream_claims_expiry ON phoneagent_stream_claims (expires_at);
CREATE TABLE phoneagent_answered_webhooks (
    key TEXT PRIMARY KEY,
    twiml TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX phoneagent_answered_webhooks_expiry ON phoneagent_answered_webhooks (expires_at);
""",
    # Call records, written as calls go by whichever instance handles each step, readable from
    # any (records/postgres.py); kept as long as delivered events.
    3: """
CREATE TABLE phoneagent_calls (
    call_sid TEXT PRIMARY KEY,
    persona TEXT NOT NULL DEFAULT '',
    model_session TEXT NOT NULL DEFAULT '',
    caller TEXT NOT NULL DEFAULT '',
    called TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'ringing',
    started_at DOUBLE PRECISION,
    ended_at DOUBLE PRECISION,
    end_reason TEXT,
    transfer JSONB,
    transcript JSONB NOT NULL DEFAULT '[]'::jsonb,
    twilio_events JSONB NOT NULL DEFAULT '[]'::jsonb,
    stats JSONB NOT NULL DEFAULT '{}'::jsonb,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX phoneagent_calls_updated ON phoneagent_calls (updated_at);
""",
    # The console (console/calls.py): a call's events, by the call they are about (enqueue
    # fills call_sid from the event's data), and recent calls newest first (records/postgres.py
    # searches on this very expression). The events already queued are read with a regular
    # expression, not as JSON: PostgreSQL's JSON functions refuse a body holding \u0000 (a
    # transcript may), and a body is compact JSON whose data begins with call_sid (events.py);
    # inside strings every quote is escaped, so only the envelope's own key can match.
    4: """
ALTER TABLE phoneagent_outbox ADD COLUMN call_sid TEXT;
UPDATE phoneagent_outbox
    SET call_sid = substring(encode(body, 'escape') FROM '"data":[{]"call_sid":"([^"]*)"');
CREATE INDEX phoneagent_outbox_by_call ON phoneagent_outbox (call_sid, created_at)
    WHERE call_sid IS NOT NULL;
CREATE INDEX phoneagent_calls_recent ON phoneagent_calls ((COALESCE(started_at, updated_at)));
""",
}

_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS phoneagent_schema (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS phoneagent_migrations (
    component TEXT NOT NULL,
    version INTEGER NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
);
"""

#: What goes wrong talking to the database once it is open: each becomes an OutboxError, which
#: the worker and the publisher survive (retry, spool) as they do a locked SQLite file.
_DATABASE_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a connection the server closed, found mid-query
    OSError,
    TimeoutError,
)


class PostgresOutbox:
    """The outbox in a PostgreSQL database shared by every instance.

    Open it with ``await PostgresOutbox.open(url)``; a database that cannot be reached, refuses
    the login or holds a newer schema raises :class:`OutboxError` there, naming the URL without
    its password. ``owner`` names this instance's open calls (default: the host name, a pod's
    name), so a restarted instance ends the calls its previous run left open and no others.
    """

    def __init__(self, pool: asyncpg.Pool, url: str, owner: str) -> None:
        self._pool = pool
        self.url = redact_database_url(url)  # for messages: never the password
        self.owner = owner
        self._closed = False

    @classmethod
    async def open(
        cls, url: str, *, owner: str | None = None, pool_size: int = POOL_SIZE
    ) -> PostgresOutbox:
        shown = redact_database_url(url)
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=pool_size,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
            )
        except (*_DATABASE_ERRORS, ValueError) as exc:
            raise OutboxError(
                f"cannot connect to the database {shown} ({_reason(exc)}): check that it is "
                "running and reachable, and PHONEAGENT_DATABASE_URL (user, password, database)"
            ) from None
        outbox = cls(pool, url, owner or socket.gethostname())
        try:
            await outbox._migrate()
        except BaseException:
            await pool.close()
            raise
        return outbox

    async def _migrate(self) -> None:
        async with self._connection() as conn:
            await migrate(conn, self.url)

    def connection(self) -> AbstractAsyncContextManager[asyncpg.Connection]:
        """A connection of the pool, for the other stores sharing this database (stream claims):
        errors talking to the database come out as :class:`OutboxError`."""
        return self._connection()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._closed:
            raise OutboxError(f"the outbox in {self.url} is closed")
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except OutboxError:
            raise
        except _DATABASE_ERRORS as exc:
            raise OutboxError(f"the database {self.url}: {_reason(exc)}") from exc

    # --- the interface --------------------------------------------------------------------

    async def enqueue(
        self,
        event: Event,
        *,
        url: str,
        secret_env: str,
        now: float,
        closes_call: str | None = None,
    ) -> bool:
        row = (
            event.id,
            event.type,
            url,
            destination_of(url),
            secret_env,
            event.body(),
            _PENDING,
            now,
            now,
        )
        call_sid = event.data.get("call_sid")
        row += (call_sid if isinstance(call_sid, str) else None,)
        sql = (
            "INSERT INTO phoneagent_outbox (id, type, url, destination, secret_env, body, status,"
            " created_at, next_attempt_at, call_sid)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING"
        )
        async with self._connection() as conn, conn.transaction():
            added = _count(await conn.execute(sql, *row)) == 1
            if closes_call is not None:
                await conn.execute(
                    "DELETE FROM phoneagent_open_calls WHERE call_sid = $1", closes_call
                )
        return added

    async def open_call(self, call_sid: str, call: Mapping[str, Any]) -> None:
        # A call back from a transfer nobody answered starts again: a fresh record, now ours.
        async with self._connection() as conn:
            await conn.execute(
                "INSERT INTO phoneagent_open_calls (call_sid, owner, call) VALUES ($1, $2, $3) "
                "ON CONFLICT (call_sid) DO UPDATE SET owner = EXCLUDED.owner, "
                "call = EXCLUDED.call, transcript = '[]'::jsonb, seq = DEFAULT",
                call_sid,
                self.owner,
                json.dumps(dict(call)),
            )

    async def add_turn(self, call_sid: str, turn: Mapping[str, Any]) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE phoneagent_open_calls "
                "SET transcript = transcript || jsonb_build_array($1::jsonb) WHERE call_sid = $2",
                json.dumps(dict(turn)),
                call_sid,
            )

    async def close_call(self, call_sid: str) -> None:
        async with self._connection() as conn:
            await conn.execute("DELETE FROM phoneagent_open_calls WHERE call_sid = $1", call_sid)

    async def open_calls(self) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
        # Only this instance's: the others' open calls are alive on them (a shared record of
        # calls, with liveness, is a later increment of issue 14).
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT call_sid, call, transcript::text FROM phoneagent_open_calls "
                "WHERE owner = $1 ORDER BY seq",
                self.owner,
            )
        return [(r[0], json.loads(r[1]), json.loads(r[2])) for r in rows]

    async def claim_due(
        self,
        *,
        now: float,
        limit: int,
        lease: float,
        room: Mapping[str, int] | None = None,
        default_room: int | None = None,
    ) -> list[OutboxItem]:
        if limit <= 0:
            return []
        room = dict(room or {})
        full = [d for d, n in room.items() if n <= 0]
        # A few more candidates than slots: some may belong to a destination with no room.
        fetch = limit * 4 if (room or default_room is not None) else limit
        claimed: list[OutboxItem] = []
        async with self._connection() as conn, conn.transaction():
            # SKIP LOCKED: rows another instance is claiming right now are left to it.
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM phoneagent_outbox WHERE status = '{_PENDING}' "
                "AND next_attempt_at <= $1 AND NOT (destination = ANY($2::text[])) "
                "ORDER BY next_attempt_at, created_at, id LIMIT $3 FOR UPDATE SKIP LOCKED",
                now,
                full,
                fetch,
            )
            taken: dict[str, int] = {}
            for row in rows:
                item = _item(row)
                cap = room.get(item.destination, default_room)
                if cap is not None and taken.get(item.destination, 0) >= cap:
                    continue
                taken[item.destination] = taken.get(item.destination, 0) + 1
                claimed.append(item)
                if len(claimed) >= limit:
                    break
            if not claimed:
                return []
            tokens = [secrets.token_hex(8) for _ in claimed]
            await conn.execute(
                "UPDATE phoneagent_outbox AS o SET claim = c.token, next_attempt_at = $3 "
                "FROM unnest($1::text[], $2::text[]) AS c(id, token) WHERE o.id = c.id",
                [item.id for item in claimed],
                tokens,
                now + lease,
            )
        return [
            _replace_claim(item, token, now + lease)
            for item, token in zip(claimed, tokens, strict=True)
        ]

    async def next_due_at(self, *, skip: Collection[str] = ()) -> float | None:
        async with self._connection() as conn:
            return await conn.fetchval(
                f"SELECT MIN(next_attempt_at) FROM phoneagent_outbox WHERE status = '{_PENDING}' "
                "AND NOT (destination = ANY($1::text[]))",
                list(skip),
            )

    async def mark_delivered(self, item_id: str, claim: str, *, now: float, status: int) -> bool:
        return await self._mark(
            f"status = '{_DELIVERED}', delivered_at = $3, last_attempt_at = $3, "
            "last_status = $4, last_error = NULL",
            item_id,
            claim,
            now,
            status,
        )

    async def mark_retry(
        self, item_id: str, claim: str, *, now: float, at: float, status: int | None, error: str
    ) -> bool:
        return await self._mark(
            "next_attempt_at = $3, last_attempt_at = $4, last_status = $5, last_error = $6",
            item_id,
            claim,
            at,
            now,
            status,
            error,
        )

    async def mark_dead(
        self, item_id: str, claim: str, *, now: float, status: int | None, error: str
    ) -> bool:
        return await self._mark(
            f"status = '{_FAILED}', last_attempt_at = $3, last_status = $4, last_error = $5",
            item_id,
            claim,
            now,
            status,
            error,
        )

    async def _mark(self, assignments: str, item_id: str, claim: str, *values: Any) -> bool:
        async with self._connection() as conn:
            result = await conn.execute(
                f"UPDATE phoneagent_outbox SET {assignments}, attempts = attempts + 1, "
                f"claim = NULL WHERE id = $1 AND claim = $2 AND status = '{_PENDING}'",
                item_id,
                claim,
                *values,
            )
        return _count(result) == 1

    async def release(self, item_id: str, claim: str, *, now: float) -> bool:
        async with self._connection() as conn:
            result = await conn.execute(
                "UPDATE phoneagent_outbox SET claim = NULL, next_attempt_at = $3 "
                f"WHERE id = $1 AND claim = $2 AND status = '{_PENDING}'",
                item_id,
                claim,
                now,
            )
        return _count(result) == 1

    async def get(self, item_id: str) -> OutboxItem | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM phoneagent_outbox WHERE id = $1", item_id
            )
        return _item(row) if row is not None else None

    async def list(self, *, status: str | None = None, limit: int = 50) -> list[OutboxItem]:
        if status is not None and status not in set(DeliveryStatus):
            names = ", ".join(DeliveryStatus)
            raise ValueError(f"status must be one of {names}, not {status!r}")
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM phoneagent_outbox "
                "WHERE ($1::text IS NULL OR status = $1) ORDER BY created_at DESC, id LIMIT $2",
                status,
                limit,
            )
        return [_item(row) for row in rows]

    async def for_call(self, call_sid: str, *, limit: int = 20) -> list[OutboxItem]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM phoneagent_outbox WHERE call_sid = $1 "
                "ORDER BY created_at, id LIMIT $2",
                call_sid,
                limit,
            )
        return [_item(row) for row in rows]

    async def counts(self) -> dict[str, int]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT status, COUNT(*) FROM phoneagent_outbox GROUP BY status"
            )
        return {status: 0 for status in DeliveryStatus} | {DeliveryStatus(s): n for s, n in rows}

    async def redeliver(self, item_id: str, *, now: float) -> OutboxItem | None:
        async with self._connection() as conn:
            await conn.execute(
                f"UPDATE phoneagent_outbox SET status = '{_PENDING}', attempts = 0, "
                "next_attempt_at = $2, claim = NULL, delivered_at = NULL WHERE id = $1",
                item_id,
                now,
            )
        return await self.get(item_id)

    async def purge_delivered(self, *, before: float) -> int:
        async with self._connection() as conn:
            result = await conn.execute(
                f"DELETE FROM phoneagent_outbox WHERE status = '{_DELIVERED}' "
                "AND delivered_at < $1",
                before,
            )
        return _count(result)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._pool.close()
        except _DATABASE_ERRORS:
            self._pool.terminate()


async def schema_version(conn: asyncpg.Connection) -> int:
    """The schema version the database holds (0: never migrated)."""
    exists = await conn.fetchval("SELECT to_regclass('phoneagent_schema') IS NOT NULL")
    if not exists:
        return 0
    version = await conn.fetchval(
        "SELECT version FROM phoneagent_schema WHERE component = 'outbox'"
    )
    return version or 0


async def migrate(conn: asyncpg.Connection, shown_url: str) -> tuple[int, int]:
    """Apply the pending steps under the advisory lock: (version before, version now). A schema
    newer than this version reads raises :class:`OutboxError` naming ``shown_url``."""
    async with conn.transaction():
        # Serialises start-ups: a second instance waits here, then finds the schema current.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(_BOOKKEEPING)
        version = await schema_version(conn)
        if version > SCHEMA_VERSION:
            raise OutboxError(
                f"the database {shown_url} was migrated by a newer phoneagent (outbox schema "
                f"{version}, this version reads {SCHEMA_VERSION}): upgrade phoneagent"
            )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            await conn.execute(MIGRATIONS[step])
            await conn.execute(
                "INSERT INTO phoneagent_migrations (component, version) VALUES ('outbox', $1)",
                step,
            )
        await conn.execute(
            "INSERT INTO phoneagent_schema (component, version) VALUES ('outbox', $1) "
            "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
            SCHEMA_VERSION,
        )
    return version, SCHEMA_VERSION


async def database_schema(url: str, *, apply: bool) -> tuple[int, int]:
    """``phoneagent db status|migrate``: (the database's schema version, this version's), after
    applying the pending steps when ``apply``. A database that cannot be reached or used raises
    :class:`OutboxError` naming the URL without its password."""
    shown = redact_database_url(url)
    try:
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT)
    except (*_DATABASE_ERRORS, ValueError) as exc:
        raise OutboxError(
            f"cannot connect to the database {shown} ({_reason(exc)}): check that it is "
            "running and reachable, and PHONEAGENT_DATABASE_URL (user, password, database)"
        ) from None
    try:
        if apply:
            _, version = await migrate(conn, shown)
        else:
            version = await schema_version(conn)
        return version, SCHEMA_VERSION
    except _DATABASE_ERRORS as exc:
        raise OutboxError(f"the database {shown}: {_reason(exc)}") from None
    finally:
        await conn.close()


def _count(status: str) -> int:
    """Rows touched, from a command status such as ``UPDATE 1`` or ``INSERT 0 1``."""
    return int(status.rsplit(" ", 1)[-1])


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _item(row: asyncpg.Record) -> OutboxItem:
    values = list(row)
    values[5] = bytes(values[5])
    values[6] = DeliveryStatus(values[6])
    return OutboxItem(*values)


def _replace_claim(item: OutboxItem, token: str, until: float) -> OutboxItem:
    return replace(item, claim=token, next_attempt_at=until)
