"""The shared outbox: the :class:`~phoneagent.delivery.outbox.Outbox` interface on PostgreSQL.

Several instances open the same database (``PHONEAGENT_DATABASE_URL``) and any of them delivers
any event. A claim is the SQLite outbox's lease, taken with ``SELECT … FOR UPDATE SKIP LOCKED``
(a row another transaction is writing is passed over, not waited for), and the row's
``next_attempt_at`` moves to the end of the lease with a fresh claim token, so a SIGKILLed
instance's in-flight deliveries fall due again for the others when its lease runs out, and its
late ``mark_*`` (if it was only slow) is ignored. ``Retry-After`` is the row's
``next_attempt_at``, which every instance honours (for that event: the receiver's other events
keep their own times). The per-receiver limit holds across instances: a claim counts each
receiver's deliveries in flight on every instance (its rows under a live lease) and takes only
what is left of ``per_destination``, under a lock that serialises claims (see
:meth:`PostgresOutbox.claim_due`).

Times are the callers' wall-clock seconds, as in SQLite: instances sharing a database need
synchronised clocks (NTP), which a lease of a minute tolerates by a wide margin.

Calls in progress are recorded with the run of the instance that holds them (``run_id``, fresh at
each start), and each run records that it is alive (``phoneagent_instances``, see
``liveness.py``): a call whose run has gone silent was lost with it, and any instance adopts it
(:meth:`PostgresOutbox.adopt_lost_calls`). Those times are the database's own clock, so no
instance's clock can make another one look dead.

The schema is versioned in ``phoneagent_schema`` and migrated when an outbox opens, under a
transaction-scoped advisory lock: instances starting together migrate one after the other, and
the second finds nothing to do.

asyncpg is the driver (see pyproject.toml): it has its own connection pool and no dependencies.
"""

from __future__ import annotations

import itertools
import json
import math
import secrets
import socket
import time
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from phoneagent.config import redact_database_url
from phoneagent.delivery.events import Event
from phoneagent.delivery.outbox import OutboxError, OutboxItem, OutboxRefused, destination_of
from phoneagent.delivery.status import DeliveryStatus

__all__ = [
    "SCHEMA_VERSION",
    "LostCall",
    "PostgresOutbox",
    "database_schema",
    "jsonb_text",
    "migrate",
    "refusal",
    "schema_version",
    "storable",
]

#: The schema this version reads and writes; ``MIGRATIONS[v]`` goes from v - 1 to v.
SCHEMA_VERSION = 10
#: ``pg_advisory_xact_lock`` key of the schema migration: any fixed 64-bit number of our own.
MIGRATION_LOCK = 0x70686F6E65_01  # "phone", 1
#: ``pg_advisory_xact_lock`` key that serialises the claims that count receivers' room.
CLAIM_LOCK = 0x70686F6E65_02  # "phone", 2
#: A claim transaction idle this long between its statements (its instance frozen: SIGSTOP, a
#: paused VM) is ended by the server, which frees CLAIM_LOCK for the others. Milliseconds.
CLAIM_IDLE_TIMEOUT_MS = 5000
CONNECT_TIMEOUT = 5.0  # seconds: a database that does not answer at start-up is an error, soon
COMMAND_TIMEOUT = 30.0  # seconds: a stuck query fails (and is retried) rather than hangs a worker
#: A database that has not answered one of our requests for this long is reported (readiness)
#: before the request times out: a database host that vanished answers nothing, not an error.
STALL_SECONDS = 5.0
POOL_SIZE = 6  # the worker claims and marks; the publisher enqueues; stream claims; webhooks
#: Twilio ends a call after 4 hours: a call recorded by a release without heartbeats (no run)
#: that was opened longer ago than this is over, whoever recorded it.
LONGEST_CALL_SECONDS = 4 * 3600.0

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
    # Claims count each receiver's deliveries in flight on every instance (claim_due), under a
    # lock every claim waits for: the rows under a claim, a few per receiver, found without
    # reading the pending rest (a receiver that is down can have thousands waiting to retry).
    4: """
CREATE INDEX phoneagent_outbox_claimed ON phoneagent_outbox (destination)
    WHERE claim IS NOT NULL;
""",
    # Instance liveness (delivery/liveness.py): each run of an instance refreshes its row; an
    # open call carries its run, so a run gone silent (or gone: a clean stop deletes its row)
    # left its calls lost, and any instance adopts them. Rows from before this step have no
    # run (NULL): see adopt_lost_calls.
    5: """
CREATE TABLE phoneagent_instances (
    run_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX phoneagent_instances_owner ON phoneagent_instances (owner);
ALTER TABLE phoneagent_open_calls ADD COLUMN run_id TEXT;
ALTER TABLE phoneagent_open_calls ADD COLUMN opened_at TIMESTAMPTZ NOT NULL DEFAULT now();
CREATE INDEX phoneagent_open_calls_run ON phoneagent_open_calls (run_id);
""",
    # The console (console/calls.py): a call's events, by the call they are about (enqueue
    # fills call_sid from the event's data), and recent calls newest first (records/postgres.py
    # searches on this very expression). The events already queued are read with a regular
    # expression, not as JSON: PostgreSQL's JSON functions refuse a body holding \u0000 (a
    # transcript may), and a body is compact JSON whose data begins with call_sid (events.py);
    # inside strings every quote is escaped, so only the envelope's own key can match.
    6: """
ALTER TABLE phoneagent_outbox ADD COLUMN call_sid TEXT;
UPDATE phoneagent_outbox
    SET call_sid = substring(encode(body, 'escape') FROM '"data":[{]"call_sid":"([^"]*)"');
CREATE INDEX phoneagent_outbox_by_call ON phoneagent_outbox (call_sid, created_at)
    WHERE call_sid IS NOT NULL;
CREATE INDEX phoneagent_calls_recent ON phoneagent_calls ((COALESCE(started_at, updated_at)));
""",
    # A call's context (call/context.py): its direction ('' until the webhook that connects its
    # stream writes it), its variables' values and the business's metadata. Every call before
    # this step was answered: inbound.
    7: """
ALTER TABLE phoneagent_calls ADD COLUMN direction TEXT NOT NULL DEFAULT '';
ALTER TABLE phoneagent_calls ADD COLUMN variables JSONB NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE phoneagent_calls ADD COLUMN metadata JSONB NOT NULL DEFAULT '{}'::jsonb;
UPDATE phoneagent_calls SET direction = 'inbound';
""",
    # API keys (api/key_store.py): only their SHA-256, never their text; `personas` lists the
    # persona ids a key may use (empty: every persona). Read by id at every API request.
    8: """
CREATE TABLE phoneagent_api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    personas TEXT[] NOT NULL,
    key_hash TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION
);
""",
    # Console sessions signed out (console/revocation_store.py), read by every instance: a
    # session's id (the SHA-256 of its token's random part, never the token) until it would
    # have expired, and the one time before which every session is signed out.
    9: """
CREATE TABLE phoneagent_console_revoked (
    session_id TEXT PRIMARY KEY,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX phoneagent_console_revoked_expiry ON phoneagent_console_revoked (expires_at);
CREATE TABLE phoneagent_console_signed_out (
    id BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    before DOUBLE PRECISION NOT NULL
);
""",
    # Claims read each receiver's first due rows, in order, and the next due time is one
    # lookup per receiver (claim_due, next_due_at): a receiver at its limit no longer makes
    # every claim read past its backlog. phoneagent_outbox_due goes: left, the planner took it
    # for a receiver's rows (filtering every other receiver's out) once a backlog grew.
    10: f"""
CREATE INDEX phoneagent_outbox_due_by_destination
    ON phoneagent_outbox (destination, next_attempt_at, created_at, id)
    WHERE status = '{_PENDING}';
DROP INDEX IF EXISTS phoneagent_outbox_due;
""",
}

# Every receiver with pending rows, one index lookup each (a walk from one receiver to the
# next along phoneagent_outbox_due_by_destination, rather than a read of every pending row).
_RECEIVERS = f"""
WITH RECURSIVE receivers(destination) AS (
    (SELECT destination FROM phoneagent_outbox WHERE status = '{_PENDING}'
     ORDER BY destination LIMIT 1)
    UNION ALL
    SELECT (
        SELECT o.destination FROM phoneagent_outbox AS o
        WHERE o.status = '{_PENDING}' AND o.destination > r.destination
        ORDER BY o.destination LIMIT 1
    ) FROM receivers AS r WHERE r.destination IS NOT NULL
)"""

# $1 now; $2, $3: receivers and how many each may take now; $4 how many the others may;
# $5 the limit. Each receiver's first due rows (SKIP LOCKED: those another instance is marking
# are left to it), as many as it may take, then the earliest due of them all.
_CLAIM_DUE = (
    _RECEIVERS
    + f"""
SELECT c.* FROM receivers AS r CROSS JOIN LATERAL (
    SELECT {_COLUMNS} FROM phoneagent_outbox AS o
    WHERE o.status = '{_PENDING}' AND o.destination = r.destination AND o.next_attempt_at <= $1
    ORDER BY o.next_attempt_at, o.created_at, o.id
    LIMIT COALESCE(
        (SELECT x.take FROM unnest($2::text[], $3::int[]) AS x(destination, take)
         WHERE x.destination = r.destination), $4)
    FOR UPDATE SKIP LOCKED
) AS c
WHERE r.destination IS NOT NULL
ORDER BY c.next_attempt_at, c.created_at, c.id LIMIT $5
"""
)

# $1: receivers to leave out. Each receiver's first row, in the index's own order.
_NEXT_DUE = (
    _RECEIVERS
    + f"""
SELECT MIN((
    SELECT o.next_attempt_at FROM phoneagent_outbox AS o
    WHERE o.status = '{_PENDING}' AND o.destination = r.destination
    ORDER BY o.next_attempt_at, o.created_at, o.id LIMIT 1
)) FROM receivers AS r WHERE r.destination IS NOT NULL AND NOT (r.destination = ANY($1::text[]))
"""
)

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


@dataclass(frozen=True)
class LostCall:
    """An open call adopted from a run that is gone (see ``adopt_lost_calls``)."""

    call_sid: str
    call: dict[str, Any]
    turns: list[dict[str, Any]]
    owner: str  # the instance that held it


class PostgresOutbox:
    """The outbox in a PostgreSQL database shared by every instance.

    Open it with ``await PostgresOutbox.open(url)``; a database that cannot be reached, refuses
    the login or holds a newer schema raises :class:`OutboxError` there, naming the URL without
    its password. ``owner`` names the instance (``PHONEAGENT_INSTANCE_NAME``, default: the host
    name, a pod's name) and ``run_id`` this run of it: its open calls carry both, and they are
    its own while the run's heartbeat is fresh (``heartbeat``, ``adopt_lost_calls``).
    """

    def __init__(self, pool: asyncpg.Pool, url: str, owner: str) -> None:
        self._pool = pool
        self.url = redact_database_url(url)  # for messages: never the password
        self.owner = owner
        self.run_id = secrets.token_hex(8)
        self._closed = False
        # When each request now in progress began (monotonic): see `problem`.
        self._in_flight: dict[int, float] = {}
        self._requests = itertools.count()

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
                reset=_nothing_to_reset,
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

    @property
    def problem(self) -> str | None:
        """A request waiting on the database for longer than ``STALL_SECONDS`` (a connection or
        an answer that does not come), named before it times out; else None."""
        if not self._in_flight:
            return None
        waited = time.monotonic() - min(self._in_flight.values())
        if waited < STALL_SECONDS:
            return None
        return f"the database {self.url} has not answered for {waited:.0f} s"

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._closed:
            raise OutboxError(f"the outbox in {self.url} is closed")
        request = next(self._requests)
        self._in_flight[request] = time.monotonic()
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except OutboxError:
            raise
        except _DATABASE_ERRORS as exc:
            message, kind = f"the database {self.url}: {_reason(exc)}", refusal(exc)
            if kind is not None:
                raise OutboxRefused(message, reason=kind) from exc
            raise OutboxError(message) from exc
        finally:
            del self._in_flight[request]

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
                "INSERT INTO phoneagent_open_calls (call_sid, owner, run_id, call) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (call_sid) DO UPDATE SET "
                "owner = EXCLUDED.owner, run_id = EXCLUDED.run_id, call = EXCLUDED.call, "
                "transcript = '[]'::jsonb, seq = DEFAULT, opened_at = DEFAULT",
                call_sid,
                self.owner,
                self.run_id,
                jsonb_text(dict(call)),
            )

    async def add_turn(self, call_sid: str, turn: Mapping[str, Any]) -> None:
        async with self._connection() as conn:
            # A turn finished again (cut by a barge-in) replaces the latest of the same role and
            # start, as in the call's record and the SQLite outbox.
            await conn.execute(
                "UPDATE phoneagent_open_calls AS c SET transcript = COALESCE(("
                "SELECT jsonb_set(c.transcript, ARRAY[(max(t.n) - 1)::text], $1::jsonb) "
                "FROM jsonb_array_elements(c.transcript) WITH ORDINALITY AS t(e, n) "
                "WHERE t.e->'role' = $1::jsonb->'role' AND t.e->'start_ms' = $1::jsonb->'start_ms' "
                "HAVING count(*) > 0), c.transcript || jsonb_build_array($1::jsonb)) "
                "WHERE c.call_sid = $2",
                jsonb_text(dict(turn)),
                call_sid,
            )

    async def close_call(self, call_sid: str) -> None:
        async with self._connection() as conn:
            await conn.execute("DELETE FROM phoneagent_open_calls WHERE call_sid = $1", call_sid)

    async def open_calls(self) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
        # Only this instance name's. `phoneagent serve` does not end these at start-up on a
        # shared database (another process may share the name): adopt_lost_calls decides by
        # run and heartbeat instead.
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT call_sid, call, transcript::text FROM phoneagent_open_calls "
                "WHERE owner = $1 ORDER BY seq",
                self.owner,
            )
        return [(r[0], json.loads(r[1]), json.loads(r[2])) for r in rows]

    # --- liveness (delivery/liveness.py) ---------------------------------------------------

    async def heartbeat(self) -> int:
        """Record that this run is alive, now (the database's clock). Returns how many other
        runs under this instance's name have been seen since this one started: another
        process shares the name (a previous run of this instance stopped beating before)."""
        async with self._connection() as conn, conn.transaction():
            started = await conn.fetchval(
                "INSERT INTO phoneagent_instances (run_id, owner) VALUES ($1, $2) "
                "ON CONFLICT (run_id) DO UPDATE SET last_seen = now() "
                "RETURNING started_at",
                self.run_id,
                self.owner,
            )
            return await conn.fetchval(
                "SELECT count(*) FROM phoneagent_instances "
                "WHERE owner = $1 AND run_id <> $2 AND last_seen > $3",
                self.owner,
                self.run_id,
                started,
            )

    async def adopt_lost_calls(
        self, *, stale_after: float, legacy_owner: str | None = None
    ) -> list[LostCall]:
        """Take over the open calls of the runs whose heartbeat is older than ``stale_after``
        seconds, or gone: they are this run's from now on, so of two instances adopting at
        once each call goes to exactly one, and an adopter that dies before ending them leaves
        them to the next. Calls recorded with no run (by a release without heartbeats) are
        adopted once older than the longest call, or at once when their owner is
        ``legacy_owner`` (this instance starting again, as that release did). Runs that are
        gone and hold no call any more are forgotten."""
        async with self._connection() as conn, conn.transaction():
            # The runs found dead now. The UPDATE below re-checks `run_id = ANY(dead)` on each
            # row it locks, so a call another adopter took meanwhile (now its run's) is left.
            dead = await conn.fetchval(
                "SELECT coalesce(array_agg(DISTINCT c.run_id), '{}') "
                "FROM phoneagent_open_calls c WHERE c.run_id IS NOT NULL AND c.run_id <> $1 "
                "AND NOT EXISTS (SELECT 1 FROM phoneagent_instances i WHERE i.run_id = c.run_id "
                "AND i.last_seen >= now() - make_interval(secs => $2))",
                self.run_id,
                stale_after,
            )
            rows = await conn.fetch(
                "UPDATE phoneagent_open_calls AS c SET owner = $1, run_id = $2 "
                "FROM phoneagent_open_calls AS was WHERE was.call_sid = c.call_sid AND "
                "(c.run_id = ANY($3::text[]) OR (c.run_id IS NULL AND (c.owner = $4 OR "
                "c.opened_at < now() - make_interval(secs => $5)))) "
                "RETURNING c.call_sid, c.call, c.transcript::text, was.owner, c.seq",
                self.owner,
                self.run_id,
                dead,
                legacy_owner,
                LONGEST_CALL_SECONDS,
            )
            await conn.execute(
                "DELETE FROM phoneagent_instances i "
                "WHERE i.last_seen < now() - make_interval(secs => $1) "
                "AND NOT EXISTS (SELECT 1 FROM phoneagent_open_calls c WHERE c.run_id = i.run_id)",
                stale_after,
            )
        rows = sorted(rows, key=lambda r: r[4])  # in the order the calls were opened
        return [LostCall(r[0], json.loads(r[1]), json.loads(r[2]), r[3]) for r in rows]

    async def forget_instance(self) -> None:
        """This run stops (cleanly): delete its heartbeat, so any call it still holds (its end
        could not be recorded) is adopted by the others at once rather than a minute later."""
        async with self._connection() as conn:
            await conn.execute("DELETE FROM phoneagent_instances WHERE run_id = $1", self.run_id)

    # --- deliveries -----------------------------------------------------------------------

    async def claim_due(
        self,
        *,
        now: float,
        limit: int,
        lease: float,
        room: Mapping[str, int] | None = None,
        default_room: int | None = None,
    ) -> list[OutboxItem]:
        """As :meth:`Outbox.claim_due`, with the per-receiver limit counted across instances:
        ``default_room`` (the worker's ``per_destination``) is how many deliveries one receiver
        may have in flight on all instances together, so a receiver's room is ``default_room``
        less its pending rows under a live claim (``claim`` set, lease not ended), whoever holds
        them; ``room`` (the calling worker's own count) can only lower it. Receivers with no
        room are left out of the search, so a busy receiver's backlog never hides the others'.

        Claims that count room hold ``CLAIM_LOCK`` for their transaction: two instances
        counting at the same moment would each see the last place free and both take it, so
        the second waits for the first to commit, then counts (each statement of a READ
        COMMITTED transaction sees what was committed before it started). One fixed key rather
        than one per receiver: a claim learns its receivers only from the rows it reads, and
        locks taken then, one by one in whatever order the rows come, could deadlock two
        claimers; a claim is a few statements over a few milliseconds, so serialising them
        costs little at the rate calls end (a claim takes every slot free at once). Enqueues
        and marks never take the lock, and rows are still locked ``FOR UPDATE SKIP LOCKED``
        against them. Without ``default_room`` there is no limit to keep, and no lock.
        """
        if limit <= 0:
            return []
        caps = dict(room or {})
        # READ COMMITTED whatever the database's default: the count must see the claims
        # committed while this one waited for the lock, not a snapshot from before it.
        async with self._connection() as conn, conn.transaction(isolation="read_committed"):
            if default_room is not None:
                # set_config(…, true) is SET LOCAL: this transaction only.
                await conn.execute(
                    "SELECT set_config('idle_in_transaction_session_timeout', $1, true), "
                    "pg_advisory_xact_lock($2)",
                    str(CLAIM_IDLE_TIMEOUT_MS),
                    CLAIM_LOCK,
                )
                in_flight = await conn.fetch(
                    "SELECT destination, COUNT(*) FROM phoneagent_outbox "
                    f"WHERE status = '{_PENDING}' AND claim IS NOT NULL AND next_attempt_at > $1 "
                    "GROUP BY destination",
                    now,
                )
                for destination, n in in_flight:
                    caps[destination] = min(caps.get(destination, default_room), default_room - n)
            # Each receiver may take its room (at most the limit); the rows come in due order.
            takes = {d: max(0, min(n, limit)) for d, n in caps.items()}
            rows = await conn.fetch(
                _CLAIM_DUE,
                now,
                list(takes),
                list(takes.values()),
                limit if default_room is None else max(0, min(default_room, limit)),
                limit,
            )
            claimed: list[OutboxItem] = [_item(row) for row in rows]
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
            return await conn.fetchval(_NEXT_DUE, list(skip))

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


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """The pool's reset of a connection it takes back. asyncpg's default sends ``RESET ALL``,
    ``UNLISTEN *``, ``CLOSE ALL`` and ``pg_advisory_unlock_all()``: one more round trip for each
    request, for state phoneagent never leaves on a session (its settings are ``SET LOCAL``,
    its advisory locks transaction-scoped, it opens no cursor outside a transaction and never
    listens). A transaction still open (a request cancelled mid-way) is rolled back by the pool
    before this runs, whatever this does."""


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


# SQLSTATE classes (PostgreSQL's "Appendix A. Error Codes") of refusals that trying again
# cannot fix: the database answered, and would answer the same request the same way. Every other
# error is worth another try: 08 the connection (lost, refused), 53 insufficient resources (disk
# or memory full, too many connections), 57 operator intervention (the server shutting down, a
# statement cancelled), 40 a serialization failure or deadlock, and any class not named here.
_REFUSED_CLASSES = {
    "22": "data exception",  # a value the column's type refuses, or the database's encoding
    "23": "integrity constraint violation",
    "54": "program limit exceeded",  # a value past PostgreSQL's limits (a jsonb too large)
}
# Not class 42 (a permission, a table or a statement that is wrong): an operator fixes those (a
# GRANT, `phoneagent db migrate`, an upgrade), so they are retried like an outage, the instance
# unready meanwhile, rather than costing every write made until then.


def jsonb_text(value: Any) -> str:
    """``value`` as JSON text every ``jsonb`` column takes."""
    # PostgreSQL's jsonb refuses the NUL character, which a model's or a caller's text may hold:
    # it would make the write fail for ever. It is replaced, as an undecodable byte would be.
    # So are lone surrogates (half an emoji split across two model deltas: not encodable as
    # UTF-8, asyncpg's DataError) and NaN or infinities (not JSON): each such write failed for
    # ever too, the call's later changes queued behind it, the instance unready meanwhile (a
    # call record's), or the turn was missing from a lost call's report (the open-calls journal).
    return json.dumps(storable(value), ensure_ascii=False, allow_nan=False)


def storable(value: Any) -> Any:
    """``value`` with what PostgreSQL cannot store replaced (see ``jsonb_text``)."""
    if isinstance(value, str):
        # A surrogate pair split across strings and joined is made whole; a lone one is U+FFFD.
        text = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        return text.replace("\x00", "\ufffd")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(v) for v in value]
    return value


def refusal(exc: BaseException) -> str | None:
    """What kind of refusal ``exc`` is, if trying again cannot fix it (see ``_REFUSED_CLASSES``;
    a value asyncpg itself cannot send as its parameter's type is its ``DataError``, SQLSTATE
    22000); None for errors worth retrying. Names the error's class and SQLSTATE only: the
    message may quote the values refused."""
    if not isinstance(exc, asyncpg.PostgresError):
        return None
    sqlstate = str(getattr(exc, "sqlstate", "") or "")
    kind = _REFUSED_CLASSES.get(sqlstate[:2])
    return f"{type(exc).__name__} (SQLSTATE {sqlstate}: {kind})" if kind else None


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _item(row: asyncpg.Record) -> OutboxItem:
    values = list(row)
    values[5] = bytes(values[5])
    values[6] = DeliveryStatus(values[6])
    return OutboxItem(*values)


def _replace_claim(item: OutboxItem, token: str, until: float) -> OutboxItem:
    return replace(item, claim=token, next_attempt_at=until)
