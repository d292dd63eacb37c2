"""Call-record changes the shared database refuses for good are given up; outages are retried.

On a real PostgreSQL server: a database created ``LATIN1`` (a deployment choice PostgreSQL
allows) cannot store a caller's Chinese words, and refuses the change that carries them
(SQLSTATE 22P05) however often it is sent. That change is given up (logged without the words,
counted), the call's later changes are written, and the instance stays ready. The errors that
are and are not worth a retry are told apart on errors the server really raises."""

from __future__ import annotations

import asyncio
import secrets

import asyncpg
import pytest
import structlog

from phoneagent.delivery.outbox import OutboxError, OutboxRefused
from phoneagent.delivery.pg_outbox import PostgresOutbox
from phoneagent.metrics import Metrics
from phoneagent.records import Answered, CallRecords, TurnFinished, TwilioReported
from phoneagent.records.postgres import PostgresCallRecords

SID = "CA" + "2" * 32
CHINESE_TURN = {"role": "caller", "text": "我想预约下周二洗牙。", "start_ms": 0, "end_ms": 1800,
                "interrupted": False}  # fmt: skip
LATIN_TURN = {"role": "agent", "text": "Tuesday at ten, then.", "start_ms": 2000,
              "end_ms": 3200, "interrupted": False}  # fmt: skip


@pytest.fixture
async def latin1_database(postgres_url):
    name = f"t_latin1_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(
            f"CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )
        yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def settled(calls: CallRecords, seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while calls.pending:
            await asyncio.sleep(0.01)


async def test_a_change_refused_for_good_is_given_up_and_the_calls_later_changes_go_on(
    latin1_database,
):
    outbox = await PostgresOutbox.open(latin1_database)
    try:
        store = PostgresCallRecords(outbox)
        metrics = Metrics(active_calls=lambda: 0)
        calls = CallRecords(store, on_unshared=metrics.call_records_unshared.inc)
        with structlog.testing.capture_logs() as logs:
            calls.note(SID, Answered("dental", "+14155550123", "+14155550100"))
            calls.note(SID, TurnFinished(CHINESE_TURN))  # refused: LATIN1 has no such letters
            calls.note(SID, TurnFinished(LATIN_TURN))
            calls.note(SID, TwilioReported({"CallSid": SID, "CallStatus": "completed"}))
            await settled(calls)

        record = await store.get(SID)  # at once: the refusal did not mark the database away
        assert record is not None
        assert (record.persona, record.caller, record.status) == (
            "dental",
            "+14155550123",
            "completed",
        )
        assert [t["text"] for t in record.transcript] == [LATIN_TURN["text"]]
        assert calls.problem is None  # ready
        assert metrics.registry.get_sample_value("phoneagent_call_records_unshared_total") == 1
        # This instance's own view keeps the words.
        assert [t["text"] for t in calls.get(SID).transcript] == [
            CHINESE_TURN["text"],
            LATIN_TURN["text"],
        ]

        given_up = [e for e in logs if e["event"] == "call_record_not_shared"]
        assert len(given_up) == 1, logs
        assert given_up[0]["log_level"] == "error"
        assert given_up[0]["call_sid"] == SID and given_up[0]["change"] == "TurnFinished"
        assert "22P05" in given_up[0]["reason"]
        logged = repr(logs)
        assert "预约" not in logged and "\\xe6" not in logged.lower()  # not its words, nor bytes
        assert not [e for e in logs if e["event"] == "call_record_write_failed"]  # no retry
    finally:
        await outbox.close()


async def test_a_write_that_times_out_is_retried_until_it_lands(pg_database, monkeypatch):
    monkeypatch.setattr("phoneagent.records.call_records.RETRY_FIRST", 0.01)
    monkeypatch.setattr("phoneagent.delivery.pg_round_trip.ROUND_TRIP_SECONDS", 0.3)
    monkeypatch.setattr("phoneagent.delivery.pg_round_trip.AWAY_SECONDS", 0.1)
    outbox = await PostgresOutbox.open(pg_database)
    try:
        store = PostgresCallRecords(outbox)
        unshared = []
        calls = CallRecords(store, on_unshared=lambda: unshared.append(1))
        calls.note(SID, Answered("dental", "+14155550123", "+14155550100"))
        await settled(calls)
        # Another session holds the call's row: the next write waits past its round trip's
        # budget, fails, and is retried (never given up) until the row is free.
        other = await asyncpg.connect(pg_database)
        try:
            with structlog.testing.capture_logs() as logs:
                async with other.transaction():
                    await other.execute(
                        "SELECT 1 FROM phoneagent_calls WHERE call_sid = $1 FOR UPDATE", SID
                    )
                    calls.note(SID, TurnFinished(LATIN_TURN))
                    await asyncio.sleep(1.0)
                    assert calls.problem is not None and calls.pending == 1  # unready meanwhile
                await settled(calls)
        finally:
            await other.close()
        events = [e["event"] for e in logs]
        assert events[0] == "call_record_write_failed" and "call_record_writes_resumed" in events
        assert "call_record_not_shared" not in events
        assert [t["text"] for t in (await store.get(SID)).transcript] == [LATIN_TURN["text"]]
        assert calls.problem is None and unshared == []
    finally:
        await outbox.close()


def raise_with(sqlstate: str) -> str:
    return f"DO $$ BEGIN RAISE EXCEPTION 'refused' USING ERRCODE = '{sqlstate}'; END $$"


REFUSED = {
    "division by zero (22012)": ("SELECT 1 / 0", ()),
    "not a number (22P02)": ("SELECT 'ten'::int", ()),
    # asyncpg refuses to send it as an int4, as a data exception of its own (22000).
    "out of range for its parameter (22000)": ("SELECT $1::int", (2**40,)),
    "numeric field overflow (22003)": ("SELECT 1e10::numeric(3, 0)", ()),
    "longer than its column (22001)": ("INSERT INTO t VALUES (5, 'abcd')", ()),
    "unique violation (23505)": ("INSERT INTO t VALUES (1), (1)", ()),
    "not null violation (23502)": ("INSERT INTO t VALUES (NULL)", ()),
    "program limit exceeded (54000)": (raise_with("54000"), ()),
}
RETRIED = {
    # An operator's to fix (a GRANT, a migration): given up, every write until then would be lost.
    "syntax error (42601)": "SELEC 1",
    "undefined table (42P01)": "SELECT * FROM no_such_table",
    "permission denied (42501)": raise_with("42501"),
    "serialization failure (40001)": raise_with("40001"),
    "deadlock (40P01)": raise_with("40P01"),
    "disk full (53100)": raise_with("53100"),
    "too many connections (53300)": raise_with("53300"),
    "connection failure (08006)": raise_with("08006"),
    "cannot connect now (57P03)": raise_with("57P03"),
    "statement cancelled (57014)": "SET statement_timeout = 20; SELECT pg_sleep(2)",
    "server shutting down (57P01)": "SELECT pg_terminate_backend(pg_backend_pid())",
}


async def test_refusals_and_outages_are_told_apart_by_their_error_class(pg_database):
    outbox = await PostgresOutbox.open(pg_database)
    try:
        async with outbox.connection() as conn:
            await conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, code VARCHAR(3))")
        for name, (sql, args) in REFUSED.items():
            with pytest.raises(OutboxRefused) as refused:
                async with outbox.connection() as conn:
                    await conn.execute(sql, *args)
                pytest.fail(f"{name}: no error")
            sqlstate = name[-6:-1]
            reason = refused.value.reason
            assert f"SQLSTATE {sqlstate}" in reason, (name, reason)
            assert "2**40" not in reason and "1099511627776" not in reason  # never the value
        for name, sql in RETRIED.items():
            with pytest.raises(OutboxError) as failed:
                async with outbox.connection() as conn:
                    await conn.execute(sql)
                pytest.fail(f"{name}: no error")
            assert not isinstance(failed.value, OutboxRefused), (name, failed.value)
    finally:
        await outbox.close()
