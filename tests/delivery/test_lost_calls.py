"""A server killed (SIGKILL) mid-call: the next start sends the business the call's end, with
end reason ``server_lost`` and what was recorded. A real server process, the scripted Twilio
caller, the fake model and a webhook receiver on loopback."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

from server_process import (
    ACCOUNT_SID,
    API_KEY,
    AUTH_TOKEN,
    DENTAL,
    GUARD,
    ServerProcess,
    personas_with_webhook,
)

from phoneagent.audio import pcm16_to_ulaw
from phoneagent.testing.caller import TwilioCaller
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.speech import synthesize
from phoneagent.testing.webhook_sink import WebhookSink

# An answer long enough to be talked over well after the model finished generating it.
LONG_ANSWER = (
    "We are open Monday to Friday from eight in the morning to six in the evening, and on "
    "Saturday from nine to one. Doctor Park sees children and adults for cleanings and "
    "checkups, and Doctor Okafor does implants and root canals."
)


async def persisted_turns(
    path: Path, call_sid: str, enough: Callable[[list[dict]], bool] = bool
) -> list[dict]:
    """The call's turns once the server has committed ``enough`` of them to its outbox (by
    default, at least one)."""
    async with asyncio.timeout(GUARD):
        while True:
            db = sqlite3.connect(path)
            row = db.execute(
                "SELECT transcript FROM open_calls WHERE call_sid = ?", (call_sid,)
            ).fetchone()
            db.close()
            if row and enough(json.loads(row[0])):
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


def speech(text: str) -> bytes:
    return pcm16_to_ulaw(synthesize(text, sample_rate=8000))


async def test_a_lost_call_reports_a_turn_a_barge_in_cut_once_as_it_was_heard(tmp_path):
    """An agent's turn is final once generated; talked over while it still plays, it becomes
    final again, cut to what the caller heard. The killed call's end has it once, cut."""
    data = tmp_path / "data"
    model = FakeRealtimeServer(api_key=API_KEY, speed=8.0, script=[LONG_ANSWER, "Of course."])
    async with WebhookSink() as sink, model:
        personas = personas_with_webhook(tmp_path / "personas", sink.url("/hooks"))
        options = dict(personas=personas, data_dir=data, model_url=model.url)
        first = await ServerProcess(**options, log_path=tmp_path / "first.log").start()
        outbox = data / "outbox.sqlite3"
        try:
            caller = TwilioCaller(first.base, account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN,
                                  to=DENTAL, speed=1.0)  # fmt: skip
            async with caller:
                await caller.dial()
                await caller.connect()
                caller.start_background_silence()
                await model.wait_for(lambda: model.sessions, GUARD)
                session = model.sessions[0]
                await model.wait_for(lambda: session.sent_events("response.done"), GUARD)
                await caller.wait_until_quiet(300, timeout=GUARD)  # the greeting, heard out
                await caller.play(speech("When are you open?"))
                # The whole answer generated and journalled while the caller still hears it.
                await persisted_turns(
                    outbox, caller.call_sid, lambda turns: turns[-1]["text"] == LONG_ANSWER
                )
                assert not caller.clears
                await caller.play(speech("And on Sundays?"))
                await caller.wait_for_event("clear", timeout=GUARD)
                await persisted_turns(
                    outbox, caller.call_sid, lambda turns: any(t["interrupted"] for t in turns)
                )
                first.process.kill()  # SIGKILL, mid-call
                await first.process.wait()
        finally:
            if first.process.returncode is None:
                first.process.kill()
                await first.process.wait()

        second = await ServerProcess(**options, log_path=tmp_path / "second.log").start()
        try:
            await sink.wait_for(2, timeout=GUARD)
        finally:
            await second.stop()
    ended = next(r.json["data"] for r in sink.received if r.json["type"] == "call.ended")
    assert ended["end_reason"] == "server_lost"
    turns = ended["transcript"]
    assert len({(t["role"], t["start_ms"]) for t in turns}) == len(turns)  # each turn once
    [answer] = [t for t in turns if t["role"] == "agent" and LONG_ANSWER.startswith(t["text"])]
    assert answer["interrupted"] is True
    assert 0 < len(answer["text"]) < len(LONG_ANSWER)  # what the caller heard, not all of it
    assert [t["role"] for t in turns][:3] == ["agent", "caller", "agent"]
