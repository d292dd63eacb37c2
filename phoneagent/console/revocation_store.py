"""Where revoked console sessions are kept (``revocations.py`` reads and writes them): the same
store as API keys. A file of their own in ``PHONEAGENT_DATA_DIR`` by default
(``console_sessions.sqlite3``: one instance's, kept across its restarts), the shared PostgreSQL
database when ``PHONEAGENT_DATABASE_URL`` is set (tables ``phoneagent_console_revoked`` and
``phoneagent_console_signed_out``, migration step 9 in ``delivery/pg_outbox.py``), which every
instance reads.

A row is a session's id (the SHA-256 of its random part, never the token) and its expiry, and
is deleted once expired; "sign out everywhere" is one row, the time before which every session
is revoked.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from phoneagent.console.revocations import RevocationList, RevocationStore, learned
from phoneagent.delivery.outbox import Outbox
from phoneagent.delivery.private_sqlite import PrivateSQLite

if TYPE_CHECKING:
    from phoneagent.delivery.pg_outbox import PostgresOutbox

__all__ = [
    "REVOCATIONS_FILENAME",
    "PostgresRevocations",
    "SQLiteRevocations",
    "revocation_store",
]

REVOCATIONS_FILENAME = "console_sessions.sqlite3"
SQLITE_SCHEMA_VERSION = 1
_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS revoked_sessions (
    session_id TEXT PRIMARY KEY,  -- SHA-256 (hex) of the token's random part
    expires_at REAL NOT NULL
);
-- One row at most: every session issued before `before` is revoked.
CREATE TABLE IF NOT EXISTS signed_out (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    before REAL NOT NULL
);
"""


class SQLiteRevocations(PrivateSQLite):
    """Revocations in ``console_sessions.sqlite3`` of a data directory, created at the first
    sign-out."""

    FILENAME = REVOCATIONS_FILENAME
    WHAT = "the console session store"
    SCHEMA = _SQLITE_SCHEMA
    SCHEMA_VERSION = SQLITE_SCHEMA_VERSION

    async def read(self, now: float) -> RevocationList:
        if not self.path.exists():  # nothing was ever revoked: no file to make for a read
            return RevocationList()
        return await self._run(self._read, now)

    async def write(self, revocations: RevocationList, now: float) -> None:
        await self._run(self._write, revocations, now)

    def _read(self, now: float) -> RevocationList:
        db = self._connection()
        sessions = db.execute(
            "SELECT session_id, expires_at FROM revoked_sessions WHERE expires_at > ?", (now,)
        ).fetchall()
        before = db.execute("SELECT before FROM signed_out").fetchone()
        return learned(dict(sessions), before[0] if before else None)

    def _write(self, revocations: RevocationList, now: float) -> None:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")  # one transaction (the connection commits each statement)
        try:
            db.executemany(
                "INSERT INTO revoked_sessions (session_id, expires_at) VALUES (?, ?) "
                "ON CONFLICT (session_id) DO NOTHING",
                list(revocations.sessions.items()),
            )
            if revocations.signed_out_before:
                db.execute(
                    "INSERT INTO signed_out (id, before) VALUES (1, ?) ON CONFLICT (id) "
                    "DO UPDATE SET before = max(before, excluded.before)",
                    (revocations.signed_out_before,),
                )
            db.execute("DELETE FROM revoked_sessions WHERE expires_at <= ?", (now,))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


class PostgresRevocations:
    """Revocations in the shared database, on the outbox's pool; each read or write is one
    round trip within ``pg_round_trip``'s budget (a silent database fails it, it does not hold
    the request)."""

    def __init__(self, outbox: PostgresOutbox) -> None:
        from phoneagent.delivery.pg_round_trip import RoundTrips

        self._db = RoundTrips(outbox)

    async def read(self, now: float) -> RevocationList:
        async with self._db.connection() as conn:
            # One round trip: the sign-out-everywhere row is the one without a session id.
            rows = await conn.fetch(
                "SELECT session_id, expires_at FROM phoneagent_console_revoked "
                "WHERE expires_at > $1 "
                "UNION ALL SELECT NULL, before FROM phoneagent_console_signed_out",
                now,
            )
        sessions = {row[0]: row[1] for row in rows if row[0] is not None}
        return learned(sessions, next((row[1] for row in rows if row[0] is None), None))

    async def write(self, revocations: RevocationList, now: float) -> None:
        ids = list(revocations.sessions)
        async with self._db.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO phoneagent_console_revoked (session_id, expires_at) "
                "SELECT * FROM unnest($1::text[], $2::double precision[]) "
                "ON CONFLICT (session_id) DO NOTHING",
                ids,
                [revocations.sessions[i] for i in ids],
            )
            if revocations.signed_out_before:
                await conn.execute(
                    "INSERT INTO phoneagent_console_signed_out (id, before) VALUES (TRUE, $1) "
                    "ON CONFLICT (id) DO UPDATE SET before = "
                    "GREATEST(phoneagent_console_signed_out.before, EXCLUDED.before)",
                    revocations.signed_out_before,
                )
            await conn.execute("DELETE FROM phoneagent_console_revoked WHERE expires_at <= $1", now)

    async def close(self) -> None:
        """Nothing of its own: the pool is the outbox's, closed with it."""


def revocation_store(outbox: Outbox | None, data_dir: Path | str) -> RevocationStore:
    """The server's revocation store: the database of a PostgreSQL outbox, else the data
    directory's file."""
    if type(outbox).__name__ == "PostgresOutbox":  # not imported: asyncpg only when used
        from phoneagent.delivery.pg_outbox import PostgresOutbox

        assert isinstance(outbox, PostgresOutbox)
        return PostgresRevocations(outbox)
    return SQLiteRevocations.in_data_dir(data_dir)
