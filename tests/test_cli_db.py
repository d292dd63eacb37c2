"""``phoneagent db status`` and ``phoneagent db migrate``: the shared database's schema, for
operators who migrate before deploying."""

from __future__ import annotations

import asyncio
import re

import asyncpg
from conftest import free_port

from phoneagent.cli import main
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


def test_migrate_applies_only_the_pending_step(pg_database, monkeypatch, capsys):
    async def migrated() -> None:
        box = await PostgresOutbox.open(pg_database)  # as a server at start-up
        await box.close()

    asyncio.run(migrated())
    previous = SCHEMA_VERSION - 1
    newest_tables = re.findall(r"CREATE TABLE (\w+)", MIGRATIONS[SCHEMA_VERSION])
    newest_indexes = re.findall(r"CREATE INDEX (\w+)", MIGRATIONS[SCHEMA_VERSION])
    newest_columns = re.findall(r"ALTER TABLE (\w+) ADD COLUMN (\w+)", MIGRATIONS[SCHEMA_VERSION])
    assert newest_tables or newest_indexes or newest_columns
    sql(  # back to the schema of the previous release (a table's indexes go with it)
        pg_database,
        "".join(f"DROP TABLE {table}; " for table in newest_tables)
        + "".join(f"DROP INDEX IF EXISTS {index}; " for index in newest_indexes)
        + "".join(f"ALTER TABLE {t} DROP COLUMN {c}; " for t, c in newest_columns)
        + f"UPDATE phoneagent_schema SET version = {previous}; "
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
