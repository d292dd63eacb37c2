"""Issue 18 end to end, over real sockets: ``POST /api/v1/calls`` with an API key → the server's
dialer → the fake Twilio REST API (Calls create) → the callee answers → the media stream, token
bound like an inbound one, opening with the persona's outbound greeting filled with the call's
variables; a machine gets the voicemail message filled the same way; a call nobody answered is
reported. Every ``call.ended`` carries the call's direction, variables and metadata. And the
API's refusals: a key limited to another persona, outside the calling hours, too many calls, a
missing required variable, an unknown persona."""

import json
import re
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from api_kit import bearer, error_of, schema_check
from outbound_kit import DENTAL, HOOK_SECRET, PERSONA, personas_sending_events, send_events_to

from phoneagent.api.keys import new_key
from phoneagent.api.routes import API_KEYS, PREFIX
from phoneagent.delivery.signing import verify
from phoneagent.outbound.context import ANSWER_PATH, STATUS_PATH
from phoneagent.outbound.routes import DIALER
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.stack import LocalStack
from phoneagent.testing.webhook_sink import WebhookSink

CALLEE = "+14155550177"
REMINDERS = "dental-reminders"
# A persona that only calls out: a required variable, no numbers, its own caller ID.
REMINDERS_TOML = f"""\
name = "Bright Smile Dental reminders"
language = "en-US"
voice = "linjiajiejie"
greeting = "Bright Smile Dental, hello {{first_name}}."
instructions = "You remind {{first_name}} of their appointment on {{day}}."

[variables]
first_name = {{ required = true }}
day = {{ default = "Thursday" }}

[end_call]
goodbye = "Goodbye!"

[outbound]
greeting = "Hi {{first_name}}, a reminder of your cleaning on {{day}}."
from = "{DENTAL}"
"""
MONDAY_10AM = datetime(2026, 12, 7, 10, 0, tzinfo=ZoneInfo("America/Los_Angeles"))


@pytest.fixture
async def sink():
    async with WebhookSink() as sink:
        yield sink


@pytest.fixture
def personas(tmp_path, sink, monkeypatch):
    directory = personas_sending_events(tmp_path / "personas", sink.url("/hooks"), monkeypatch)
    (directory / f"{REMINDERS}.toml").write_text(REMINDERS_TOML)
    send_events_to(directory / f"{REMINDERS}.toml", sink.url("/hooks"))
    return directory


@pytest.fixture
async def stack(personas):
    model = FakeRealtimeServer(speed=None, script=["Great, see you Thursday."])
    async with LocalStack(personas, model=model) as stack:
        stack.twilio_api.add_number(DENTAL)
        yield stack


@pytest.fixture
async def client(stack):
    async with aiohttp.ClientSession(base_url=stack.base_url) as session:
        yield session


async def make_key(stack, *personas: str) -> str:
    key, text = new_key("test", personas, now=time.time())
    await stack._runner.app[API_KEYS].add(key)
    return text


async def post_call(client, key, body):
    async with client.post(f"{PREFIX}/calls", headers=bearer(key), json=body) as response:
        if response.status == 201:
            return response.status, await response.json()
        return response.status, await error_of(response)


DANA = {
    "to": CALLEE,
    "persona": PERSONA,
    "variables": {"caller_name": "Dana"},
    "metadata": {"patient_id": "p-1042", "campaign": "reminders"},
}
DANA_VALUES = {"caller_name": "Dana", "appointment": "none on file"}  # the other: its default


async def ended_event(sink):
    (request,) = await sink.wait_for(1, timeout=15)
    verify(request.body, request.headers, HOOK_SECRET)
    event = request.json
    assert event["type"] == "call.ended"
    return event["data"]


def assert_context(data_or_record, values=DANA_VALUES, metadata=DANA["metadata"]):
    get = (
        data_or_record.get if isinstance(data_or_record, dict) else data_or_record.__getattribute__
    )
    assert get("direction") == "outbound"
    assert dict(get("variables")) == values
    assert dict(get("metadata")) == metadata


async def test_a_call_placed_through_the_api_greets_the_callee_by_name(stack, client, sink):
    key = await make_key(stack, PERSONA)
    status, call = await post_call(client, key, DANA)
    assert status == 201, call
    schema_check("CallRequest", DANA)
    schema_check("PlacedCall", call)  # the OpenAPI document's answer, field for field
    assert (call["to"], call["from"], call["persona"]) == (CALLEE, DENTAL, PERSONA)
    (created,) = await stack.twilio_api.wait_for_created(1)
    base = stack.settings.public_url
    assert created.params["To"] == CALLEE and created.params["From"] == DENTAL
    assert created.params["Url"] == f"{base}{ANSWER_PATH}?persona={PERSONA}"
    assert created.params["StatusCallback"] == f"{base}{STATUS_PATH}?persona={PERSONA}"
    assert created.params["MachineDetection"] == "DetectMessageEnd"
    # Recorded when placed, before anyone answers: the context every instance reads.
    assert_context(stack.state.calls.get(call["call_sid"]))
    async with await stack.twilio_api.answer(call["call_sid"], "human", speed=4.0) as callee:
        answer = callee.answer
        assert answer.ok, answer.problems
        # The stream is an inbound one's: persona and a token, no context in the TwiML.
        assert set(answer.parameters) >= {"persona", "token"}
        assert "direction" not in answer.parameters
        await callee.connect()
        callee.start_background_silence()
        await callee.wait_until_heard_ms(1000, timeout=20)
        await callee.wait_until_quiet(400, timeout=20)
        await callee.hangup()
    model = stack.model
    await model.wait_for(lambda: model.sessions_open == 0, 5)
    greeting = (
        "Hello Dana, this is Maya from Bright Smile Dental, calling about your upcoming "
        "appointment. Is now a good time?"
    )
    record = stack.state.calls.get(call["call_sid"])
    assert record.transcript[0] == record.transcript[0] | {"role": "agent", "text": greeting}
    # The model was asked to say the filled greeting, and its session has the filled persona.
    (session,) = model.sessions
    requested = json.dumps(session.received_events("response.create"), ensure_ascii=False)
    assert "Hello Dana, this is Maya" in requested or "Hello Dana" in session.instructions
    assert "{caller_name}" not in session.instructions
    assert_context(record)
    await stack.twilio_api.finish(call["call_sid"], "completed")
    data = await ended_event(sink)
    assert data["end_reason"] == "caller_hung_up"
    assert data["transcript"][0]["text"] == greeting
    assert_context(data)


async def test_a_machine_gets_the_voicemail_message_with_the_variables(stack, client, sink):
    key = await make_key(stack)
    status, call = await post_call(client, key, DANA)
    assert status == 201, call
    async with await stack.twilio_api.answer(call["call_sid"], "machine_end_beep") as callee:
        assert callee.answer.ok, callee.answer.problems
        assert callee.answer.says == [
            "Hello Dana, this is Bright Smile Dental calling about your upcoming appointment. "
            "Please call us back at 415 555 0100. Thank you!"
        ]
    assert stack.model.sessions_opened == 0
    data = await ended_event(sink)
    assert (data["end_reason"], data["transcript"]) == ("voicemail", [])
    assert_context(data)


@pytest.mark.parametrize("status", ["no-answer", "busy"])
async def test_a_call_nobody_answered_is_reported_with_its_context(stack, client, sink, status):
    key = await make_key(stack)
    _, call = await post_call(client, key, DANA)
    assert await stack.twilio_api.finish(call["call_sid"], status) == 204
    data = await ended_event(sink)
    assert data["end_reason"] == status.replace("-", "_")
    assert (data["from"], data["to"]) == (DENTAL, CALLEE)
    assert_context(data)


async def test_a_persona_that_only_calls_out_needs_its_required_variable(stack, client, sink):
    key = await make_key(stack)
    status, error = await post_call(client, key, {"to": CALLEE, "persona": REMINDERS})
    assert (status, error["code"], error["field"]) == (
        422,
        "invalid_request",
        "variables.first_name",
    )
    assert error["message"].startswith("variables.first_name: required")
    assert stack.twilio_api.created == []
    body = {"to": CALLEE, "persona": REMINDERS, "variables": {"first_name": "Ana"}}
    status, call = await post_call(client, key, body)
    assert status == 201, call
    assert stack.twilio_api.created[0].params["From"] == DENTAL  # its `from`
    assert stack.twilio_api.created[0].params["MachineDetection"] == "Enable"
    async with await stack.twilio_api.answer(call["call_sid"], "human", speed=4.0) as callee:
        await callee.connect()
        callee.start_background_silence()
        await callee.wait_until_heard_ms(500, timeout=20)
        await callee.wait_until_quiet(400, timeout=20)
        await callee.hangup()
    await stack.model.wait_for(lambda: stack.model.sessions_open == 0, 5)
    record = stack.state.calls.get(call["call_sid"])
    assert record.transcript[0]["text"] == "Hi Ana, a reminder of your cleaning on Thursday."
    assert (
        "You remind Ana of their appointment on Thursday." in stack.model.sessions[0].instructions
    )
    assert_context(record, {"first_name": "Ana", "day": "Thursday"}, {})


async def test_the_apis_refusals(stack, client):
    other = await make_key(stack, "trattoria-luca")
    status, error = await post_call(client, other, DANA)
    assert (status, error["code"], error["field"]) == (403, "forbidden", "persona")
    key = await make_key(stack)
    for body, field in (
        (DANA | {"persona": "nobody"}, "persona"),
        (DANA | {"persona": "trattoria-luca"}, "persona"),  # it has no [outbound]
        (DANA | {"variables": {"nickname": "D"}}, "variables.nickname"),
        (DANA | {"variables": {"caller_name": "Dana\nSmith"}}, "variables.caller_name"),
        (DANA | {"metadata": {"blob": "x" * 5000}}, "metadata"),
        (DANA | {"to": DENTAL}, "to"),  # the caller ID itself
    ):
        status, error = await post_call(client, key, body)
        assert (status, error["code"], error["field"]) == (422, "invalid_request", field), error
        assert error["message"].startswith(f"{field}: ")
    assert stack.twilio_api.created == []
    # Too many: the persona's max_concurrent_calls (3) under way.
    for i in range(3):
        status, _ = await post_call(client, key, DANA | {"to": f"+1415555020{i}"})
        assert status == 201
    status, error = await post_call(client, key, DANA | {"to": "+14155550209"})
    assert (status, error["code"]) == (429, "too_many_calls")
    assert "already has 3 outbound calls under way" in error["message"]
    assert "field" not in error


async def test_outside_calling_hours_is_409(tmp_path, sink, monkeypatch):
    monkeypatch.setenv("OUTBOUND_HOOK_SECRET", HOOK_SECRET)
    from conftest import EXAMPLE_PERSONAS  # the example's own calling hours

    async with LocalStack(EXAMPLE_PERSONAS) as stack:
        stack._runner.app[DIALER].now = lambda: MONDAY_10AM.replace(hour=20)
        key = await make_key(stack)
        async with aiohttp.ClientSession(base_url=stack.base_url) as client:
            status, error = await post_call(client, key, DANA)
            assert (status, error["code"]) == (409, "outside_calling_hours")
            assert re.search(
                r"09:00-18:00 \(America/Los_Angeles\); it is mon 20:\d\d", error["message"]
            )
            stack._runner.app[DIALER].now = lambda: MONDAY_10AM
            stack.twilio_api.add_number(DENTAL)
            status, call = await post_call(client, key, DANA)
            assert status == 201, call
