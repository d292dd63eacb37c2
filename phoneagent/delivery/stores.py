"""Opening the configured store: PostgreSQL when ``PHONEAGENT_DATABASE_URL`` is set, else the
embedded SQLite in ``PHONEAGENT_DATA_DIR``. (Its own module: ``outbox`` defines the interface
that ``pg_outbox`` implements, and must not import it back.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from phoneagent.delivery.outbox import DEFAULT_BUSY_TIMEOUT, Outbox, SQLiteOutbox
from phoneagent.delivery.publisher import CallEventPublisher
from phoneagent.records.store import CallRecordStore
from phoneagent.twilio.wire.replay import MemoryReplayGuard, ReplayGuard

if TYPE_CHECKING:
    from phoneagent.delivery.liveness import InstanceLiveness

__all__ = ["call_records", "instance_liveness", "open_outbox", "replay_guard"]


async def open_outbox(
    data_dir: Path | str,
    database_url: str = "",
    *,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    instance_name: str = "",
) -> Outbox:
    """The configured outbox: PostgreSQL when ``database_url`` (``PHONEAGENT_DATABASE_URL``) is
    set, else the SQLite file of ``data_dir``. Raises ``OutboxError`` if it cannot be used.
    ``instance_name`` (``PHONEAGENT_INSTANCE_NAME``; default: the host name) names this
    instance in the shared database."""
    if database_url:
        from phoneagent.delivery.pg_outbox import PostgresOutbox  # asyncpg only when used

        return await PostgresOutbox.open(database_url, owner=instance_name or None)
    return await SQLiteOutbox.in_data_dir(data_dir, busy_timeout=busy_timeout)


def replay_guard(outbox: Outbox) -> ReplayGuard:
    """Where stream claims and answered webhooks are kept: in the shared database of a
    PostgreSQL outbox (every instance sees them), else in this instance's memory (SQLite is one
    instance's file)."""
    if type(outbox).__name__ == "PostgresOutbox":  # not imported: asyncpg only when used
        from phoneagent.delivery.pg_outbox import PostgresOutbox
        from phoneagent.twilio.wire.pg_replay import PostgresReplayGuard

        assert isinstance(outbox, PostgresOutbox)
        return PostgresReplayGuard(outbox)
    return MemoryReplayGuard()


def call_records(outbox: Outbox) -> CallRecordStore | None:
    """Where call records are shared: the database of a PostgreSQL outbox (any instance reads
    any call's record, and a returning transfer finds its conversation), else nowhere (each
    instance keeps its own calls' records in memory)."""
    if type(outbox).__name__ == "PostgresOutbox":
        from phoneagent.delivery.pg_outbox import PostgresOutbox
        from phoneagent.records.postgres import PostgresCallRecords

        assert isinstance(outbox, PostgresOutbox)
        return PostgresCallRecords(outbox)
    return None


def instance_liveness(
    publisher: CallEventPublisher, *, on_adopted: Callable[[int], None] | None = None
) -> InstanceLiveness | None:
    """The heartbeat and the adoption of lost calls of an instance sharing a PostgreSQL
    database; None with SQLite (its file is one instance's: the next start ends its calls)."""
    outbox = publisher.worker.outbox
    if type(outbox).__name__ != "PostgresOutbox":  # not imported: asyncpg only when used
        return None
    from phoneagent.delivery.liveness import InstanceLiveness
    from phoneagent.delivery.pg_outbox import PostgresOutbox

    assert isinstance(outbox, PostgresOutbox)
    return InstanceLiveness(outbox, publisher, on_adopted=on_adopted)
