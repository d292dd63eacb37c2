"""Two `phoneagent serve` processes sharing one PostgreSQL database, behind one public URL as a
load balancer would put them: each step of a call may reach either instance, and both answer
as one. (Issue 14: many instances, one truth.)"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import aiohttp
import pytest
from conftest import EXAMPLE_PERSONAS

sys.path.insert(0, str(Path(__file__).parent / "delivery"))  # the delivery tests' helpers

from server_process import (
    ACCOUNT_SID,
    API_KEY,
    AUTH_TOKEN,
    DENTAL,
    GUARD,
    HOOK_SECRET_ENV,
    ServerProcess,
    personas_with_webhook,
)

from phoneagent.audio import pcm16_to_ulaw
from phoneagent.personas import load_directory
from phoneagent.personas.model import DEFAULT_APOLOGY
from phoneagent.testing.caller import TwilioCaller
from phoneagent.testing.fake_model import CallTool, FakeRealtimeServer
from phoneagent.testing.fake_twilio_api import FakeTwilioApi
from phoneagent.testing.lookup_server import LookupServer
from phoneagent.testing.speech import synthesize
from phoneagent.testing.webhook_sink import WebhookSink

# What Twilio is configured with and signs: one address for every instance (the load balancer).
PUBLIC_URL = "https://voice.example.com"
SPEED = 1.0  # the servers pace the agent's audio in real time, as Twilio plays it


class Pair:
    def __init__(self, a, b, sink, model, twilio_api):
        self.a, self.b, self.sink, self.model, self.twilio_api = a, b, sink, model, twilio_api

    def caller(self, first: ServerProcess, **options) -> TwilioCaller:
        caller = TwilioCaller(
            first.base, public_url=PUBLIC_URL, account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN,
            to=DENTAL, **{"speed": SPEED} | options,
        )  # fmt: skip
        self.twilio_api.attach(caller)
        return caller


@contextlib.asynccontextmanager
async def started_pair(tmp_path, pg_database, *, lookup_url: str = "", env=None):
    """Two instances on one database, a webhook sink for the dental persona's events, and
    (``lookup_url``) the dental persona asking that lookup who calls."""
    model = FakeRealtimeServer(api_key=API_KEY, speed=8.0)
    twilio_api = FakeTwilioApi(ACCOUNT_SID, AUTH_TOKEN)
    async with WebhookSink() as sink, model:
        await twilio_api.start()
        personas = personas_with_webhook(tmp_path / "personas", sink.url("/hooks"))
        if lookup_url:
            dental = personas / "bright-smile-dental.toml"
            dental.write_text(
                dental.read_text()
                + f'\n[lookup]\nurl = "{lookup_url}"\nsecret_env = "{HOOK_SECRET_ENV}"\n'
            )
        env = {
            "PUBLIC_URL": PUBLIC_URL,
            "PHONEAGENT_DATABASE_URL": pg_database,
            "TWILIO_API_BASE_URL": twilio_api.base_url,
        }
        a, b = (
            ServerProcess(
                personas=personas,
                data_dir=tmp_path / name,
                model_url=model.url,
                log_path=tmp_path / f"{name}.log",
                env=env,
            )
            for name in ("a", "b")
        )
        try:
            # Started together: the schema is migrated once, under the advisory lock.
            await asyncio.gather(a.start(), b.start())
            yield Pair(a, b, sink, model, twilio_api)
        finally:
            await asyncio.gather(a.stop(), b.stop())
            await twilio_api.stop()


@pytest.fixture
async def pair(tmp_path, pg_database):
    async with started_pair(tmp_path, pg_database) as pair:
        yield pair


async def call_record(server: ServerProcess, call_sid: str) -> tuple[int, dict]:
    credentials = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    headers = {"Authorization": f"Basic {credentials}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{server.base}/calls/{call_sid}", headers=headers) as response,
    ):
        return response.status, json.loads(await response.text())


def speech(text: str) -> bytes:
    return pcm16_to_ulaw(synthesize(text, sample_rate=8000))


# The stream coming back reaches either instance: A, which answered the <Dial action>, or B,
# whose own view of the call still holds the transfer as it asked Twilio for it.
@pytest.mark.parametrize("back_on", ["a", "b"])
async def test_a_call_moves_between_instances_and_both_know_it(pair, back_on):
    pair.model.script = (CallTool("transfer_call", {"target": "front_desk"}),)
    caller = pair.caller(pair.a)
    async with caller:
        answer = await caller.dial()  # the voice webhook: instance A
        assert answer.ok and answer.stream_url.startswith("wss://voice.example.com/")
        caller.base_url = pair.b.base  # the load balancer sends the stream to instance B
        await caller.connect()
        caller.start_background_silence()
        # The greeting generated first: the caller's quiet counts from the call's start, so it
        # holds before the greeting's first delta. Any session: A's prewarmed one goes unused.
        await pair.model.wait_for(
            lambda: any(s.sent_events("response.done") for s in pair.model.sessions), GUARD
        )
        await caller.wait_until_quiet(300, timeout=GUARD)  # the greeting, heard out
        await caller.play(speech("Put me through to the front desk please."))
        [update] = await pair.twilio_api.wait_for_updates(1, timeout=GUARD)
        await caller.wait_closed(timeout=GUARD)

    # Nobody answers: Twilio requests the <Dial action> (instance A), and the call comes back.
    back = pair.caller(pair.a, call_sid=caller.call_sid)
    async with back:
        answer = await back.request_dial_action(update.params["Twiml"], "no-answer")
        assert answer.ok and answer.stream_url
        back.base_url = getattr(pair, back_on).base
        await back.connect()
        back.start_background_silence()
        await back.wait_until_heard_ms(500, timeout=GUARD)  # the agent speaks again
        await back.hangup()

    # The agent resumed with what was said on B: the greeting and the caller's request.
    [second] = [
        session
        for session in pair.model.sessions
        if any(
            "not answered (no-answer)" in e["session"].get("instructions", "")
            for e in session.received_events("session.update")
        )
    ]
    greeting = load_directory(EXAMPLE_PERSONAS, environ={}).personas["bright-smile-dental"].greeting
    history = [e["item"] for e in second.received_events("conversation.item.create")]
    assert history[0]["role"] == "assistant"
    assert greeting in history[0]["content"][0]["text"]
    assert any(item.get("role") == "user" for item in history)

    # Every event reached the business once, whichever instance committed and delivered it:
    # B's stream (started, transfer accepted, ended), A's <Dial action> (transfer failed), and
    # A's stream (started, ended).
    events = await pair.sink.wait_for(6, timeout=GUARD)
    await asyncio.sleep(0.5)  # a seventh would be a duplicate
    assert sorted(e.json["type"] for e in pair.sink.received) == sorted(
        ["call.started", "call.transferred", "call.ended"] * 2
    )
    assert len({e.headers["webhook-id"] for e in events}) == 6
    outcomes = [e.json["data"]["outcome"] for e in events if e.json["type"] == "call.transferred"]
    assert sorted(outcomes) == ["accepted", "failed"]
    # Each part's call.ended says how that part ended: B's by the transfer, the return not.
    first, second = sorted(
        (e.json["data"] for e in events if e.json["type"] == "call.ended"),
        key=lambda data: data["started_at"],
    )
    assert (first["end_reason"], first["transfer"]["target"]) == ("transferred", "front_desk")
    assert (second["end_reason"], second["transfer"]) == ("caller_hung_up", None)

    # Both instances answer the same record: both streams' turns, A's webhook, B's transfer.
    async def ended_on_both() -> tuple[dict, dict]:
        while True:
            (status_a, on_a), (status_b, on_b) = await asyncio.gather(
                call_record(pair.a, caller.call_sid), call_record(pair.b, caller.call_sid)
            )
            assert (status_a, status_b) == (200, 200)
            if on_a["end_reason"] is not None and on_a == on_b:
                return on_a, on_b
            await asyncio.sleep(0.1)

    async with asyncio.timeout(GUARD):
        on_a, on_b = await ended_on_both()
    assert on_a == on_b
    assert on_a["end_reason"] == "caller_hung_up"
    assert on_a["caller"] == caller.from_ and on_a["called"] == DENTAL
    assert on_a["transfer"] == {
        "target": "front_desk",
        "number": dialled(update),
        "reason": None,
        "error": "no-answer",  # nobody answered it: the caller came back
    }
    texts = [turn["text"] for turn in on_a["transcript"]]
    assert greeting in texts[0]
    # The transcript of the whole call: B's turns (greeting, request, announcement), then A's.
    assert len(texts) > 3
    assert any("front desk" in text for text in texts)


def dialled(update) -> str:
    return ET.fromstring(update.params["Twiml"]).find("Dial").text.strip()


async def test_one_token_raced_on_both_instances_opens_one_stream(pair):
    first = pair.caller(pair.a)
    await first.dial()
    # The same <Connect><Stream> (one token) replayed to the other instance at the same moment.
    second = pair.caller(pair.b, call_sid=first.call_sid)
    second.answer = first.answer
    async with first, second:
        await asyncio.gather(first.connect(send_start=False), second.connect(send_start=False))
        await asyncio.gather(first.send_start(), second.send_start())
        async with asyncio.timeout(GUARD):
            while not (first.closed_by_server or second.closed_by_server):
                await asyncio.sleep(0.02)
        refused, taken = (first, second) if first.closed_by_server else (second, first)
        await taken.wait_for_event("media", timeout=GUARD)
        assert not taken.closed_by_server
        await taken.hangup()
    assert not [m for m in refused.received if m.event == "media"]
    logs = (pair.a.log_path.read_text(), pair.b.log_path.read_text())
    refusals = [log.count("this stream token was already used") for log in logs]
    assert sorted(refusals) == [0, 1]


async def test_a_killed_instances_events_are_delivered_by_the_other(pair):
    pair.sink.script([(503, 1)])  # the business's receiver is down
    caller = pair.caller(pair.a)  # the whole call on A
    async with caller:
        await caller.dial()
        await caller.connect()
        await caller.wait_for_event("media", timeout=GUARD)
        await caller.hangup()
    refused = await pair.sink.wait_for(2, timeout=GUARD)  # call.started and call.ended, refused
    ids = {r.headers["webhook-id"]: r.json for r in refused}
    assert sorted(event["type"] for event in ids.values()) == ["call.ended", "call.started"]
    # Once A has recorded both refusals (an event A was sending when killed would wait for its
    # lease, the delivery timeout plus 30 s: the outbox tests cover that), SIGKILL it.
    async with asyncio.timeout(GUARD):
        while pair.a.log_path.read_text().count('"webhook_retry_scheduled"') < 2:
            await asyncio.sleep(0.05)
    pair.a.process.send_signal(signal.SIGKILL)  # with both events pending
    await pair.a.process.wait()
    seen = len(pair.sink.received)
    pair.sink.script([200])  # the receiver is back up

    async def delivered() -> set[str]:
        return {r.headers["webhook-id"] for r in pair.sink.received[seen:] if r.status == 200}

    async with asyncio.timeout(GUARD):
        while await delivered() != set(ids):
            await asyncio.sleep(0.1)
    # Every delivery of an event, the refused and the repeated ones, has its id and its body.
    for received in pair.sink.received:
        assert received.json == ids[received.headers["webhook-id"]]
    # B counts a delivery once its outbox has recorded it, after the receiver's answer (which the
    # sink logs before answering): the count may trail the sink by a database round trip.
    delivered_twice = 'phoneagent_webhook_deliveries_total{outcome="delivered"} 2.0'
    async with asyncio.timeout(GUARD):
        while delivered_twice not in await pair.b.metrics():
            await asyncio.sleep(0.1)


async def test_a_goodbye_on_one_instance_is_a_hang_up_for_the_other(pair):
    # The agent says goodbye on B and Twilio refuses the REST hang-up: the stream closes, and
    # Twilio asks <Connect action> on A, which must read B's end of the call, not apologise.
    pair.model.script = [CallTool("end_call")]
    pair.twilio_api.fail_next(1, status=500, code=20500, message="Internal Server Error")
    caller = pair.caller(pair.a)
    async with caller:
        await caller.dial()
        caller.base_url = pair.b.base
        await caller.connect()
        caller.base_url = pair.a.base  # the action's request goes to A
        caller.start_background_silence()
        # The greeting generated first: the caller's quiet counts from the call's start, so it
        # holds before the greeting's first delta. Any session: A's prewarmed one goes unused.
        await pair.model.wait_for(
            lambda: any(s.sent_events("response.done") for s in pair.model.sessions), GUARD
        )
        await caller.wait_until_quiet(300, timeout=GUARD)  # the greeting, heard out
        await caller.play(b"\x00" * 8000)  # loud enough to be a turn for the fake's VAD
        after = await caller.wait_call_over(timeout=GUARD)
    assert [u.status for u in pair.twilio_api.updates] == [500]
    assert after is not None and after.verbs == ["Hangup"]
    assert '"event": "stream_ended"' in pair.a.log_path.read_text()


async def test_a_call_whose_instance_died_gets_the_apology_from_the_other(pair):
    caller = pair.caller(pair.a, speed=0)
    async with caller:
        await caller.dial()
        caller.base_url = pair.b.base
        await caller.connect()
        await caller.wait_for_event("media", timeout=GUARD)
        caller.base_url = pair.a.base  # the action's request goes to A
        pair.b.process.send_signal(signal.SIGKILL)
        after = await caller.wait_call_over(timeout=GUARD)
    # B's record says the stream is live, and stays so: after a short wait, the apology.
    assert after is not None and after.says == [DEFAULT_APOLOGY]  # the persona sets none


async def test_the_context_looked_up_on_one_instance_is_the_streams_on_the_other(
    tmp_path, pg_database
):
    # The webhook reaches A, which asks the lookup; the stream reaches B, which has never seen
    # the call: the greeting it says, the record and the events carry what A looked up.
    answer = {"variables": {"caller_name": "Dana", "appointment": "Thursday, a cleaning"},
              "metadata": {"patient_id": "p-1042"}}  # fmt: skip
    async with (
        LookupServer("whsec_c2VjcmV0", answer=answer) as lookups,
        started_pair(tmp_path, pg_database, lookup_url=lookups.url("/lookup")) as pair,
    ):
        caller = pair.caller(pair.a)
        async with caller:
            assert (await caller.dial()).ok  # the voice webhook: instance A
            caller.base_url = pair.b.base  # the stream: instance B
            await caller.connect()
            caller.start_background_silence()
            await caller.wait_until_heard_ms(500, timeout=GUARD)
            # The greeting generated in full before its quiet (a pause in its deltas on a busy
            # machine would otherwise hang up mid-greeting).
            await pair.model.wait_for(
                lambda: any(s.sent_events("response.done") for s in pair.model.sessions), GUARD
            )
            await caller.wait_until_quiet(300, timeout=GUARD)
            await caller.hangup()
        [request] = lookups.received
        assert request.verified, request.problem

        async with asyncio.timeout(GUARD):
            while True:
                status, record = await call_record(pair.a, caller.call_sid)
                if status == 200 and record["end_reason"] is not None:
                    break
                await asyncio.sleep(0.1)
        assert record["transcript"][0]["text"].endswith("Hello Dana, how can I help you today?")
        assert record["direction"] == "inbound"
        assert record["variables"] == answer["variables"]
        assert record["metadata"] == answer["metadata"]
        events = await pair.sink.wait_for(2, timeout=GUARD)
        for event in events:
            assert event.json["data"]["variables"] == answer["variables"]
            assert event.json["data"]["metadata"] == answer["metadata"]
        # Every model session was told the caller's name: B's, and the one A pre-warmed.
        assert pair.model.sessions
        for session in pair.model.sessions:
            update = session.received_events("session.update")[0]
            assert "their first name is Dana" in update["session"]["instructions"]
