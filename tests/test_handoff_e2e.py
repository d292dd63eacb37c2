"""Transfer, hang-up and keypad over real sockets: fake model tool calls, fake Twilio REST API.

Twilio's REST fake stops the caller's media stream when a call is redirected or completed,
as Twilio does, so every handoff here plays out to the end of the stream.
"""

import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.audio import pcm16_to_ulaw
from phoneagent.testing.fake_model import CallTool, FakeRealtimeServer
from phoneagent.testing.speech import synthesize
from phoneagent.testing.stack import LocalStack

DENTAL = "+14155550100"
FRONT_DESK = "+14155550111"
SPEED = 4.0


def speech(text: str) -> bytes:
    return pcm16_to_ulaw(synthesize(text, sample_rate=8000))


# The fake model in its two shapes: every field of the reference's tables, and exactly what
# StepFun's documented samples show (no response_id on deltas, the guide's tool-call events).
# A representative subset of this file's tests runs in both, to keep the suite's time in check.
BOTH_SHAPES = pytest.mark.parametrize("model", ["full", "documented"], indirect=True)


@pytest.fixture
async def model(request):
    return FakeRealtimeServer(speed=8.0, shape=getattr(request, "param", "full"))


@pytest.fixture
async def stack(model):
    async with LocalStack(EXAMPLE_PERSONAS, model=model, call_speed=SPEED) as stack:
        stack.state.handoffs.rest.timeout = 1.0
        yield stack


@pytest.fixture
def persona(stack):
    return stack.state.personas.current.personas["bright-smile-dental"]


async def start_call(stack, **options):
    caller = stack.caller(to=DENTAL, speed=SPEED, **options)
    await caller.__aenter__()
    await caller.dial()
    await caller.connect()
    caller.start_background_silence()
    # The greeting generated in full, then heard out: 300 ms of quiet alone can fall in a pause
    # of the model's deltas on a busy machine, mid-greeting.
    model = stack.model
    await model.wait_for(
        lambda: model.sessions and model.sessions[0].sent_events("response.done"), 30
    )
    await caller.wait_until_quiet(300, timeout=30)
    return caller


def watch_updates(stack, caller) -> list[dict]:
    """What the caller had heard and had still queued when each REST update arrived."""
    seen = []
    stack.twilio_api.on_update(
        caller.call_sid,
        lambda update: seen.append(
            {
                "heard_ms": caller.heard_ms(),
                "buffered_ms": caller.playback.buffered_ms(caller.now_ms()),
            }
        ),
    )
    return seen


@BOTH_SHAPES
async def test_transfer_happens_only_after_the_announcement_was_heard(stack, model, persona):
    model.script = (CallTool("transfer_call", {"target": "front_desk", "reason": "billing"}),)
    caller = await start_call(stack)
    seen = watch_updates(stack, caller)
    heard_before = caller.heard_ms()
    await caller.play(speech("Can I talk to someone about my bill?"))
    [update] = await stack.twilio_api.wait_for_updates(1, timeout=30)
    await caller.wait_closed(timeout=10)
    await caller.__aexit__(None, None, None)

    announcement = persona.transfer["front_desk"].announcement
    announcement_ms = len(synthesize(announcement)) / 48
    assert seen[0]["buffered_ms"] == 0  # nothing left to play: the sentence was heard out
    assert seen[0]["heard_ms"] - heard_before == pytest.approx(announcement_ms, abs=40)
    # The TwiML Twilio got: <Dial> to the target, our line as caller id, an absolute action.
    dial = ET.fromstring(update.params["Twiml"]).find("Dial")
    assert dial.text == FRONT_DESK
    assert dial.get("callerId") == DENTAL
    assert dial.get("timeout") == "25"
    action = urlsplit(dial.get("action"))
    assert f"{action.scheme}://{action.netloc}" == stack.base_url
    assert action.path == "/twilio/dial-status"
    assert parse_qs(action.query) == {
        "persona": ["bright-smile-dental"],
        "target": ["front_desk"],
        "from": [caller.from_],
        "to": [DENTAL],
    }
    # The `stop` that followed is the transfer, not a hang-up: no second request to Twilio.
    assert [u.params.keys() & {"Twiml", "Status"} for u in stack.twilio_api.updates] == [{"Twiml"}]
    record = stack.state.calls.get(caller.call_sid)
    assert record.end_reason == "transferred"
    assert record.transfer == {"target": "front_desk", "number": FRONT_DESK, "reason": "billing"}
    assert record.transcript[-1]["text"] == announcement
    session = model.sessions[0]
    [output] = session.received_events("conversation.item.create")
    assert output["item"]["type"] == "function_call_output"
    await model.wait_for(lambda: model.sessions_open == 0, 5)


@BOTH_SHAPES
async def test_an_interrupted_announcement_does_not_transfer(stack, model):
    model.script = (CallTool("transfer_call", {"target": "front_desk"}), "Sure, go on.")
    caller = await start_call(stack)
    await caller.play(speech("Can I talk to a person?"))
    session = model.sessions[0]
    await model.wait_for(lambda: len(session.sent_events("response.created")) >= 3, 30)
    await caller.wait_until_heard_ms(caller.heard_ms() + 400, timeout=30)
    await caller.play(speech("Wait, no, never mind, I have another question."))
    await caller.wait_for_event("clear", timeout=30)
    await caller.wait_until_quiet(500, timeout=30)
    await caller.hangup()
    await caller.__aexit__(None, None, None)

    assert stack.twilio_api.updates == []
    notes = [
        e["item"]["content"][0]["text"]
        for e in session.received_events("conversation.item.create")
        if e["item"].get("role") == "system"
    ]
    assert any("transfer did not happen" in note for note in notes)
    assert stack.state.calls.get(caller.call_sid).end_reason == "caller_hung_up"


# A caller's `From` is E.164 only for phone numbers: a Twilio Client or a SIP caller gives a URI,
# which the <Dial action> query carries percent-encoded, and Twilio signs it so (twilio
# reference, sections 1.1 and 4.1).
@BOTH_SHAPES
@pytest.mark.parametrize("caller_id", ["+14155550123", "client:alice", "sip:bob@example.com"])
async def test_an_unanswered_transfer_comes_back_to_the_agent(stack, model, persona, caller_id):
    model.script = (CallTool("transfer_call", {"target": "front_desk"}),)
    caller = await start_call(stack, from_=caller_id)
    await caller.play(speech("Put me through to the front desk please."))
    [update] = await stack.twilio_api.wait_for_updates(1, timeout=30)
    await caller.wait_closed(timeout=10)
    await caller.__aexit__(None, None, None)

    # Nobody answers: Twilio requests the <Dial action> with DialCallStatus=no-answer.
    back = stack.caller(to=DENTAL, from_=caller_id, call_sid=caller.call_sid, speed=SPEED)
    async with back:
        answer = await back.request_dial_action(update.params["Twiml"], "no-answer")
        assert answer.status == 200
        assert answer.ok and answer.stream_url
        assert answer.parameters["from"] == caller_id
        await back.connect()
        back.start_background_silence()
        await back.wait_until_heard_ms(500, timeout=30)  # the agent speaks again
        await back.hangup()

    second = model.sessions[1]
    replayed = [e["item"] for e in second.received_events("conversation.item.create")]
    assert replayed[0]["role"] == "assistant"  # the first greeting, as history
    assert persona.greeting in replayed[0]["content"][0]["text"]
    # The opening's guidance goes into the session's instructions (StepFun documents no
    # per-response instructions), and is carried in response.create as the guide's sample does.
    opening = second.received_events("response.create")[0]
    assert "not answered (no-answer)" in opening["session"]["instructions"]
    updates = [
        e["session"].get("instructions", "") for e in second.received_events("session.update")
    ]
    assert "not answered (no-answer)" in updates[1]
    record = stack.state.calls.get(caller.call_sid)
    assert (record.end_reason, record.caller) == ("caller_hung_up", caller_id)
    assert record.transfer == {"target": "front_desk", "number": FRONT_DESK, "reason": None,
                               "error": "no-answer"}  # fmt: skip


async def test_answered_transfer_ends_with_the_person(stack):
    async with stack.caller(to=DENTAL, speed=0) as caller:
        await caller.dial()
        params = caller.webhook_params("completed") | {"DialCallStatus": "completed"}
        status, _, body = await caller.post_signed(
            "/twilio/dial-status?persona=bright-smile-dental&target=front_desk", params
        )
    assert status == 200
    assert [el.tag for el in ET.fromstring(body)] == ["Hangup"]


@BOTH_SHAPES
async def test_end_call_plays_the_goodbye_then_completes_the_call(stack, model, persona):
    model.script = (CallTool("end_call", {"reason": "done"}),)
    caller = await start_call(stack)
    seen = watch_updates(stack, caller)
    heard_before = caller.heard_ms()
    await caller.play(speech("That's all, thanks, bye."))
    [update] = await stack.twilio_api.wait_for_updates(1, timeout=30)
    await caller.wait_closed(timeout=10)
    await caller.__aexit__(None, None, None)

    assert update.params == {"Status": "completed"}
    goodbye_ms = len(synthesize(persona.goodbye)) / 48
    assert seen[0]["buffered_ms"] == 0
    assert seen[0]["heard_ms"] - heard_before == pytest.approx(goodbye_ms, abs=40)
    assert stack.state.calls.get(caller.call_sid).end_reason == "agent_hung_up"


async def test_hang_up_of_a_call_that_already_ended_counts_as_done(stack, model):
    model.script = (CallTool("end_call"),)
    caller = await start_call(stack)
    stack.twilio_api.end_call(caller.call_sid)  # Twilio will answer 21220
    await caller.play(speech("Goodbye."))
    [update] = await stack.twilio_api.wait_for_updates(1, timeout=30)
    assert update.error_code == 21220
    await caller.wait_closed(timeout=10)  # the server closes the stream: the call is over
    await caller.__aexit__(None, None, None)
    assert stack.state.calls.get(caller.call_sid).end_reason == "agent_hung_up"


async def test_keypad_shortcut_transfers_without_asking_the_model(stack, model, persona):
    caller = stack.caller(to=DENTAL, speed=SPEED)
    async with caller:
        await caller.dial()
        await caller.connect()
        caller.start_background_silence()
        await caller.wait_until_heard_ms(300, timeout=30)  # during the greeting
        await caller.send_dtmf("0")
        await caller.wait_for_event("clear", timeout=10)  # the greeting stops at once
        [update] = await stack.twilio_api.wait_for_updates(1, timeout=30)
        await caller.wait_closed(timeout=10)
    assert ET.fromstring(update.params["Twiml"]).find("Dial").text == FRONT_DESK
    session = model.sessions[0]
    [announce] = session.received_events("response.create")[1:]
    assert persona.transfer["front_desk"].announcement in announce["session"]["instructions"]
    assert session.received_events("conversation.item.create") == []  # no tool, no model turn
    record = stack.state.calls.get(caller.call_sid)
    assert "[keypad: 0]" in [t["text"] for t in record.transcript]


async def test_keypad_digits_reach_the_model_as_text(stack, model):
    caller = await start_call(stack)
    for digit in "123":
        await caller.send_dtmf(digit)
    session = model.sessions[0]
    await model.wait_for(lambda: session.received_events("conversation.item.create"), 10)
    await model.wait_for(lambda: len(session.received_events("response.create")) >= 2, 10)
    await caller.hangup()
    await caller.__aexit__(None, None, None)
    [item] = session.received_events("conversation.item.create")
    assert item["item"]["role"] == "user"
    assert "pressed 123" in item["item"]["content"][0]["text"]


@pytest.mark.parametrize("fault", ["refused", "timeout"])
async def test_rest_failure_keeps_the_call_alive(stack, model, fault):
    model.script = (CallTool("transfer_call", {"target": "front_desk"}), "Let me take a message.")
    if fault == "refused":
        stack.twilio_api.fail_next(1, status=400, code=21210, message="Caller ID not verified")
    else:
        stack.twilio_api.delay_next(1, seconds=3.0)  # our limit in this test is 1 s
    caller = await start_call(stack)
    session = model.sessions[0]
    await caller.play(speech("Transfer me please."))
    await model.wait_for(lambda: len(session.sent_events("response.done")) >= 4, 30)
    await caller.wait_until_quiet(300, timeout=30)
    assert not caller.closed  # the caller is still with the agent
    await caller.hangup()
    await caller.__aexit__(None, None, None)

    notes = [
        e["item"]["content"][0]["text"]
        for e in session.received_events("conversation.item.create")
        if e["item"].get("role") == "system"
    ]
    expected = "Twilio error 21210" if fault == "refused" else "no answer in 1 s"
    assert any(expected in note for note in notes)
    [tell] = [
        e for e in session.received_events("response.create")
        if "could not connect them" in e.get("session", {}).get("instructions", "")
    ]  # fmt: skip
    assert tell
    record = stack.state.calls.get(caller.call_sid)
    assert (record.end_reason, record.transfer) == ("caller_hung_up", None)
