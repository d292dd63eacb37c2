"""The data directory fills up while the server runs: calls go on, their events are held in
memory (the instance unready, the metrics saying so), and once space returns every held event
is committed in order and delivered. A real server process on a real small filesystem: a tmpfs
mounted in a private mount namespace (root, `unshare`, `mount`), filled and freed from here
through /proc/PID/root."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from server_process import GUARD, ServerProcess, personas_with_webhook, short_call

from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.webhook_sink import WebhookSink

CALLS = 3


def _namespace_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs in a private mount namespace"
    for tool in ("unshare", "mount", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (util-linux)"
    return None


pytestmark = pytest.mark.skipif(_namespace_problem() is not None, reason=str(_namespace_problem()))


def fill(directory: Path) -> Path:
    """Write zeros until the filesystem refuses (ENOSPC); the file to delete to free it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


async def outbox_rows(pid: int, data: Path) -> list[tuple[str, str]]:
    """(type, body) of the outbox's rows in commit order, read inside the server's namespace."""
    script = (
        "import json, sqlite3, sys; db = sqlite3.connect(sys.argv[1]); print(json.dumps("
        "[(t, bytes(b).decode()) for t, b in db.execute('SELECT type, body FROM outbox "
        "ORDER BY rowid')]))"
    )
    reader = await asyncio.create_subprocess_exec(
        "nsenter", "-t", str(pid), "-m", sys.executable, "-c", script,
        str(data / "outbox.sqlite3"), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await reader.communicate()
    return [tuple(row) for row in json.loads(out)]


async def wait_ready(server: ServerProcess, ready: bool) -> dict:
    async with asyncio.timeout(GUARD):
        while True:
            status, body = await server.get_json("/readyz")
            if (status == 200) == ready:
                return body
            await asyncio.sleep(0.05)


async def test_disk_full_holds_events_then_delivers_every_one_in_order(tmp_path):
    data = tmp_path / "data"  # the tmpfs exists only inside the server's mount namespace
    data.mkdir()
    wrapper = ["unshare", "-m", "--propagation", "private", "sh", "-c",
               f'mount -t tmpfs -o size=1m tmpfs "{data}" && exec "$@"', "sh"]  # fmt: skip
    async with WebhookSink() as sink, FakeRealtimeServer(api_key="stepfun-api-key-value") as model:
        personas = personas_with_webhook(tmp_path / "personas", sink.url("/hooks"))
        server = ServerProcess(personas=personas, data_dir=data, model_url=model.url,
                               log_path=tmp_path / "server.log", wrapper=wrapper)  # fmt: skip
        await server.start()
        try:
            seen = Path(f"/proc/{server.pid}/root") / data.relative_to("/")
            assert (seen / "outbox.sqlite3").exists()  # the server's view of its data dir
            assert not (data / "outbox.sqlite3").exists()  # ours: the tmpfs is private
            await wait_ready(server, True)

            filler = fill(seen)
            sids = [await short_call(server) for _ in range(CALLS)]  # calls go on
            body = await wait_ready(server, False)
            assert any("held in memory" in p and "full" in p for p in body["problems"]), body
            # The last call's call.ended is published by a task the server starts as its stream
            # closes, not before the caller's hang-up returns: wait for it to be held.
            async with asyncio.timeout(GUARD):
                while f"phoneagent_webhook_events_spooled {2.0 * CALLS}" not in (
                    metrics := await server.metrics()
                ):
                    await asyncio.sleep(0.05)
            assert "phoneagent_outbox_ok 0.0" in metrics
            assert "phoneagent_outbox_write_failures_total 0.0" not in metrics
            assert sink.received == []

            filler.unlink()  # space returns
            await sink.wait_for(2 * CALLS, timeout=GUARD)
            await wait_ready(server, True)
            metrics = await server.metrics()
            assert "phoneagent_webhook_events_spooled 0.0" in metrics
            assert "phoneagent_outbox_ok 1.0" in metrics
            assert "phoneagent_webhook_events_lost_total{" not in metrics  # none lost
            # Committed in the order they happened: each call's start before its end.
            rows = await outbox_rows(server.pid, data)
        finally:
            code = await server.stop()
    assert code == 0
    events = [r.json for r in sink.received]
    assert sorted((e["data"]["call_sid"], e["type"]) for e in events) == sorted(
        (sid, kind) for sid in sids for kind in ("call.started", "call.ended")
    )
    committed = [(t, sid) for t, body in rows for sid in sids if sid in body]
    assert committed == [(k, sid) for sid in sids for k in ("call.started", "call.ended")]
    log = (tmp_path / "server.log").read_text()
    assert '"event": "webhook_event_spooled"' in log and "webhook_events_unspooled" in log
