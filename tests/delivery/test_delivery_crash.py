"""A delivering process killed with SIGKILL, then restarted: every event arrives, duplicates only
with the same id. Real processes, a real receiver on loopback, the real outbox file."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import defaultdict
from pathlib import Path

from delivery_helpers import SECRET, SECRET_ENV, spec_signature_ok

from phoneagent.delivery.outbox import SQLiteOutbox
from phoneagent.testing.webhook_sink import WebhookSink

HERE = Path(__file__).resolve().parent
GUARD = 30.0  # seconds: only reached when something is broken
COUNT = 24


async def read_ids(child: asyncio.subprocess.Process) -> list[str]:
    ids = []
    async with asyncio.timeout(GUARD):
        while (line := (await child.stdout.readline()).decode().strip()) != "ENQUEUED":
            assert line, "the child exited before enqueueing everything"
            ids.append(line)
    return ids


async def wait_for_mid_delivery(outbox: SQLiteOutbox) -> None:
    """Until some events are delivered and others are claimed with their request in flight."""
    async with asyncio.timeout(GUARD):
        while True:
            counts = await outbox.counts()
            claimed = [i for i in await outbox.list(status="pending", limit=COUNT) if i.claim]
            if counts["delivered"] >= 4 and claimed:
                return
            await asyncio.sleep(0.01)


async def test_sigkill_mid_delivery_then_restart_delivers_every_event(tmp_path):
    env = {
        **os.environ,
        SECRET_ENV: SECRET,
        "PHONEAGENT_DATA_DIR": str(tmp_path),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "warning",
    }
    log = (tmp_path / "children.log").open("wb")
    # Answers take 0.3 s while the first process runs, so it always has requests in flight.
    async with WebhookSink([200], delay=0.3) as sink:
        first = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "outbox_child.py"), str(tmp_path), sink.url("/hooks"),
            str(COUNT), stdout=asyncio.subprocess.PIPE, stderr=log, env=env, cwd=HERE,
        )  # fmt: skip
        try:
            ids = await read_ids(first)
            observer = await SQLiteOutbox.in_data_dir(tmp_path)
            await wait_for_mid_delivery(observer)
        finally:
            first.kill()  # SIGKILL: no cleanup, no claims handed back
            await first.wait()
        assert first.returncode == -signal.SIGKILL
        assert len(ids) == COUNT
        assert (await observer.counts())["pending"] > 0

        sink.delay = 0.0
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "phoneagent.delivery.worker", "--timeout", "1", "--lease", "1.5",
            "--schedule", ",".join(["0.05"] * 20), "--poll-interval", "0.05",
            stdout=log, stderr=log, env=env,
        )  # fmt: skip
        try:
            async with asyncio.timeout(GUARD):
                while (await observer.counts())["delivered"] < COUNT:
                    await asyncio.sleep(0.02)
        finally:
            second.send_signal(signal.SIGTERM)
            async with asyncio.timeout(GUARD):
                await second.wait()
        assert second.returncode == 0  # SIGTERM is a graceful stop
        items = await observer.list(limit=COUNT + 1)
        await observer.close()
    log.close()

    by_id: dict[str, list] = defaultdict(list)
    for request in sink.received:
        assert request.headers["webhook-id"] == request.json["id"]
        assert spec_signature_ok(request.body, request.headers, SECRET)
        by_id[request.headers["webhook-id"]].append(request.body)
    assert set(by_id) == set(ids)  # every event arrived, and nothing else did
    for bodies in by_id.values():
        assert len(set(bodies)) == 1  # a duplicate is the same event, byte for byte
    assert {i.id for i in items} == set(ids)
    assert all(i.status == "delivered" for i in items)
