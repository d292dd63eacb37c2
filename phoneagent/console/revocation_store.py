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

import asyncio
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from phoneagent.console.revocations import RevocationList, RevocationStore, learned
from phoneagent.delivery.outbox import DEFAULT_BUSY_TIMEOUT, Outbox, OutboxError

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

T = TypeVar("T")


class SQLiteRevocations:
    """Revocations in ``console_sessions.sqlite3`` of a data directory, created at the first
    sign-out. SQLite runs on a private thread: the event loop carries live call audio."""

    def __init__(self, path: Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="console-sessions-sqlite")
        self._db: sqlite3.Connection | None = None  # touched only on the executor's thread

    @classmethod
    def in_data_dir(cls, data_dir: Path | str, **options: Any) -> SQLiteRevocations:
        return cls(Path(data_dir) / REVOCATIONS_FILENAME, **options)

    async def read(self, now: float) -> RevocationList:
        if not self.path.exists():  # nothing was ever revoked: no file to make for a read
            return RevocationList()
        return await self._run(self._read, now)

    async def write(self, revocations: RevocationList, now: float) -> None:
        await self._run(self._write, revocations, now)

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
        self._executor.shutdown(wait=False)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except RuntimeError as exc:  # the executor was shut down: close() ran
            raise OutboxError(f"the console session store {self.path} is closed") from exc
        except sqlite3.Error as exc:
            raise OutboxError(f"the console session store {self.path}: {exc}") from None

    def _read(self, now: float) -> RevocationList:
        db = self._connection()
        sessions = db.execute(
            "SELECT session_id, expires_at FROM revoked_sessions WHERE expires_at > ?", (now,)
        ).fetchall()
        before = db.execute("SELECT before FROM signed_out").fetchone()
        return learned(dict(sessions), before[0] if before else None)

    def _write(self, revocations: RevocationList, now: float) -> None:
        db = self._connection()
        with db:  # one transaction
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

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))  # owner only
                db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SQLITE_SCHEMA_VERSION:
                    db.close()
                    raise OutboxError(
                        f"{self.path} was written by a newer phoneagent (console session "
                        f"schema {version}, this version reads {SQLITE_SCHEMA_VERSION}): upgrade it"
                    )
                db.executescript(_SQLITE_SCHEMA)
                db.execute(f"PRAGMA user_version={SQLITE_SCHEMA_VERSION}")
            except (OSError, sqlite3.Error) as exc:
                raise OutboxError(
                    f"cannot open the console session store {self.path} ({exc}): set "
                    "PHONEAGENT_DATA_DIR to a directory this process can write"
                ) from None
            self._db = db
        return self._db


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
