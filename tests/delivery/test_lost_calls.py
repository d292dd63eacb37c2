"""A server killed (SIGKILL) mid-call: the next start sends the business the call's end, with
end reason ``server_lost`` and what was recorded. A real server process, the scripted Twilio
caller, the fake model and a webhook receiver on loopback."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from pathlib import Path

from server_process import DENTAL, GUARD, ServerProcess, personas_with_webhook

from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.webhook_sink import WebhookSink


async def persisted_turns(path: Path, call_sid: str) -> list[dict]:
    """The call's turns once the server has committed at least one of them to its outbox."""
    async with asyncio.timeout(GUARD):
        while True:
            db = sqlite3.connect(path)
            row = db.execute(
                "SELECT transcript FROM open_calls WHERE call_sid = ?", (call_sid,)
            ).fetchone()
            db.close()
            if row and json.loads(row[0]):
                return json.loads(row[0])
            await asyncio.sleep(0.05)


async def test_a_call_cut_by_sigkill_is_ended_as_server_lost_on_the_next_start(tmp_path):
    data = tmp_path / "data"
    async with WebhookSink() as sink, FakeRealtimeServer(api_key="stepfun-api-key-value") as model:
        personas = personas_with_webhook(tmp_path / "personas", sink.url("/hooks"))
        options = dict(personas=personas, data_dir=data, model_url=model.url)
        first = await ServerProcess(**options, log_path=tmp_path / "first.log").start()
        try:
            caller = first.caller()
            async with caller:
                await caller.dial()
                await caller.connect()
                await caller.wait_for_event("media", timeout=GUARD)
                [started] = await sink.wait_for(1, timeout=GUARD)
                turns = await persisted_turns(data / "outbox.sqlite3", caller.call_sid)
                first.process.kill()  # SIGKILL, mid-call: no call.ended from this run
                await first.process.wait()
        finally:
            if first.process.returncode is None:
                first.process.kill()
                await first.process.wait()
        assert first.process.returncode == -signal.SIGKILL
        assert [r.json["type"] for r in sink.received] == ["call.started"]

        second = await ServerProcess(**options, log_path=tmp_path / "second.log").start()
        try:
            await sink.wait_for(2, timeout=GUARD)
            metrics = await second.metrics()
            # Closed once: a third start finds nothing left open.
            code = await second.stop()
            third = await ServerProcess(**options, log_path=tmp_path / "third.log").start()
            await third.stop()
        finally:
            await second.stop()
    assert code == 0
    assert "phoneagent_lost_calls_closed_total 1.0" in metrics
    assert len(sink.received) == 2
    ended = sink.received[1].json
    assert ended["type"] == "call.ended"
    data_ = ended["data"]
    assert data_["call_sid"] == caller.call_sid == started.json["data"]["call_sid"]
    assert data_["end_reason"] == "server_lost"
    assert data_["persona"] == started.json["data"]["persona"]
    assert (data_["from"], data_["to"]) == (started.json["data"]["from"], DENTAL)
    assert data_["started_at"] == started.json["data"]["started_at"]
    # The call's context, as recorded when it started (no lookup: the persona's defaults).
    assert data_["direction"] == "inbound"
    assert data_["variables"] == {"caller_name": "there", "appointment": "none on file"}
    for key in ("direction", "variables", "metadata"):
        assert data_[key] == started.json["data"][key]
    assert data_["ended_at"] >= data_["started_at"]
    assert [t["text"] for t in data_["transcript"]][: len(turns)] == [t["text"] for t in turns]
    assert data_["transcript"] and data_["transcript"][0]["role"] == "agent"
    assert '"event": "lost_call_closed"' in (tmp_path / "second.log").read_text()
