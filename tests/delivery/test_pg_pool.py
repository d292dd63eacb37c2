"""The PostgreSQL outbox's connection pool hands a connection back without a reset query (one
round trip less a request: phoneagent leaves no session state), and a transaction a request
left open is still rolled back. Observed from the server's side (``pg_stat_activity``)."""

from __future__ import annotations

import asyncpg
from delivery_helpers import SECRET_ENV, T0, ended_event

from phoneagent.delivery.pg_outbox import PostgresOutbox

URL = "https://a.example/hooks"


async def last_statements(database: str) -> list[str]:
    """What each of the database's other connections ran last."""
    conn = await asyncpg.connect(database)
    try:
        rows = await conn.fetch(
            "SELECT query FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return [row["query"] for row in rows]


async def test_a_connection_goes_back_to_the_pool_without_a_reset_round_trip(pg_database):
    outbox = await PostgresOutbox.open(pg_database, owner="instance-a")
    try:
        await outbox.enqueue(ended_event(), url=URL, secret_env=SECRET_ENV, now=T0)
        assert (await outbox.counts())["pending"] == 1
        (last,) = await last_statements(pg_database)
    finally:
        await outbox.close()
    # The outbox's own last statement, not asyncpg's default reset (RESET ALL, UNLISTEN *…).
    assert "phoneagent_outbox" in last, last
    assert "RESET ALL" not in last and "UNLISTEN" not in last


async def test_a_transaction_left_open_is_rolled_back_when_its_connection_goes_back(pg_database):
    outbox = await PostgresOutbox.open(pg_database, owner="instance-a")
    try:
        async with outbox._connection() as conn:
            await conn.execute("BEGIN")
            await conn.execute("SET LOCAL statement_timeout = 4321")
            await conn.execute("CREATE TABLE left_open (n int)")
        async with outbox._connection() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('left_open')") is None
            assert await conn.fetchval("SHOW statement_timeout") != "4321ms"
    finally:
        await outbox.close()
