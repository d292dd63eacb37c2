"""Where API keys are kept: the same store as the webhook outbox. A file of their own in
``PHONEAGENT_DATA_DIR`` by default (``api_keys.sqlite3``), the shared PostgreSQL database when
``PHONEAGENT_DATABASE_URL`` is set (table ``phoneagent_api_keys``, migration step 8 in
``delivery/pg_outbox.py``).

The server reads a key from the store at every request, with no cache: ``phoneagent keys
revoke`` (another process, possibly another host) holds on every instance from the next request.
A read is one primary-key lookup: microseconds in SQLite, one round trip to PostgreSQL (within
``pg_round_trip``'s budget, so a silent database refuses the request rather than holds it).

SQLite runs on a private thread, as the outbox does: the event loop carries live call audio.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from phoneagent.api.keys import ApiKey
from phoneagent.delivery.outbox import Outbox, OutboxError
from phoneagent.delivery.private_sqlite import PrivateSQLite

if TYPE_CHECKING:
    from phoneagent.delivery.pg_outbox import PostgresOutbox

__all__ = [
    "KEYS_FILENAME",
    "ApiKeyStore",
    "PostgresApiKeys",
    "SQLiteApiKeys",
    "api_key_store",
    "open_api_key_store",
]

KEYS_FILENAME = "api_keys.sqlite3"
SQLITE_SCHEMA_VERSION = 1
_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    personas TEXT NOT NULL,  -- a JSON array of persona ids; [] for every persona
    key_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
)
"""
_COLUMNS = "id, name, personas, key_hash, created_at, revoked_at"


class ApiKeyStore(Protocol):
    """Errors reaching the store come out as ``OutboxError``, naming the file or database."""

    async def add(self, key: ApiKey) -> None: ...

    async def get(self, key_id: str) -> ApiKey | None: ...

    async def list(self) -> list[ApiKey]:
        """Every key, revoked ones too, oldest first."""
        ...

    async def revoke(self, key_id: str, *, at: float) -> ApiKey | None:
        """Revoke the key (a key already revoked keeps its first time); None if there is none."""
        ...

    async def close(self) -> None: ...


class SQLiteApiKeys(PrivateSQLite):
    """Keys in ``api_keys.sqlite3`` of a data directory: the file is created at the first use,
    so a server that never sees an API request never writes it."""

    FILENAME = KEYS_FILENAME
    WHAT = "the API key store"
    SCHEMA = _SQLITE_SCHEMA
    SCHEMA_VERSION = SQLITE_SCHEMA_VERSION

    async def add(self, key: ApiKey) -> None:
        await self._run(
            self._write,
            f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (key.id, key.name, json.dumps(key.personas), key.key_hash, key.created_at, None),
        )

    async def get(self, key_id: str) -> ApiKey | None:
        rows = await self._run(self._read, f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?",
                               (key_id,))  # fmt: skip
        return _key(rows[0]) if rows else None

    async def list(self) -> list[ApiKey]:
        rows = await self._run(self._read, f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at",
                               ())  # fmt: skip
        return [_key(row) for row in rows]

    async def revoke(self, key_id: str, *, at: float) -> ApiKey | None:
        await self._run(
            self._write,
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (at, key_id),
        )
        return await self.get(key_id)

    def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise OutboxError(f"the API key store {self.path}: {exc}") from None

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        try:
            self._connection().execute(sql, params)
        except sqlite3.Error as exc:
            raise OutboxError(f"the API key store {self.path}: {exc}") from None


class PostgresApiKeys:
    """Keys in the shared database, on the outbox's pool; every round trip within its budget."""

    def __init__(self, outbox: PostgresOutbox) -> None:
        from phoneagent.delivery.pg_round_trip import RoundTrips

        self._db = RoundTrips(outbox)

    async def add(self, key: ApiKey) -> None:
        async with self._db.connection() as conn:
            await conn.execute(
                f"INSERT INTO phoneagent_api_keys ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, NULL)",
                key.id, key.name, list(key.personas), key.key_hash, key.created_at,
            )  # fmt: skip

    async def get(self, key_id: str) -> ApiKey | None:
        async with self._db.connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM phoneagent_api_keys WHERE id = $1", key_id
            )
        return _key(tuple(row)) if row is not None else None

    async def list(self) -> list[ApiKey]:
        async with self._db.connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM phoneagent_api_keys ORDER BY created_at"
            )
        return [_key(tuple(row)) for row in rows]

    async def revoke(self, key_id: str, *, at: float) -> ApiKey | None:
        async with self._db.connection() as conn:
            row = await conn.fetchrow(
                "UPDATE phoneagent_api_keys SET revoked_at = COALESCE(revoked_at, $2) "
                f"WHERE id = $1 RETURNING {_COLUMNS}",
                key_id,
                at,
            )
        return _key(tuple(row)) if row is not None else None

    async def close(self) -> None:
        """Nothing of its own: the pool is the outbox's, closed with it."""


def _key(row: tuple[Any, ...]) -> ApiKey:
    key_id, name, personas, key_hash, created_at, revoked_at = row
    if isinstance(personas, str):  # SQLite's JSON text; PostgreSQL gives its array as a list
        personas = json.loads(personas)
    return ApiKey(key_id, name, tuple(personas), key_hash, created_at, revoked_at)


def api_key_store(outbox: Outbox | None, data_dir: Path | str) -> ApiKeyStore:
    """The server's key store: the database of a PostgreSQL outbox, else the data directory's
    file (also without an outbox: a server that delivers no webhooks still serves the API)."""
    if type(outbox).__name__ == "PostgresOutbox":  # not imported: asyncpg only when used
        from phoneagent.delivery.pg_outbox import PostgresOutbox

        assert isinstance(outbox, PostgresOutbox)
        return PostgresApiKeys(outbox)
    return SQLiteApiKeys.in_data_dir(data_dir)


async def open_api_key_store(
    data_dir: Path | str, database_url: str = ""
) -> tuple[ApiKeyStore, Callable[[], Any]]:
    """For the ``keys`` commands: the configured store, and what closes it (with PostgreSQL,
    the outbox opened for its pool, which migrates the schema as a starting server does)."""
    if database_url:
        from phoneagent.delivery.stores import open_outbox

        outbox = await open_outbox(data_dir, database_url)
        return api_key_store(outbox, data_dir), outbox.close
    store = SQLiteApiKeys.in_data_dir(data_dir)
    return store, store.close
