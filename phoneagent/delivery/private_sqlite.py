"""A small SQLite file of this instance's data directory that is nobody else's to read (API
keys, revoked console sessions): owner-only, WAL (a command writes while servers read), its
schema created and versioned in ``user_version``, created at its first use, and run on a
private thread, as the outbox is (the event loop carries live call audio). (The outbox has its
own: it migrates.)"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from phoneagent.delivery.outbox import DEFAULT_BUSY_TIMEOUT, OutboxError

__all__ = ["PrivateSQLite"]

T = TypeVar("T")


class PrivateSQLite:
    """The file at ``path``; a subclass names it (``FILENAME``, ``WHAT`` in errors: "the API key
    store") and gives its ``SCHEMA`` (idempotent statements) at ``SCHEMA_VERSION``. Errors come
    out as ``OutboxError``, naming the file."""

    FILENAME: ClassVar[str]
    WHAT: ClassVar[str]
    SCHEMA: ClassVar[str]
    SCHEMA_VERSION: ClassVar[int]

    def __init__(self, path: Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=Path(self.FILENAME).stem)
        self._db: sqlite3.Connection | None = None  # touched only on the executor's thread

    @classmethod
    def in_data_dir(cls, data_dir: Path | str, **options: Any) -> Self:
        return cls(Path(data_dir) / cls.FILENAME, **options)

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
        self._executor.shutdown(wait=False)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except RuntimeError as exc:  # the executor was shut down: close() ran
            raise OutboxError(f"{self.WHAT} {self.path} is closed") from exc
        except sqlite3.Error as exc:
            raise OutboxError(f"{self.WHAT} {self.path}: {exc}") from None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = self._open()
        return self._db

    def _open(self) -> sqlite3.Connection:
        path, version = self.path, self.SCHEMA_VERSION
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Owner only: the hashes are no secrets, but who may call which line, or who signed
            # out, is nobody else's to read or write. SQLite gives its -wal and -shm files the
            # same mode.
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            db = sqlite3.connect(path, timeout=self._busy_timeout, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            found = db.execute("PRAGMA user_version").fetchone()[0]
            if found > version:
                db.close()
                raise OutboxError(
                    f"{path} was written by a newer phoneagent (schema {found} of {self.WHAT}; "
                    f"this version reads {version}): upgrade it"
                )
            db.executescript(self.SCHEMA)
            db.execute(f"PRAGMA user_version={version}")
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(
                f"cannot open {self.WHAT} {path} ({exc}): set PHONEAGENT_DATA_DIR to a "
                "directory this process can write"
            ) from None
        return db
