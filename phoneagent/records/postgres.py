"""Call records in the PostgreSQL database every instance shares (``PHONEAGENT_DATABASE_URL``).

Each change is one upsert on ``phoneagent_calls`` that sets only what the change says (see
``record.apply``, which this mirrors), so steps written by different instances (the voice
webhook here, the stream there, a status callback anywhere) never overwrite each other, and a
turn is appended to the transcript where it lies. The store uses the outbox's pool and schema
(migration step 3; step 6 indexes the searches, step 7 adds the call's context), like the
replay defences, and the same budget per round trip (``delivery/pg_round_trip.py``): a silent
database never holds a webhook or a call.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from phoneagent.delivery.outbox import OutboxError
from phoneagent.delivery.pg_outbox import PostgresOutbox, _count, jsonb_text, storable
from phoneagent.delivery.pg_round_trip import RoundTrips
from phoneagent.records.record import (
    FINAL_STATUSES,
    TWILIO_EVENTS_KEPT,
    Answered,
    CallRecord,
    Change,
    StreamEnded,
    StreamStarted,
    TransferNotAnswered,
    Transferred,
    TurnFinished,
    TwilioReported,
)

__all__ = ["PostgresCallRecords"]

_FINAL = ", ".join(f"'{status}'" for status in sorted(FINAL_STATUSES))

# Each statement: $1 call_sid, $2 updated_at, then the change's values. "c" is the row as it was.
_UPSERT = (
    "INSERT INTO phoneagent_calls AS c (call_sid, updated_at{columns}) VALUES ($1, $2{values}) "
)
_ON_CONFLICT = "ON CONFLICT (call_sid) DO UPDATE SET updated_at = EXCLUDED.updated_at, "

# The context is set as a whole, once: by the first webhook that gives a direction.
_CONTEXT_UNSET = "c.direction = '' AND EXCLUDED.direction <> ''"
_ANSWERED = (
    _UPSERT.format(
        columns=", persona, caller, called, direction, variables, metadata",
        values=", $3, $4, $5, $6, $7::jsonb, $8::jsonb",
    )
    + _ON_CONFLICT
    + "persona = CASE WHEN c.persona = '' THEN EXCLUDED.persona ELSE c.persona END, "
    "caller = CASE WHEN c.caller = '' THEN EXCLUDED.caller ELSE c.caller END, "
    "called = CASE WHEN c.called = '' THEN EXCLUDED.called ELSE c.called END, "
    f"direction = CASE WHEN {_CONTEXT_UNSET} THEN EXCLUDED.direction ELSE c.direction END, "
    f"variables = CASE WHEN {_CONTEXT_UNSET} THEN EXCLUDED.variables ELSE c.variables END, "
    f"metadata = CASE WHEN {_CONTEXT_UNSET} THEN EXCLUDED.metadata ELSE c.metadata END"
)
_STREAM_STARTED = (
    _UPSERT.format(
        columns=", started_at, persona, model_session, caller, called, status",
        values=", $3, $4, $5, $6, $7, 'in-progress'",
    )
    + _ON_CONFLICT
    + "started_at = EXCLUDED.started_at, ended_at = NULL, end_reason = NULL, "
    "persona = EXCLUDED.persona, model_session = EXCLUDED.model_session, "
    "caller = CASE WHEN EXCLUDED.caller = '' THEN c.caller ELSE EXCLUDED.caller END, "
    "called = CASE WHEN EXCLUDED.called = '' THEN c.called ELSE EXCLUDED.called END, "
    f"status = CASE WHEN c.status IN ({_FINAL}) THEN c.status ELSE 'in-progress' END"
)
# A turn finished again (cut by a barge-in) replaces the one of the same role and start.
_SAME_TURN = "e->'role' = $3::jsonb->'role' AND e->'start_ms' = $3::jsonb->'start_ms'"
_TURN_FINISHED = (
    _UPSERT.format(columns=", transcript", values=", jsonb_build_array($3::jsonb)")
    + _ON_CONFLICT
    + "transcript = CASE WHEN EXISTS (SELECT 1 FROM jsonb_array_elements(c.transcript) AS e "
    f"WHERE {_SAME_TURN}) THEN (SELECT jsonb_agg(CASE WHEN {_SAME_TURN} THEN $3::jsonb "
    "ELSE e END ORDER BY n) FROM jsonb_array_elements(c.transcript) WITH ORDINALITY AS t(e, n)) "
    "ELSE c.transcript || jsonb_build_array($3::jsonb) END"
)
_TWILIO_REPORTED = (
    _UPSERT.format(
        columns=", twilio_events, status",
        values=", jsonb_build_array($3::jsonb), COALESCE($4, 'ringing')",
    )
    + _ON_CONFLICT
    # The latest TWILIO_EVENTS_KEPT only: the oldest is dropped once the record holds that many.
    + "twilio_events = CASE WHEN jsonb_array_length(c.twilio_events) >= "
    f"{TWILIO_EVENTS_KEPT} THEN (c.twilio_events - 0) ELSE c.twilio_events END "
    "|| jsonb_build_array($3::jsonb), "
    # A late callback (Twilio's are not sent in order) does not turn a final status back.
    f"status = CASE WHEN c.status IN ({_FINAL}) AND $4::text NOT IN ({_FINAL}) THEN c.status "
    "ELSE COALESCE($4, c.status) END"
)
_TRANSFERRED = (
    _UPSERT.format(columns=", transfer", values=", $3::jsonb")
    + _ON_CONFLICT
    + "transfer = EXCLUDED.transfer"
)
_TRANSFER_NOT_ANSWERED = (
    _UPSERT.format(columns="", values="")
    + _ON_CONFLICT
    + "transfer = CASE WHEN jsonb_typeof(c.transfer) = 'object' "
    "THEN c.transfer || jsonb_build_object('error', $3::text) ELSE c.transfer END"
)
_STREAM_ENDED = (
    _UPSERT.format(
        columns=", ended_at, end_reason, transcript, stats",
        values=", $3, $4, $5::jsonb, $6::jsonb",
    )
    + _ON_CONFLICT
    + "ended_at = EXCLUDED.ended_at, end_reason = EXCLUDED.end_reason, "
    "transcript = EXCLUDED.transcript, stats = EXCLUDED.stats, "
    "status = CASE WHEN c.status = 'in-progress' THEN 'completed' ELSE c.status END"
)

_COLUMNS = (
    "call_sid, persona, model_session, caller, called, status, started_at, ended_at, "
    "end_reason, transfer, transcript, twilio_events, stats, direction, variables, metadata"
)

# When a call happened, for searches: its stream's start, else its last change (a call that
# never reached the agent). Spelled exactly as in the index of migration step 6, which serves
# both the order and the date range.
_CALL_TIME = "COALESCE(started_at, updated_at)"

_LIVE = (
    f"SELECT {_COLUMNS} FROM phoneagent_calls WHERE started_at IS NOT NULL AND ended_at IS NULL "
    "AND updated_at >= $1 ORDER BY started_at DESC, call_sid DESC LIMIT $2"
)
# strpos, not LIKE: what the operator typed is matched as it is, never as a pattern.
_SEARCH = (
    f"SELECT {_COLUMNS} FROM phoneagent_calls "
    "WHERE ($1::text IS NULL OR strpos(caller, $1) > 0 OR strpos(called, $1) > 0) "
    "AND ($2::text IS NULL OR persona = $2) "
    f"AND ($3::float8 IS NULL OR {_CALL_TIME} >= $3) "
    f"AND ($4::float8 IS NULL OR {_CALL_TIME} < $4) "
    f"ORDER BY {_CALL_TIME} DESC, call_sid DESC LIMIT $5"
)


class PostgresCallRecords:
    """:class:`~phoneagent.records.store.CallRecordStore` on the shared database."""

    def __init__(self, outbox: PostgresOutbox) -> None:
        self._db = RoundTrips(outbox)

    async def write(self, call_sid: str, change: Change, *, at: float) -> None:
        statement, values = _statement(change)
        # Text columns refuse NUL and lone surrogates as jsonb does (a model's session id holding
        # one failed the call's writes for ever): made storable as the JSON values are.
        values = tuple(storable(v) if isinstance(v, str) else v for v in values)
        async with self._db.connection() as conn:
            await conn.execute(statement, storable(call_sid), at, *values)

    async def get(self, call_sid: str) -> CallRecord | None:
        async with self._db.connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM phoneagent_calls WHERE call_sid = $1", call_sid
            )
        return _record(row) if row is not None else None

    async def purge(self, *, before: float) -> int:
        async with self._db.connection() as conn:
            result = await conn.execute(
                "DELETE FROM phoneagent_calls WHERE updated_at < $1", before
            )
        return _count(result)

    async def live(self, limit: int = 100, *, updated_since: float) -> list[CallRecord]:
        async with self._db.connection() as conn:
            rows = await conn.fetch(_LIVE, updated_since, limit)
        return [_record(row) for row in rows]

    async def search(
        self,
        number: str | None = None,
        persona: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
    ) -> list[CallRecord]:
        async with self._db.connection() as conn:
            rows = await conn.fetch(_SEARCH, number or None, persona or None, since, until, limit)
        return [_record(row) for row in rows]


def _statement(change: Change) -> tuple[str, tuple[Any, ...]]:
    match change:
        case Answered():
            return _ANSWERED, (
                change.persona,
                change.caller,
                change.called,
                change.direction,
                jsonb_text(change.variables),
                jsonb_text(change.metadata),
            )
        case StreamStarted():
            return _STREAM_STARTED, (
                change.at,
                change.persona,
                change.model_session,
                change.caller,
                change.called,
            )
        case TurnFinished():
            return _TURN_FINISHED, (jsonb_text(change.turn),)
        case TwilioReported():
            status = change.event.get("CallStatus")
            return _TWILIO_REPORTED, (jsonb_text(change.event), status)
        case Transferred():
            transfer = jsonb_text(change.transfer) if change.transfer is not None else None
            return _TRANSFERRED, (transfer,)
        case TransferNotAnswered():
            return _TRANSFER_NOT_ANSWERED, (change.status,)
        case StreamEnded():
            return _STREAM_ENDED, (
                change.at,
                change.end_reason,
                jsonb_text(change.transcript),
                jsonb_text(change.stats),
            )
    raise OutboxError(f"not a call-record change: {change!r}")


def _record(row: asyncpg.Record) -> CallRecord:
    values = dict(row)
    for column in ("transfer", "transcript", "twilio_events", "stats", "variables", "metadata"):
        if values[column] is not None:
            values[column] = json.loads(values[column])
    return CallRecord(**values)
