"""Instances sharing a PostgreSQL database: one killed (SIGKILL) mid-call, under its own name,
and another instance, under another name (a replaced Deployment pod comes back under a new
one), sends the business the call's end, ``server_lost``, once the dead one's heartbeat is
stale, and never while it is alive. Real server processes, with heartbeats made fast
(serve_fast_liveness.py), the scripted Twilio caller, the fake model and a webhook receiver."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import asyncpg
from serve_fast_liveness import STALE_SECONDS
from server_process import DENTAL, GUARD, ServerProcess, personas_with_webhook

from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.webhook_sink import WebhookSink

FAST_LIVENESS = (str(Path(__file__).with_name("serve_fast_liveness.py")),)


async def open_call(url: str, call_sid: str) -> tuple[str, list[dict]] | None:
    """(owner, turns) of the call's open record, or None."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT owner, transcript::text FROM phoneagent_open_calls WHERE call_sid = $1",
            call_sid,
        )
    finally:
        await conn.close()
    return (row[0], json.loads(row[1])) if row else None


async def persisted_turns(url: str, call_sid: str) -> list[dict]:
    """The call's turns once its instance has recorded at least one of them."""
    async with asyncio.timeout(GUARD):
        while True:
            record = await open_call(url, call_sid)
            if record and record[1]:
                return record[1]
            await asyncio.sleep(0.05)


async def test_another_instance_ends_a_killed_instances_call_once_it_is_stale(
    pg_database, tmp_path
):
    async with WebhookSink() as sink, FakeRealtimeServer(api_key="stepfun-api-key-value") as model:
        personas = personas_with_webhook(tmp_path / "personas", sink.url("/hooks"))

        def instance(name: str, log: str) -> ServerProcess:
            return ServerProcess(
                personas=personas, data_dir=tmp_path / name, model_url=model.url,
                log_path=tmp_path / log, entry=FAST_LIVENESS,
                env={"PHONEAGENT_DATABASE_URL": pg_database, "PHONEAGENT_INSTANCE_NAME": name},
            )  # fmt: skip

        dying, other = instance("voice-a", "a.log"), instance("voice-b", "b.log")
        again = instance("voice-a", "a-again.log")
        try:
            await dying.start()
            await other.start()
            caller = dying.caller()
            async with caller:
                await caller.dial()
                await caller.connect()
                await caller.wait_for_event("media", timeout=GUARD)
                [started] = await sink.wait_for(1, timeout=GUARD)
                turns = await persisted_turns(pg_database, caller.call_sid)
                # Alive, its call is its own: several stale periods go by, nobody ends it.
                await asyncio.sleep(3 * STALE_SECONDS)
                assert len(sink.received) == 1
                assert (await open_call(pg_database, caller.call_sid))[0] == "voice-a"
                dying.process.kill()  # SIGKILL, mid-call: no call.ended from it
                await dying.process.wait()
            assert dying.process.returncode == -signal.SIGKILL

            await sink.wait_for(2, timeout=GUARD)  # from voice-b, once voice-a is stale
            metrics = await other.metrics()
            # voice-a comes back (a new run): the call is already over, nothing is sent again.
            await again.start()
            await asyncio.sleep(3 * STALE_SECONDS)
            codes = [await other.stop(), await again.stop()]
        finally:
            for server in (dying, other, again):
                if server.process is not None:
                    await server.stop()
    assert codes == [0, 0]
    assert len(sink.received) == 2
    assert "phoneagent_lost_calls_closed_total 1.0" in metrics
    ended = sink.received[1].json
    assert ended["type"] == "call.ended"
    data = ended["data"]
    assert data["call_sid"] == caller.call_sid == started.json["data"]["call_sid"]
    assert data["end_reason"] == "server_lost"
    assert (data["from"], data["to"]) == (started.json["data"]["from"], DENTAL)
    assert data["started_at"] == started.json["data"]["started_at"]
    assert [t["text"] for t in data["transcript"]][: len(turns)] == [t["text"] for t in turns]
    assert await open_call(pg_database, caller.call_sid) is None
    log = (tmp_path / "b.log").read_text()
    closed = [json.loads(line) for line in log.splitlines() if '"lost_call_closed"' in line]
    assert [(c["call_sid"], c["lost_by"]) for c in closed] == [(caller.call_sid, "voice-a")]
