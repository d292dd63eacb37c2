"""Outbound calls end to end over real sockets: the dialer → the fake Twilio REST API (Calls
create) → the callee answers (Twilio requests the answer URL, signed, with AnsweredBy) → the
media stream with the persona's outbound greeting, or the voicemail message; calls nobody
answered reported as signed ``call.ended`` events to the persona's webhook."""

import asyncio
import json
import re
import xml.etree.ElementTree as ET
from datetime import datetime
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from outbound_kit import DENTAL, HOOK_SECRET, PERSONA, personas_sending_events

from phoneagent.audio import pcm16_to_ulaw
from phoneagent.delivery.signing import verify
from phoneagent.outbound.context import ANSWER_PATH, STATUS_PATH
from phoneagent.outbound.routes import DIALER
from phoneagent.outbound.rules import OutboundRefused
from phoneagent.testing.fake_model import CallTool, FakeRealtimeServer
from phoneagent.testing.speech import synthesize
from phoneagent.testing.stack import LocalStack
from phoneagent.testing.twilio_signing import Signature
from phoneagent.testing.webhook_sink import WebhookSink

CALLEE = "+14155550177"
# A Monday at 10:00 in the dental clinic's time zone: inside its calling hours.
MONDAY_10AM = datetime(2026, 12, 7, 10, 0, tzinfo=ZoneInfo("America/Los_Angeles"))


@pytest.fixture
async def sink():
    async with WebhookSink() as sink:
        yield sink


@pytest.fixture
def personas(tmp_path, sink, monkeypatch):
    """The example personas, the dental one sending call.ended to the sink."""
    return personas_sending_events(
        tmp_path / "personas", sink.url("/hooks"), monkeypatch, any_time=False
    )


@pytest.fixture
async def model():
    return FakeRealtimeServer(speed=None, script=["Great, see you Thursday."])


@pytest.fixture
async def stack(personas, model):
    async with LocalStack(personas, model=model) as stack:
        stack.twilio_api.add_number(DENTAL)  # the caller ID is on the account
        dialer(stack).now = lambda: MONDAY_10AM
        yield stack


def dialer(stack):
    return stack._runner.app[DIALER]


def outbound_greeting(stack):
    return stack.state.persona(PERSONA).outbound.greeting


async def place(stack, **fields):
    request = {"to": CALLEE, "persona": PERSONA, "from_": None, "variables": {}, "metadata": {}}
    return await dialer(stack).place(**(request | fields))


async def ended_events(sink, count):
    """The first ``count`` events the sink received, each checked against its signature."""
    received = await sink.wait_for(count, timeout=15)
    for request in received:
        verify(request.body, request.headers, HOOK_SECRET)
    return [r.json for r in received]


# --- placing the call ----------------------------------------------------------------------


async def test_a_placed_call_reaches_twilio_with_the_right_params(stack):
    call = await place(stack, variables={"caller_name": "Dana"}, metadata={"booking": 42})
    assert call["call_sid"].startswith("CA") and len(call["call_sid"]) == 34
    assert {k: v for k, v in call.items() if k != "call_sid"} == {
        "status": "queued", "to": CALLEE, "from": DENTAL, "persona": PERSONA,
        "direction": "outbound",
    }  # fmt: skip
    (created,) = await stack.twilio_api.wait_for_created(1)
    assert created.ok
    base = stack.settings.public_url
    assert created.params["To"] == CALLEE
    assert created.params["From"] == DENTAL  # the persona's first number
    assert created.params["Url"] == f"{base}{ANSWER_PATH}?persona={PERSONA}"
    assert created.params["Method"] == "POST"
    assert created.params["StatusCallback"] == f"{base}{STATUS_PATH}?persona={PERSONA}"
    assert created.status_callback_events == ["initiated", "ringing", "answered", "completed"]
    # The persona leaves a voicemail message: detection waits for the machine's beep.
    assert created.params["MachineDetection"] == "DetectMessageEnd"
    fake_call = stack.twilio_api.calls[call["call_sid"]]
    assert (fake_call.status, fake_call.direction) == ("queued", "outbound-api")
    record = stack.state.calls.get(call["call_sid"])
    assert (record.persona, record.caller, record.called) == (PERSONA, DENTAL, CALLEE)


async def test_a_person_answers_and_hears_the_outbound_greeting(stack, model, sink):
    call = await place(stack)
    async with await stack.twilio_api.answer(call["call_sid"], "human", speed=4.0) as callee:
        answer = callee.answer
        assert answer.ok, answer.problems
        assert answer.stream_url == stack.settings.stream_url
        assert answer.parameters["persona"] == PERSONA
        await callee.connect()
        callee.start_background_silence()
        await callee.wait_until_heard_ms(1000, timeout=20)  # the greeting has started
        await callee.wait_until_quiet(400, timeout=20)
        assert callee.heard_ms() > 1000  # the greeting was spoken and heard
        await callee.hangup()
    await model.wait_for(lambda: model.sessions_open == 0, 5)
    record = stack.state.calls.get(call["call_sid"])
    assert record.end_reason == "caller_hung_up"
    # Word for word: the outbound greeting, not the one inbound callers hear.
    assert record.transcript[0]["role"] == "agent"
    assert record.transcript[0]["text"] == outbound_greeting(stack)
    assert outbound_greeting(stack) != stack.state.persona(PERSONA).greeting
    await stack.twilio_api.finish(call["call_sid"], "completed")
    (event,) = await ended_events(sink, 1)
    assert (event["type"], event["data"]["end_reason"]) == ("call.ended", "caller_hung_up")
    assert (event["data"]["from"], event["data"]["to"]) == (DENTAL, CALLEE)


async def test_an_answering_machine_gets_the_voicemail_message(stack, model, sink):
    call = await place(stack)
    callee = await stack.twilio_api.answer(call["call_sid"], "machine_end_beep")
    async with callee:
        answer = callee.answer
        assert answer.ok, answer.problems
        persona = stack.state.persona(PERSONA)
        assert answer.says == [persona.outbound.voicemail_message]
        assert answer.say_attributes[0]["voice"] == persona.say_voice
        assert answer.hangup and answer.stream_url is None
    assert model.sessions_opened == 0  # no model session for a machine
    (event,) = await ended_events(sink, 1)
    assert event["type"] == "call.ended"
    assert event["data"]["end_reason"] == "voicemail"
    assert event["data"]["transcript"] == []
    record = stack.state.calls.get(call["call_sid"])
    assert (record.end_reason, record.status) == ("voicemail", "completed")


async def test_a_fax_is_hung_up_on(stack, sink):
    call = await place(stack)
    async with await stack.twilio_api.answer(call["call_sid"], "fax") as callee:
        assert callee.answer.verbs == ["Hangup"]
    (event,) = await ended_events(sink, 1)
    assert event["data"]["end_reason"] == "fax"


@pytest.mark.parametrize(
    ("status", "reason"),
    [("no-answer", "no_answer"), ("busy", "busy"), ("failed", "failed"), ("canceled", "canceled")],
)
async def test_a_call_nobody_answered_is_reported_once(stack, sink, status, reason):
    call = await place(stack)
    assert await stack.twilio_api.finish(call["call_sid"], status) == 204
    (event,) = await ended_events(sink, 1)
    assert event["type"] == "call.ended"
    data = event["data"]
    assert (data["call_sid"], data["end_reason"], data["transcript"]) == (
        call["call_sid"], reason, []
    )  # fmt: skip
    assert (data["from"], data["to"], data["persona"]["id"]) == (DENTAL, CALLEE, PERSONA)
    record = stack.state.calls.get(call["call_sid"])
    assert (record.status, record.end_reason) == (status, reason)
    # Twilio's signature has no timestamp: the same callback again reports nothing more.
    fake_call = stack.twilio_api.calls[call["call_sid"]]
    fake_call.sequence = 1
    assert await stack.twilio_api._progress(fake_call, status, "completed", None) == 204
    await stack.twilio_api.settle()
    assert len(sink.received) == 1


# --- refusals ------------------------------------------------------------------------------


async def test_outside_calling_hours_is_refused_before_twilio_is_asked(stack):
    dialer(stack).now = lambda: datetime(
        2026, 12, 7, 20, 30, tzinfo=ZoneInfo("America/Los_Angeles")
    )
    with pytest.raises(OutboundRefused) as refused:
        await place(stack)
    assert (refused.value.code, refused.value.status) == ("outside_calling_hours", 409)
    assert "09:00-18:00 (America/Los_Angeles); it is mon 20:30 there" in refused.value.message
    dialer(stack).now = lambda: datetime(2026, 12, 12, 10, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    with pytest.raises(OutboundRefused) as refused:  # a Saturday, in Los Angeles too
        await place(stack)
    assert "it is sat 01:00 there" in refused.value.message
    assert stack.twilio_api.created == []


async def test_over_the_concurrency_limit_is_refused_until_a_call_ends(stack):
    placed = [await place(stack, to=f"+1415555020{i}") for i in range(3)]  # the limit: 3
    with pytest.raises(OutboundRefused) as refused:
        await place(stack, to="+14155550209")
    assert (refused.value.code, refused.value.status) == ("too_many_calls", 429)
    assert "already has 3 outbound calls under way" in refused.value.message
    assert len(stack.twilio_api.created) == 3
    await stack.twilio_api.finish(placed[0]["call_sid"], "busy")
    again = await place(stack, to="+14155550209")
    assert again["status"] == "queued"
    async with aiohttp.ClientSession() as http, http.get(stack.metrics_url) as response:
        metrics = await response.text()
    assert 'phoneagent_outbound_calls_total{outcome="placed"} 4.0' in metrics
    assert 'phoneagent_outbound_calls_total{outcome="too_many_calls"} 1.0' in metrics
    assert 'phoneagent_outbound_calls_total{outcome="busy"} 1.0' in metrics


async def test_requests_twilio_cannot_place_are_refused_naming_the_field(stack):
    with pytest.raises(OutboundRefused) as refused:
        await place(stack, persona="nobody")
    assert (refused.value.code, refused.value.field) == ("invalid_request", "persona")
    with pytest.raises(OutboundRefused) as refused:
        await place(stack, persona="trattoria-luca")
    assert (refused.value.code, refused.value.field) == ("invalid_request", "persona")
    with pytest.raises(OutboundRefused) as refused:
        await place(stack, to="0041 79 123 45 67")
    assert (refused.value.code, refused.value.field, refused.value.status) == (
        "invalid_request", "to", 422
    )  # fmt: skip
    with pytest.raises(OutboundRefused) as refused:
        await place(stack, from_="+1 415")
    assert refused.value.field == "from"
    with pytest.raises(OutboundRefused) as refused:
        await place(stack, from_="+14155550999")  # not a number of the persona
    assert (refused.value.field, refused.value.status) == ("from", 422)
    assert "persona's own numbers" in refused.value.message
    assert stack.twilio_api.created == []
    # Twilio's own refusal: its code and message, never a credential.
    stack.twilio_api.fail_next(status=400, code=21210, message="'From' phone number not verified")
    with pytest.raises(OutboundRefused) as refused:
        await place(stack, from_=DENTAL)  # the persona's, but not verified on the account
    assert (refused.value.code, refused.value.field, refused.value.status) == (
        "invalid_request", "from", 422
    )  # fmt: skip
    assert "21210" in refused.value.message
    assert stack.settings.twilio_auth_token not in refused.value.message
    stack.twilio_api.fail_next(status=503, code=20503, message="Service Unavailable")
    with pytest.raises(OutboundRefused) as refused:
        await place(stack)
    assert (refused.value.code, refused.value.field, refused.value.status) == (
        "twilio_refused", None, 502
    )  # fmt: skip


# --- hostile input -------------------------------------------------------------------------


@pytest.mark.parametrize("signature", [Signature.MISSING, Signature.WRONG])
async def test_unsigned_or_forged_answer_and_status_are_refused(stack, model, sink, signature):
    call = await place(stack)
    base = stack.settings.public_url
    async with stack.caller(to=CALLEE, from_=DENTAL, call_sid=call["call_sid"]) as forger:
        answer = await forger.pick_up(f"{base}{ANSWER_PATH}?persona={PERSONA}", "human",
                                      signature=signature)  # fmt: skip
        assert answer.status == 403
        params = forger.webhook_params("busy")
        status, _, _ = await forger.post_to(f"{base}{STATUS_PATH}?persona={PERSONA}", params,
                                            signature)  # fmt: skip
        assert status == 403
    assert model.sessions_opened == 0
    record = stack.state.calls.get(call["call_sid"])
    assert record.status == "queued" and record.end_reason is None
    assert sink.received == []


async def test_answers_for_calls_we_did_not_place_hang_up(stack, model):
    base = stack.settings.public_url
    # A persona that does not exist, and one that does not call out.
    for persona in ("nobody", "trattoria-luca"):
        async with stack.caller(to=CALLEE, from_=DENTAL) as stranger:
            answer = await stranger.pick_up(f"{base}{ANSWER_PATH}?persona={persona}", "human")
            assert answer.verbs == ["Hangup"]
    # An inbound call's SID: known, but not placed by us.
    async with stack.caller(to=DENTAL) as inbound:
        assert (await inbound.dial()).stream_url is not None
        answer = await inbound.pick_up(f"{base}{ANSWER_PATH}?persona={PERSONA}", "human")
        assert answer.verbs == ["Hangup"]
    # A call placed for one persona cannot be answered as another's.
    call = await place(stack)
    async with stack.caller(to=CALLEE, from_=DENTAL, call_sid=call["call_sid"]) as callee:
        url = f"{base}{ANSWER_PATH}?persona=renxin-clinic"
        assert (await callee.pick_up(url, "human")).verbs == ["Hangup"]
    assert model.sessions_opened == 1  # the inbound call's pre-warm only


async def test_a_replayed_answer_gets_the_same_twiml_and_starts_nothing_new(stack, model):
    call = await place(stack)
    callee = await stack.twilio_api.answer(call["call_sid"], "human")
    async with callee:
        first = callee.answer.body
        again = await callee.pick_up(stack.twilio_api.calls[call["call_sid"]].url, "human")
        assert again.body == first
    assert model.sessions_opened == 1


async def test_mask_caller_masks_the_person_called(personas, sink):
    """For a call the persona placed, the person on the line is `to`: that is the number masked
    (`from` is the persona's own)."""
    dental = personas / f"{PERSONA}.toml"
    dental.write_text(dental.read_text() + "mask_caller = true\n")
    async with LocalStack(personas, model=FakeRealtimeServer(speed=None)) as stack:
        stack.twilio_api.add_number(DENTAL)
        dialer(stack).now = lambda: MONDAY_10AM
        call = await place(stack)
        await stack.twilio_api.finish(call["call_sid"], "no-answer")
        (event,) = await ended_events(sink, 1)
    assert (event["data"]["from"], event["data"]["to"]) == (DENTAL, "+*******0177")
    assert CALLEE not in json.dumps(event)


async def test_a_transfer_during_an_outbound_call_shows_the_personas_number(stack, model):
    """The person called asks for a human: the <Dial> shows the persona's own number (the
    call's From), not the callee's (Twilio refuses a caller ID the account does not own)."""
    model.script = (CallTool("transfer_call", {"target": "front_desk"}),)
    call = await place(stack)
    async with await stack.twilio_api.answer(call["call_sid"], "human", speed=4.0) as callee:
        await callee.connect()
        callee.start_background_silence()
        await callee.wait_until_heard_ms(1000, timeout=20)
        await callee.wait_until_quiet(400, timeout=20)
        await callee.play(pcm16_to_ulaw(synthesize("Can I talk to a person?", sample_rate=8000)))
        [update] = await stack.twilio_api.wait_for_updates(1, timeout=30)
        await callee.wait_closed(timeout=10)
    dial = ET.fromstring(update.params["Twiml"]).find("Dial")
    assert dial.text == "+14155550111"
    assert dial.get("callerId") == DENTAL
    assert parse_qs(urlsplit(dial.get("action")).query)["to"] == [CALLEE]


async def test_an_outbound_call_the_agent_cannot_take_gets_the_apology_from_the_personas_line(
    personas,
):
    """The model cannot be reached: the person called hears the apology, then the fallback
    target is dialled showing the persona's number (the call's From)."""
    model = FakeRealtimeServer(handshake_delay=3.0)  # the upgrade is never answered in time
    async with LocalStack(personas, model=model) as stack:
        stack.state.prewarmer.connector.open_timeout = 0.3
        stack.twilio_api.add_number(DENTAL)
        dialer(stack).now = lambda: MONDAY_10AM
        call = await place(stack)
        async with await stack.twilio_api.answer(call["call_sid"], "human", speed=0) as callee:
            await callee.connect()
            after = await callee.wait_call_over(timeout=10)
        assert after is not None and after.ok, after
        assert after.says == [stack.state.persona(PERSONA).apology]
        dial = ET.fromstring(after.body).find("Dial")
        assert (dial.text, dial.get("callerId")) == ("+14155550111", DENTAL)


async def test_variables_and_metadata_of_the_wrong_shape_are_refused(stack):
    for fields, field in (({"variables": ["a"]}, "variables"), ({"metadata": ["a"]}, "metadata"),
                          ({"variables": {"a": 1}}, "variables.a")):  # fmt: skip
        with pytest.raises(OutboundRefused) as refused:
            await place(stack, **fields)
        assert refused.value.field == field
    assert stack.twilio_api.created == []


async def test_without_a_voicemail_message_a_machine_is_hung_up_on(personas, sink):
    dental = personas / f"{PERSONA}.toml"
    text = dental.read_text()
    dental.write_text(re.sub(r"(?m)^voicemail_message = .*$", "", text))
    async with LocalStack(personas, model=FakeRealtimeServer(speed=None)) as stack:
        stack.twilio_api.add_number(DENTAL)
        dialer(stack).now = lambda: MONDAY_10AM
        call = await place(stack)
        (created,) = stack.twilio_api.created
        assert created.params["MachineDetection"] == "Enable"  # no beep to wait for
        async with await stack.twilio_api.answer(call["call_sid"], "machine_start") as callee:
            assert callee.answer.verbs == ["Hangup"]
        (event,) = await ended_events(sink, 1)
        assert event["data"]["end_reason"] == "voicemail"


async def test_a_voicemail_message_says_markup_in_a_value_as_text(stack, sink):
    """A variable's value goes into TwiML's <Say> as text: '<', '&' and ']]>' are escaped, and
    no value adds a verb (the message is said, then the call hangs up)."""
    hostile = '<Dial>+19005550100</Dial> & "Dana" ]]>'
    call = await place(stack, variables={"caller_name": hostile})
    async with await stack.twilio_api.answer(call["call_sid"], "machine_end_beep") as callee:
        answer = callee.answer
        assert answer.ok, answer.problems
        assert answer.verbs == ["Say", "Hangup"]
        assert answer.says == [
            f"Hello {hostile}, this is Bright Smile Dental calling about your upcoming "
            "appointment. Please call us back at 415 555 0100. Thank you!"
        ]
    (event,) = await ended_events(sink, 1)
    assert event["data"]["variables"]["caller_name"] == hostile


async def test_a_progress_callback_before_twilio_answers_the_create_keeps_the_calls_values(
    stack, monkeypatch
):
    """Twilio's status callbacks are asynchronous: "initiated" may arrive before the answer to
    Calls create reaches the dialer, which only then records the call's context. The callback
    must not record the persona's defaults in its place."""
    rest = dialer(stack)._rest
    create = rest.create

    async def create_then_initiated(**params):
        call = await create(**params)
        async with stack.caller(to=CALLEE, from_=DENTAL, call_sid=call["sid"]) as twilio:
            status, _, _ = await twilio.post_to(
                params["status_callback"], twilio.webhook_params("queued")
            )
            assert status == 204
        return call

    monkeypatch.setattr(rest, "create", create_then_initiated)
    call = await place(stack, variables={"caller_name": "Dana"}, metadata={"crm": "c-1"})
    record = stack.state.calls.get(call["call_sid"])
    assert (record.direction, record.variables["caller_name"]) == ("outbound", "Dana")
    assert record.metadata == {"crm": "c-1"}


async def test_a_person_the_server_has_no_room_for_is_reported_once(stack, model, sink):
    """A person answers while the server is at PHONEAGENT_MAX_CALLS: they hear the apology, no
    stream runs, and the business learns how the call ended: one call.ended ("error"), even
    though Twilio's completed callback says only that a person answered."""
    call = await place(stack, variables={"caller_name": "Dana"})
    stack.state.answering += stack.settings.max_calls  # every place taken
    try:
        async with await stack.twilio_api.answer(call["call_sid"], "human") as callee:
            assert callee.answer.verbs == ["Say", "Hangup"]
            assert callee.answer.says == [stack.state.persona(PERSONA).apology]
    finally:
        stack.state.answering -= stack.settings.max_calls
    (event,) = await ended_events(sink, 1)
    assert (event["type"], event["data"]["end_reason"]) == ("call.ended", "error")
    assert event["data"]["variables"]["caller_name"] == "Dana"
    assert model.sessions_opened == 0
    record = stack.state.calls.get(call["call_sid"])
    assert (record.end_reason, record.status) == ("no_capacity", "completed")
    await asyncio.sleep(0.3)
    assert len(sink.received) == 1


async def test_a_person_who_hangs_up_before_the_stream_starts_is_reported_once(stack, sink):
    """A person picks up and hangs up between the agent's TwiML and the media stream's start:
    no stream reports the call, so Twilio's completed callback does: one call.ended, with no
    call.started and no turns. The stream token is spent: a stream opening late is refused."""
    call = await place(stack, variables={"caller_name": "Dana"})
    callee = await stack.twilio_api.answer(call["call_sid"], "human", speed=0)
    async with callee:
        assert callee.answer.ok and callee.answer.stream_url  # the agent's TwiML
        assert await stack.twilio_api.finish(call["call_sid"], "completed") == 204
        (event,) = await ended_events(sink, 1)
        await callee.connect()  # too late: its token has been used
        await callee.wait_closed(timeout=5)
        assert callee.closed_by_server and callee.messages("media") == []
    data = event["data"]
    assert (event["type"], data["end_reason"]) == ("call.ended", "caller_hung_up")
    assert data["transcript"] == []
    assert data["started_at"] == data["ended_at"]
    assert (data["from"], data["to"], data["variables"]["caller_name"]) == (DENTAL, CALLEE, "Dana")
    record = stack.state.calls.get(call["call_sid"])
    assert (record.end_reason, record.status) == ("caller_hung_up", "completed")
    assert record.started_at is None
    # The same callback again (Twilio's signature has no timestamp) reports nothing more.
    fake_call = stack.twilio_api.calls[call["call_sid"]]
    fake_call.sequence = 1
    assert await stack.twilio_api._progress(fake_call, "completed", "completed", None) == 204
    await asyncio.sleep(0.3)
    assert len(sink.received) == 1


@pytest.mark.parametrize("attempt", range(4))
async def test_a_stream_starting_as_the_call_completes_leaves_one_report(
    stack, model, sink, attempt
):
    """The stream's start and Twilio's completed callback race: whichever claims the stream
    token first reports the call, the other nothing (here the stream may start, then the
    callee hangs up). One call.ended either way."""
    call = await place(stack)
    callee = await stack.twilio_api.answer(call["call_sid"], "human", speed=0)
    async with callee:
        completed = asyncio.create_task(stack.twilio_api.finish(call["call_sid"], "completed"))
        await asyncio.sleep(attempt * 0.002)  # the two orders, and in between
        await callee.connect()
        assert await completed == 204
        # The stream runs (it claimed the token first) or is closed at once.
        async with asyncio.timeout(5):
            while not (callee.closed_by_server or callee.messages("media")):
                await asyncio.sleep(0.01)
        if not callee.closed_by_server:
            await callee.hangup()
        await callee.wait_closed(timeout=5)
    await ended_events(sink, 1)
    await asyncio.sleep(0.5)  # a second call.ended would be a double report
    ended = [r.json for r in sink.received if r.json["type"] == "call.ended"]
    assert len(ended) == 1
    assert ended[0]["data"]["end_reason"] == "caller_hung_up"


async def test_a_person_the_agent_cannot_take_is_reported_once(stack, model, sink):
    """A person answers, the stream starts (claiming the call's stream token) and is refused:
    the model is away. They hear the apology; Twilio's completed callback, finding the token
    spent, leaves the report to the stream, so the stream's refusal reports the call: one
    call.ended ("error"), with no call.started and no turns."""
    call = await place(stack, variables={"caller_name": "Dana"})
    model.fail_next_handshakes(50, status=503)  # the pre-warm and the stream's own open fail
    callee = await stack.twilio_api.answer(call["call_sid"], "human", speed=0)
    async with callee:
        assert callee.answer.ok and callee.answer.stream_url  # the agent's TwiML
        await callee.connect()
        after = await callee.wait_call_over(timeout=10)
        assert after is not None and after.says == [stack.state.persona(PERSONA).apology]
        assert callee.messages("media") == []
        (event,) = await ended_events(sink, 1)
        assert await stack.twilio_api.finish(call["call_sid"], "completed") == 204
    data = event["data"]
    assert (event["type"], data["end_reason"], data["direction"]) == (
        "call.ended", "error", "outbound"
    )  # fmt: skip
    assert (data["from"], data["to"], data["variables"]["caller_name"]) == (DENTAL, CALLEE, "Dana")
    assert data["transcript"] == []
    record = stack.state.calls.get(call["call_sid"])
    assert (record.end_reason, record.status) == ("agent_unavailable", "completed")
    assert record.started_at is None
    await asyncio.sleep(0.5)  # the completed callback must not report it again
    assert len(sink.received) == 1


async def test_a_call_completing_while_its_refused_stream_opens_is_reported_once(personas, sink):
    """The other order: the stream has claimed the token and waits for the model when Twilio's
    completed callback comes (the person hung up during the set-up). The callback leaves the
    report to the stream, whose refusal then reports it: one call.ended."""
    model = FakeRealtimeServer(handshake_delay=5.0)  # the upgrade is never answered in time
    async with LocalStack(personas, model=model) as stack:
        stack.state.prewarmer.connector.open_timeout = 1.5
        stack.twilio_api.add_number(DENTAL)
        dialer(stack).now = lambda: MONDAY_10AM
        call = await place(stack)
        sid = call["call_sid"]
        async with await stack.twilio_api.answer(sid, "human", speed=0) as callee:
            await callee.connect()
            async with asyncio.timeout(5):  # the stream's start is read, its token claimed
                while sid not in stack.state.opening_calls:
                    await asyncio.sleep(0.01)
            assert await stack.twilio_api.finish(sid, "completed") == 204
            assert stack.state.calls.get(sid).ended_at is None  # left to the stream
            assert not callee.closed_by_server
            await callee.wait_closed(timeout=10)
            assert callee.closed_by_server and callee.messages("media") == []
        (event,) = await ended_events(sink, 1)
        assert (event["type"], event["data"]["end_reason"]) == ("call.ended", "error")
        assert stack.state.calls.get(sid).end_reason == "agent_unavailable"
        await asyncio.sleep(0.5)
        assert len(sink.received) == 1


async def test_a_number_our_personas_answer_is_never_called(stack):
    """The agent calling one of this server's own lines would talk to itself, holding two
    calls until the time limit: refused before Twilio is asked."""
    for line in ("+14155550142", "+14155550160"):  # Trattoria Luca's, Renxin Clinic's
        with pytest.raises(OutboundRefused) as refused:
            await place(stack, to=line)
        assert (refused.value.code, refused.value.field, refused.value.status) == (
            "invalid_request", "to", 422
        )  # fmt: skip
        assert "calling itself" in refused.value.message
    assert stack.twilio_api.created == []
