"""``phoneagent db status`` and ``phoneagent db migrate``: the shared database's schema, for
operators who migrate before deploying."""

from __future__ import annotations

import asyncio
import re

import asyncpg
from conftest import free_port

from phoneagent.cli import main
from phoneagent.delivery.events import call_ended_event
from phoneagent.delivery.pg_outbox import MIGRATIONS, SCHEMA_VERSION, PostgresOutbox


def sql(url: str, statement: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def test_a_fresh_database_is_behind_then_migrated(pg_database, monkeypatch, capsys):
    monkeypatch.setenv("PHONEAGENT_DATABASE_URL", pg_database)
    assert main(["db", "status"]) == 1
    captured = capsys.readouterr()
    assert f"schema version 0, latest {SCHEMA_VERSION}" in captured.out
    assert "phoneagent db migrate" in captured.err
    assert main(["db", "migrate"]) == 0
    assert f"schema version {SCHEMA_VERSION}" in capsys.readouterr().out
    assert main(["db", "status"]) == 0
    assert f"schema version {SCHEMA_VERSION}, latest {SCHEMA_VERSION}" in capsys.readouterr().out
    assert main(["db", "migrate"]) == 0  # nothing left to do: still fine


def undo(step: str) -> str:
    """SQL that takes a migration step back: what it created is dropped (indexes, added
    columns, tables)."""
    drops = [f"DROP INDEX IF EXISTS {name}; " for name in re.findall(r"CREATE INDEX (\w+)", step)]
    drops += [
        f"ALTER TABLE {table} DROP COLUMN {column}; "
        for table, column in re.findall(r"ALTER TABLE (\w+) ADD COLUMN (\w+)", step)
    ]
    drops += [f"DROP TABLE {table}; " for table in re.findall(r"CREATE TABLE (\w+)", step)]
    return "".join(drops)


def test_migrate_applies_only_the_pending_step(pg_database, monkeypatch, capsys):
    async def migrated() -> None:
        box = await PostgresOutbox.open(pg_database)  # as a server at start-up
        await box.close()

    asyncio.run(migrated())
    previous = SCHEMA_VERSION - 1
    assert undo(MIGRATIONS[SCHEMA_VERSION])
    sql(  # back to the schema of the previous release
        pg_database,
        undo(MIGRATIONS[SCHEMA_VERSION]) + f"UPDATE phoneagent_schema SET version = {previous}; "
        f"DELETE FROM phoneagent_migrations WHERE version > {previous}",
    )
    monkeypatch.setenv("PHONEAGENT_DATABASE_URL", pg_database)
    assert main(["db", "status"]) == 1
    assert f"schema version {previous}, latest {SCHEMA_VERSION}" in capsys.readouterr().out
    assert main(["db", "migrate"]) == 0
    assert main(["db", "status"]) == 0

    async def applied() -> list[int]:
        conn = await asyncpg.connect(pg_database)
        try:
            rows = await conn.fetch("SELECT version FROM phoneagent_migrations ORDER BY version")
            return [r[0] for r in rows]
        finally:
            await conn.close()

    assert asyncio.run(applied()) == list(range(1, SCHEMA_VERSION + 1))


def test_events_queued_before_step_4_are_found_by_their_call_after_it(pg_database):
    event = call_ended_event(
        call_sid="CA" + "7" * 32, persona_id="p", persona_name="P", from_number="+1",
        to_number="+2", started_at=1.0, ended_at=2.0, end_reason="caller_hung_up",
        transcript=[{"role": "caller", "start_ms": 0, "end_ms": 1,
                     "text": 'nul \x00, ü and "data":{"call_sid":"CA' + "9" * 32 + '"}'}],
    )  # fmt: skip

    async def run() -> list[str]:
        box = await PostgresOutbox.open(pg_database)
        await box.close()
        conn = await asyncpg.connect(pg_database)
        try:
            await conn.execute(
                # Every step after 5 taken back, the latest first.
                "".join(undo(MIGRATIONS[v]) for v in range(SCHEMA_VERSION, 5, -1))
                + "UPDATE phoneagent_schema SET version = 5; "
                "DELETE FROM phoneagent_migrations WHERE version > 5"
            )
            await conn.execute(  # as version 5 queued it
                "INSERT INTO phoneagent_outbox (id, type, url, destination, secret_env, body, "
                "status, created_at, next_attempt_at) VALUES ($1, 'call.ended', 'https://a/', "
                "'https://a:443', 'S', $2, 'pending', 1, 1)",
                event.id,
                event.body(),
            )
        finally:
            await conn.close()
        box = await PostgresOutbox.open(pg_database)  # migrates to the latest
        try:
            return [item.id for item in await box.for_call("CA" + "7" * 32)]
        finally:
            await box.close()

    assert asyncio.run(run()) == [event.id]


def test_a_newer_schema_is_reported(pg_database, monkeypatch, capsys):
    monkeypatch.setenv("PHONEAGENT_DATABASE_URL", pg_database)
    assert main(["db", "migrate"]) == 0
    sql(pg_database, "UPDATE phoneagent_schema SET version = 99")
    assert main(["db", "status"]) == 1
    assert "newer than this phoneagent" in capsys.readouterr().err
    assert main(["db", "migrate"]) == 2
    assert "upgrade phoneagent" in capsys.readouterr().err


def test_a_database_that_is_down_exits_2_without_the_password(monkeypatch, capsys):
    url = f"postgresql://phoneagent:hunter2secret@127.0.0.1:{free_port()}/calls"
    monkeypatch.setenv("PHONEAGENT_DATABASE_URL", url)
    for command in ("status", "migrate"):
        assert main(["db", command]) == 2
        err = capsys.readouterr().err
        assert "cannot connect to the database postgresql://phoneagent:***@127.0.0.1" in err
        assert "hunter2secret" not in err


def test_without_a_database_url_db_says_so(monkeypatch, capsys):
    monkeypatch.delenv("PHONEAGENT_DATABASE_URL", raising=False)
    assert main(["db", "status"]) == 2
    assert "PHONEAGENT_DATABASE_URL is not set" in capsys.readouterr().err
