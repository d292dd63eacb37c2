"""Opening the configured store: PostgreSQL when ``PHONEAGENT_DATABASE_URL`` is set, else the
embedded SQLite in ``PHONEAGENT_DATA_DIR``. (Its own module: ``outbox`` defines the interface
that ``pg_outbox`` implements, and must not import it back.)"""

from __future__ import annotations

from pathlib import Path

from phoneagent.delivery.outbox import DEFAULT_BUSY_TIMEOUT, Outbox, SQLiteOutbox

__all__ = ["open_outbox"]


async def open_outbox(
    data_dir: Path | str, database_url: str = "", *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
) -> Outbox:
    """The configured outbox: PostgreSQL when ``database_url`` (``PHONEAGENT_DATABASE_URL``) is
    set, else the SQLite file of ``data_dir``. Raises ``OutboxError`` if it cannot be used."""
    if database_url:
        from phoneagent.delivery.pg_outbox import PostgresOutbox  # asyncpg only when used

        return await PostgresOutbox.open(database_url)
    return await SQLiteOutbox.in_data_dir(data_dir, busy_timeout=busy_timeout)
