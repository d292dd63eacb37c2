"""An outbox whose pages are damaged behind a valid header: refused at start-up with a message
that names the file and what to do; damaged while the server runs, an unready instance (readyz
503 with the reason) and a metric, with events held rather than lost. Real files, a real
server process, a real app on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from delivery_helpers import SECRET_ENV, T0, ended_event

from phoneagent.config import Settings
from phoneagent.delivery.outbox import OUTBOX_FILENAME, OutboxError, SQLiteOutbox
from phoneagent.personas import PersonaRegistry
from phoneagent.server import build_app
from phoneagent.state import STATE

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PAGE = 4096  # SQLite's default page size, what the outbox uses
GUARD = 20.0  # seconds: only reached when something is broken


async def write_outbox(data_dir: Path, count: int) -> Path:
    box = await SQLiteOutbox.in_data_dir(data_dir)
    for i in range(count):
        await box.enqueue(ended_event(i), url="https://a.example/h", secret_env=SECRET_ENV, now=T0)
    await box.close()  # the last connection checkpoints: every page is in the main file
    return data_dir / OUTBOX_FILENAME


def damage_pages(path: Path, first: int, count: int) -> None:
    """Overwrite ``count`` pages from page ``first`` (1-based) with garbage; the header (page 1)
    stays valid, so the file still opens as a database."""
    assert first > 1
    with path.open("r+b") as f:
        f.seek((first - 1) * PAGE)
        f.write(os.urandom(count * PAGE))


async def test_damaged_pages_behind_a_valid_header_are_refused_at_open(tmp_path):
    path = await write_outbox(tmp_path, 200)
    pages = path.stat().st_size // PAGE
    assert pages > 20
    damage_pages(path, pages // 2, 4)
    assert path.read_bytes()[:16] == b"SQLite format 3\x00"
    with pytest.raises(OutboxError) as excinfo:
        await SQLiteOutbox.open(path)
    message = str(excinfo.value)
    assert str(path) in message and "not a readable SQLite database" in message
    assert "move the file aside" in message and ".recover" in message


def test_serve_refuses_damaged_pages_at_start_up(tmp_path):
    path = asyncio.run(write_outbox(tmp_path, 200))
    damage_pages(path, path.stat().st_size // PAGE // 2, 4)
    env = {
        **os.environ,
        "PUBLIC_URL": "https://voice.example.com",
        "TWILIO_ACCOUNT_SID": "AC" + "0123456789abcdef" * 2,
        "TWILIO_AUTH_TOKEN": "twilio-auth-token-value",
        "STEPFUN_API_KEY": "stepfun-api-key-value",
        "PHONEAGENT_DATA_DIR": str(tmp_path),
        "PHONEAGENT_PERSONAS_DIR": str(PROJECT_ROOT / "personas"),
        "PORT": "1",  # never bound: the outbox is refused first
    }
    result = subprocess.run(
        [sys.executable, "-m", "phoneagent.cli", "serve", "--host", "127.0.0.1"],
        capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"webhook outbox error: {path} is not a readable SQLite database" in result.stderr
    assert "move the file aside" in result.stderr


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as response:
        return response.status, await response.text()


async def test_damage_while_running_makes_the_instance_unready_and_is_counted(tmp_path):
    data = tmp_path / "data"
    path = await write_outbox(data, 600)  # bigger than what a connection keeps cached
    settings = Settings(
        twilio_account_sid="AC" + "0" * 32, twilio_auth_token="t", data_dir=data,
        personas_dir=PROJECT_ROOT / "personas",
    )  # fmt: skip
    app = await build_app(settings, PersonaRegistry(settings.personas_dir))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    state = app[STATE]
    try:
        async with aiohttp.ClientSession() as http:
            assert (await get(http, base + "/readyz"))[0] == 200
            # The disk now returns garbage for the outbox's pages. Another connection's write
            # (as `phoneagent events redeliver` makes) tells the server's connection that the
            # file changed, so its next read comes from the damaged disk, not its cache. The
            # damage comes first: a read between the signal and the damage would cache good
            # pages again, with nothing left to say they changed (a race that failed in CI).
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            damage_pages(path, 2, path.stat().st_size // PAGE - 1)
            other.execute("PRAGMA user_version=1")
            state.publisher.worker.wake()
            async with asyncio.timeout(GUARD):
                while (status := await get(http, base + "/readyz"))[0] != 503:
                    await asyncio.sleep(0.05)  # the worker's next round finds the damage
            ready = json.loads(status[1])
            assert ready["status"] == "not ready"
            [problem] = ready["problems"]
            assert str(path) in problem and "not a readable SQLite database" in problem
            # An event of a call ending now cannot be committed: it is held, not dropped.
            await state.publisher.spool.submit(ended_event(1000), url="https://a.example/h",
                                               secret_env=SECRET_ENV)  # fmt: skip
            ready = json.loads((await get(http, base + "/readyz"))[1])
            assert any("1 webhook events held in memory" in p for p in ready["problems"])
            metrics = state.metrics.exposition().decode()
            assert "phoneagent_outbox_ok 0.0" in metrics
            assert "phoneagent_webhook_events_spooled 1.0" in metrics
            assert "phoneagent_outbox_write_failures_total 1.0" in metrics
            assert "phoneagent_outbox_errors_total 0.0" not in metrics
            other.close()
    finally:
        await runner.cleanup()


async def test_a_new_outbox_is_readable_by_its_owner_only(tmp_path):
    """Events hold transcripts and callers' numbers: the file and its WAL are not the world's."""
    path = await write_outbox(tmp_path, 1)
    box = await SQLiteOutbox.in_data_dir(tmp_path)
    try:
        for name in (path, path.with_name(path.name + "-wal")):
            assert name.stat().st_mode & 0o777 == 0o600, name
    finally:
        await box.close()


async def test_an_outbox_path_that_cannot_be_opened_is_refused_with_what_to_do(tmp_path):
    (tmp_path / OUTBOX_FILENAME).mkdir()  # what even root cannot open as a file
    with pytest.raises(OutboxError, match=r"cannot open .* for writing"):
        await SQLiteOutbox.in_data_dir(tmp_path)
