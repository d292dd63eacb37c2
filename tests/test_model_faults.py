"""The model's session drops, cannot come back, or reaches StepFun's 30-minute limit."""

import pytest
from conftest import EXAMPLE_PERSONAS

import phoneagent.call.model_link
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.stack import LocalStack
from phoneagent.testing.wav import CALLER_BOOKING_WAV

DENTAL = "+14155550100"
ANSWER = "Of course, Tuesday morning works."


@pytest.fixture
async def model():
    return FakeRealtimeServer(speed=None, script=[ANSWER])


@pytest.fixture
async def stack(model):
    async with LocalStack(EXAMPLE_PERSONAS, model=model) as stack:
        yield stack


def replayed(session) -> list[tuple[str, str]]:
    return [
        (e["item"]["role"], e["item"]["content"][0]["text"])
        for e in session.received_events("conversation.item.create")
        if e["item"].get("type") == "message"
    ]


async def test_a_dropped_model_session_is_reopened_and_the_call_goes_on(stack, model):
    persona = stack.state.personas.current.personas["bright-smile-dental"]
    async with stack.caller(to=DENTAL, speed=4.0) as caller:
        await caller.dial()
        await caller.connect()
        caller.start_background_silence()
        # The greeting generated first: the caller's quiet counts from the call's start, so it
        # holds before the greeting's first delta (later than 75 ms of wall time when busy).
        await model.wait_for(
            lambda: model.sessions and model.sessions[0].sent_events("response.done"), 20
        )
        await caller.wait_until_quiet(300, timeout=20)
        await model.drop_all()  # the model's socket dies mid-call
        await model.wait_for(lambda: model.sessions_opened == 2, 10)
        heard = caller.heard_ms()
        await caller.play_wav(CALLER_BOOKING_WAV)
        await caller.wait_until(lambda: caller.heard_ms() > heard + 1000, 20, "the answer")
        await caller.wait_until_quiet(300, timeout=20)
        await caller.hangup()
    # The new session was told the conversation so far, then answered the caller.
    second = model.sessions[1]
    assert replayed(second) == [("assistant", persona.greeting)]
    assert second.config["instructions"] == model.sessions[0].config["instructions"]
    record = stack.state.calls.get(caller.call_sid)
    assert record.end_reason == "caller_hung_up"
    assert record.transcript[-1]["text"] == ANSWER
    metrics = stack.state.metrics.exposition().decode()
    assert "phoneagent_model_reconnects_total 1.0" in metrics


async def test_when_the_model_cannot_come_back_the_caller_hears_the_apology(stack, model):
    persona = stack.state.personas.current.personas["bright-smile-dental"]
    async with stack.caller(to=DENTAL, speed=4.0) as caller:
        await caller.dial()
        await caller.connect()
        caller.start_background_silence()
        await caller.wait_until_heard_ms(200, timeout=20)
        model.fail_next_handshakes(10, status=503)
        await model.drop_all()
        after = await caller.wait_call_over(timeout=20)
    assert after is not None and after.ok, after
    assert after.says == [persona.apology]
    assert after.dials == [persona.transfer[persona.fallback_target].number]
    assert stack.state.calls.get(caller.call_sid).end_reason == "model_disconnected"


async def test_the_session_is_renewed_before_its_limit_without_the_caller_noticing(
    stack, model, monkeypatch
):
    monkeypatch.setattr(phoneagent.call.model_link, "SESSION_RENEW_SECONDS", 1.0)
    async with stack.caller(to=DENTAL, speed=4.0) as caller:
        await caller.dial()
        await caller.connect()
        caller.start_background_silence()
        # The greeting generated first (quiet alone holds before its first delta): the question
        # would otherwise barge into it, and a clear is what this test says never happens.
        await model.wait_for(
            lambda: model.sessions and model.sessions[0].sent_events("response.done"), 20
        )
        await caller.wait_until_quiet(300, timeout=20)
        await model.wait_for(lambda: model.sessions_opened == 2 and model.sessions_open == 1, 10)
        heard = caller.heard_ms()
        await caller.play_wav(CALLER_BOOKING_WAV)
        await caller.wait_until(lambda: caller.heard_ms() > heard + 1000, 20, "the answer")
        await caller.hangup()
    first, second = model.sessions[:2]
    assert first.close_code == 1000  # closed by us, cleanly, after the switch
    assert caller.clears == []  # nothing the caller heard was cut
    assert replayed(second)[0][0] == "assistant"
    assert second.received_events("input_audio_buffer.append")  # the caller's speech went there
