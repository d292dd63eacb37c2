"""A call's events reach the persona's webhook: signed, with the transcript, once per id."""

import json
import shutil

import aiohttp
import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.config import Settings
from phoneagent.delivery.signing import verify
from phoneagent.testing.fake_model import (
    CallTool,
    FakeRealtimeServer,
    ScriptedResponder,
    queued_transcripts,
)
from phoneagent.testing.stack import LocalStack, demo_credentials
from phoneagent.testing.wav import CALLER_BOOKING_WAV
from phoneagent.testing.webhook_sink import WebhookSink

DENTAL = "+14155550100"
SECRET = "whsec_" + "c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cw=="
CALLER = "+14155550123"


@pytest.fixture
async def sink():
    async with WebhookSink() as sink:
        yield sink


@pytest.fixture
def personas(tmp_path, sink, monkeypatch):
    """The examples, the dental line sending every event, caller masked, to the sink."""
    monkeypatch.setenv("DENTAL_WEBHOOK_SECRET", SECRET)
    directory = tmp_path / "personas"
    shutil.copytree(EXAMPLE_PERSONAS, directory)
    dental = directory / "bright-smile-dental.toml"
    dental.write_text(
        dental.read_text()
        + f'\n[webhook]\nurl = "{sink.url("/hooks")}"\nsecret_env = "DENTAL_WEBHOOK_SECRET"\n'
        'events = ["call.started", "call.ended"]\nmask_caller = true\n'
    )
    return directory


async def test_call_started_and_ended_are_delivered_signed_with_the_transcript(personas, sink):
    transcriber = queued_transcripts(["Book me for Tuesday."])
    model = FakeRealtimeServer(speed=None, script=["Sure, Tuesday works."], transcriber=transcriber)
    async with LocalStack(personas, model=model) as stack:
        async with stack.caller(to=DENTAL, from_=CALLER, speed=4.0) as caller:
            await caller.dial()
            await caller.connect()
            caller.start_background_silence()
            # The greeting generated first: the caller's quiet counts from the call's start, so
            # it holds before the greeting's first delta (later than 100 ms of wall time when
            # busy), and the caller's turn would then barge into the greeting.
            await model.wait_for(
                lambda: model.sessions and model.sessions[0].sent_events("response.done"), 20
            )
            await caller.wait_until_quiet(400, timeout=20)
            await caller.play_wav(CALLER_BOOKING_WAV)
            await model.wait_for(lambda: len(model.sessions[0].sent_events("response.done")) >= 2)
            await caller.wait_until_quiet(400, timeout=20)
            await caller.hangup()
        await sink.wait_for(2, timeout=10)

    started, ended = sorted(sink.received, key=lambda r: r.json["type"] != "call.started")
    for request in (started, ended):
        assert request.path == "/hooks"
        assert verify(request.body, request.headers, SECRET) == request.json["id"]
    assert started.json["type"] == "call.started"
    data = ended.json["data"]
    assert ended.json["schema"] == 1
    assert data["call_sid"] == caller.call_sid
    assert data["persona"] == {
        "id": "bright-smile-dental",
        "name": "Bright Smile Dental front desk",
    }
    assert (data["from"], data["from_masked"], data["to"]) == ("+*******0123", True, DENTAL)
    assert data["end_reason"] == "caller_hung_up"
    assert [(t["role"], t["text"]) for t in data["transcript"]][1:] == [
        ("caller", "Book me for Tuesday."),
        ("agent", "Sure, Tuesday works."),
    ]
    assert CALLER not in json.dumps(ended.json)  # masked everywhere


async def test_a_line_without_a_webhook_publishes_nothing(personas, sink):
    async with LocalStack(personas) as stack, stack.caller(to="+14155550142", speed=0) as caller:
        await caller.dial()
        await caller.connect()
        await caller.wait_for_event("media", timeout=20)
        await caller.hangup()
        await caller.wait_closed()
    assert sink.received == []


async def test_events_queued_while_the_receiver_is_down_are_delivered_after_a_restart(
    personas, sink, tmp_path
):
    """The outbox is on disk: a server stopped before delivery hands the event to the next."""
    sid, token = demo_credentials()
    settings = Settings(twilio_account_sid=sid, twilio_auth_token=token,
                        personas_dir=personas, data_dir=tmp_path / "data")  # fmt: skip
    await sink.stop()  # the business's receiver is down
    async with LocalStack(personas, settings=settings) as stack:
        async with stack.caller(to=DENTAL, speed=0) as caller:
            await caller.dial()
            await caller.connect()
            await caller.wait_for_event("media", timeout=20)
            await caller.hangup()
        call_sid = caller.call_sid
    await sink.start()
    async with LocalStack(personas, settings=settings):
        await sink.wait_for(2, timeout=15)  # the first attempt after start-up: 5 s at most
    assert {r.json["data"]["call_sid"] for r in sink.received} == {call_sid}
    assert len({r.json["id"] for r in sink.received}) == 2


async def test_a_transfer_is_reported_and_ends_the_call_as_transferred(personas, sink):
    dental = personas / "bright-smile-dental.toml"
    dental.write_text(dental.read_text().replace('"call.started", "call.ended"',
                                                 '"call.transferred", "call.ended"'))  # fmt: skip
    transfer = CallTool("transfer_call", {"target": "front_desk", "reason": "a billing question"})
    model = FakeRealtimeServer(speed=8.0, script=[transfer])
    async with LocalStack(personas, model=model) as stack:
        async with stack.caller(to=DENTAL, speed=4.0) as caller:
            await caller.dial()
            await caller.connect()
            caller.start_background_silence()
            # The greeting generated first (quiet alone holds before its first delta).
            await model.wait_for(
                lambda: model.sessions and model.sessions[0].sent_events("response.done"), 30
            )
            await caller.wait_until_quiet(300, timeout=30)
            await caller.play_wav(CALLER_BOOKING_WAV)
            await caller.wait_closed(timeout=30)  # Twilio stopped the stream: transferred
        await sink.wait_for(2, timeout=10)

    transferred, ended = sorted(sink.received, key=lambda r: r.json["type"] != "call.transferred")
    assert transferred.json["data"]["target"] == "front_desk"
    assert transferred.json["data"]["target_number"] == "+14155550111"
    assert transferred.json["data"]["outcome"] == "accepted"
    assert transferred.json["data"]["reason"] == "a billing question"  # as the model gave it
    assert ended.json["data"]["end_reason"] == "transferred"
    assert ended.json["data"]["transfer"] == {
        "target": "front_desk",
        "number": "+14155550111",
        "reason": "a billing question",
    }


async def test_a_call_back_from_an_unanswered_transfer_ends_without_naming_that_transfer(
    personas, sink
):
    """README: the part after a transfer nobody answered is its own call.started/call.ended;
    how it ended is its own, so its `transfer` is null (it did not transfer). The record keeps
    the transfer with the Dial status as its error, as call.transferred reported it."""
    dental = personas / "bright-smile-dental.toml"
    dental.write_text(dental.read_text().replace('"call.started", "call.ended"',
                      '"call.started", "call.transferred", "call.ended"'))  # fmt: skip
    transfer = CallTool("transfer_call", {"target": "front_desk", "reason": "a billing question"})
    # One script for both model sessions: the agent back with the caller does not transfer.
    replies = ScriptedResponder([transfer, "Sorry, nobody is free. How can I help?"])
    model = FakeRealtimeServer(speed=8.0, responder=replies)
    async with LocalStack(personas, model=model) as stack:
        async with stack.caller(to=DENTAL, from_=CALLER, speed=4.0) as caller:
            await caller.dial()
            await caller.connect()
            caller.start_background_silence()
            await caller.wait_until_quiet(300, timeout=30)
            await caller.play_wav(CALLER_BOOKING_WAV)
            [update] = await stack.twilio_api.wait_for_updates(1, timeout=30)
            await caller.wait_closed(timeout=30)  # Twilio stopped the stream: transferred
        await sink.wait_for(3, timeout=10)  # the first part is reported before anyone rings
        back = stack.caller(to=DENTAL, from_=CALLER, call_sid=caller.call_sid, speed=4.0)
        async with back:
            await back.request_dial_action(update.params["Twiml"], "no-answer")
            await back.connect()
            back.start_background_silence()
            await back.wait_until_heard_ms(500, timeout=30)  # the agent speaks again
            await back.hangup()
        await sink.wait_for(6, timeout=10)
        account = {"Authorization": aiohttp.encode_basic_auth(
            stack.settings.twilio_account_sid, stack.settings.twilio_auth_token)}  # fmt: skip
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{stack.base_url}/calls/{caller.call_sid}", headers=account) as response,
        ):
            record = await response.json()

    events = [r.json for r in sorted(sink.received, key=lambda r: r.json["timestamp"])]
    ended = [e["data"] for e in events if e["type"] == "call.ended"]
    transferred = [e["data"] for e in events if e["type"] == "call.transferred"]
    assert len([e for e in events if e["type"] == "call.started"]) == 2
    assert [(t["outcome"], t["error"]) for t in transferred] == [
        ("accepted", None),
        ("failed", "no-answer"),
    ]
    assert transferred[1]["reason"] == "a billing question"
    first, second = sorted(ended, key=lambda data: data["started_at"])
    assert first["end_reason"] == "transferred"
    assert first["transfer"] == {
        "target": "front_desk",
        "number": "+14155550111",
        "reason": "a billing question",
    }
    assert second["end_reason"] == "caller_hung_up"
    assert second["transfer"] is None  # this part did not transfer
    # The record is the whole call's: the transfer tried, and that nobody answered it.
    assert record["end_reason"] == "caller_hung_up"
    assert record["transfer"] == {
        "target": "front_desk",
        "number": "+14155550111",
        "reason": "a billing question",
        "error": "no-answer",
    }
