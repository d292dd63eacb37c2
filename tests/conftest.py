"""Shared fixtures: a complete valid environment and the project's own paths."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from pathlib import Path

import pytest
from hypothesis import settings

# The console's fixtures (a server with the console on, a headless Chromium), and the API's.
pytest_plugins = ["console_kit", "api_kit"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PERSONAS = PROJECT_ROOT / "personas"
BROKEN_PERSONAS = PROJECT_ROOT / "tests" / "fixtures" / "personas_broken"

VALID_ENV = {
    "PUBLIC_URL": "https://voice.example.com",
    "TWILIO_ACCOUNT_SID": "AC" + "0123456789abcdef" * 2,
    "TWILIO_AUTH_TOKEN": "twilio-auth-token-value",
    "STEPFUN_API_KEY": "stepfun-api-key-value",
}


# Every property test's budget, loaded here rather than in the module that first needed it, so
# that a file run on its own draws CI's derandomised examples too (test_text_units.py drew
# random ones when run without test_fuzz_call.py). HYPOTHESIS_PROFILE=fuzz: a longer, random hunt.
settings.register_profile("ci", max_examples=300, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("fuzz", max_examples=3000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def valid_env() -> dict[str, str]:
    return dict(VALID_ENV)


# --- stores: the same tests against SQLite and PostgreSQL ------------------------------------


@pytest.fixture(scope="session")
def postgres_url():
    """A ``postgresql://`` URL of a throwaway server the tests started (see
    ``phoneagent.testing.postgres_cluster``). No PostgreSQL here: the test is skipped, with the
    reason; in CI (``CI`` set) it fails, since a silent skip there would hide a broken install."""
    from phoneagent.testing.postgres_cluster import postgres_cluster

    cluster = postgres_cluster()
    with _postgres_or_skip():
        url = cluster.__enter__()
    try:
        yield url
    finally:
        cluster.__exit__(None, None, None)


@pytest.fixture
def stoppable_postgres():
    """A throwaway server of the test's own, which it may stop and start again (the session's
    server, which other tests' instances use, is left alone): a ``PostgresCluster``."""
    from phoneagent.testing.postgres_cluster import PostgresCluster

    with _postgres_or_skip():
        cluster = PostgresCluster()
    try:
        with _postgres_or_skip():
            cluster.create()
        yield cluster
    finally:
        cluster.remove()


@contextlib.contextmanager
def _postgres_or_skip():
    """No PostgreSQL here: skip the test, with the reason; in CI (``CI`` set) fail it."""
    from phoneagent.testing.postgres_cluster import PostgresUnavailable, in_ci

    try:
        yield
    except PostgresUnavailable as exc:
        message = f"PostgreSQL unavailable: {exc}"
        if in_ci(os.environ):
            pytest.fail(f"{message} (CI is set: the PostgreSQL tests must run in CI)")
        pytest.skip(message)


def _admin(url: str, sql: str) -> None:
    """Run one statement on the server, from a thread: fixtures set up outside the test's loop."""
    import asyncio
    import threading

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(errors, lambda: asyncio.run(run())))
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def _capture(errors: list[BaseException], fn) -> None:
    try:
        fn()
    except BaseException as exc:
        errors.append(exc)


@pytest.fixture
def pg_database(postgres_url):
    """A fresh, empty database on the test server; its URL."""
    name = f"t_{secrets.token_hex(6)}"
    _admin(postgres_url, f'CREATE DATABASE "{name}"')
    yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    _admin(postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


STORE_BACKENDS = ("sqlite", "postgres")


@pytest.fixture(params=STORE_BACKENDS)
def store_backend(request) -> tuple[str, str | None]:
    """(backend, database URL or None for SQLite): the parameter of the store tests."""
    if request.param == "postgres":
        return request.param, request.getfixturevalue("pg_database")
    return request.param, None


@pytest.fixture
async def outbox_store(store_backend, tmp_path):
    """Opens outboxes on one store of the parametrized backend: each call is one more
    "instance" on the same SQLite data directory or the same PostgreSQL database. Everything
    opened is closed at the end. ``outbox_store.backend`` and ``.url`` say which."""
    from phoneagent.delivery.outbox import SQLiteOutbox

    backend, url = store_backend
    opened = []

    async def open_outbox(**options):
        if url is not None:
            from phoneagent.delivery.pg_outbox import PostgresOutbox

            box = await PostgresOutbox.open(url, **options)
        else:
            box = await SQLiteOutbox.in_data_dir(tmp_path / "data", **options)
        opened.append(box)
        return box

    open_outbox.backend = backend
    open_outbox.url = url
    open_outbox.data_dir = tmp_path / "data"
    yield open_outbox
    for box in opened:
        await box.close()


@pytest.fixture
async def outbox(outbox_store):
    """An outbox of each backend (the tests that take it run once per backend)."""
    return await outbox_store()


def free_port() -> int:
    """A loopback port nothing listens on now (for servers started as real processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for_port(port: int) -> None:
    """Until a server accepts connections on ``port`` (bounded: 20 s)."""
    for _ in range(400):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")
