"""Twilio's signatures carry no timestamp, so a captured request can be sent again at will.
A stream token opens one stream, once; a replayed webhook starts nothing (no model session,
no second call); the session cap counts calls honestly."""

import asyncio
import dataclasses
import time

import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.testing.caller import TwilioCaller
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.stack import LocalStack
from phoneagent.twilio.wire.replay import AnsweredWebhooks

DENTAL = "+14155550100"


@pytest.fixture
async def model():
    return FakeRealtimeServer(speed=None)


@pytest.fixture
async def stack(model):
    async with LocalStack(EXAMPLE_PERSONAS, model=model) as stack:
        yield stack


def twin(stack, caller: TwilioCaller) -> TwilioCaller:
    """Another client holding what an attacker captured of ``caller``'s call: the same
    CallSid and the TwiML (with its stream token) the webhook answered."""
    copy = stack.caller(to=DENTAL, speed=0, call_sid=caller.call_sid)
    copy.answer = dataclasses.replace(caller.answer)
    return copy


async def test_a_token_opens_one_stream_even_when_replayed_concurrently(stack, model):
    async with stack.caller(to=DENTAL, speed=0) as caller:
        await caller.dial()
        attackers = [twin(stack, caller) for _ in range(5)]
        streams = [caller, *attackers]
        await asyncio.gather(*(s.connect() for s in streams))
        await caller.wait_until(
            lambda: sum(s.closed for s in streams) == 5, 10, "five streams refused"
        )
        [kept] = [s for s in streams if not s.closed]
        assert "phoneagent_active_calls 1.0" in stack.state.metrics.exposition().decode()
        await kept.wait_for_event("media", timeout=10)
        await kept.hangup()
        for attacker in attackers:
            await attacker.aclose()
    assert model.sessions_opened == 1  # the pre-warm only
    assert stack.state.metrics.streams_refused._value.get() == 5


async def test_a_token_is_refused_after_its_call_ended(stack, model):
    async with stack.caller(to=DENTAL, speed=0) as caller:
        await caller.dial()
        await caller.connect()
        await caller.wait_for_event("media", timeout=10)
        await caller.hangup()
    async with twin(stack, caller) as attacker:
        await attacker.connect()
        await attacker.wait_closed(timeout=10)
        assert attacker.messages("media") == []
    assert model.sessions_opened == 1
    record = stack.state.calls.get(caller.call_sid)
    assert record.end_reason == "caller_hung_up"  # the first call's record is untouched


async def test_a_replayed_voice_webhook_starts_nothing(stack, model):
    async with stack.caller(to=DENTAL, speed=0) as caller:
        first = await caller.dial()
        again = await caller.dial()  # Twilio does not send this twice; an attacker does
        assert again.body == first.body  # the same answer, the same (single-use) token
        assert stack.state.prewarmer.waiting == 1
        await caller.connect()
        await caller.wait_for_event("media", timeout=10)
        await caller.hangup()
    # After the call: a replay gets a hang-up and no model session, even past the pre-warm's
    # expiry, and the replayed token opens nothing.
    stack.state.replay.answered = AnsweredWebhooks()  # as if this instance forgot the answer
    async with twin(stack, caller) as attacker:
        late = await attacker.dial()
        assert late.verbs == ["Hangup"] and late.stream_url is None
    assert model.sessions_opened == 1
    assert stack.state.prewarmer.waiting == 0
    assert stack.state.metrics.webhook_replays._value.get() == 2


async def test_replays_do_not_fill_the_session_cap(model):
    async with LocalStack(EXAMPLE_PERSONAS, model=model) as stack:
        stack.state.settings = dataclasses.replace(stack.state.settings, max_calls=2)
        async with stack.caller(to=DENTAL, speed=0) as caller:
            await caller.dial()
            for _ in range(3):
                await caller.dial()
            await caller.connect()
            await caller.wait_for_event("media", timeout=10)
            # One call in progress: a second caller still fits under a cap of two.
            async with stack.caller(to=DENTAL, speed=0) as second:
                answer = await second.dial()
                assert answer.stream_url is not None
                await second.connect()
                await second.wait_for_event("media", timeout=10)
                await second.hangup()
            await caller.hangup()


async def test_a_replayed_dial_action_resumes_the_call_once(stack, model):
    async with stack.caller(to=DENTAL, speed=0) as caller:
        params = {**caller.webhook_params("in-progress"), "DialCallStatus": "no-answer"}
        params["DialCallSid"] = "CA" + "1" * 32
        path = "/twilio/dial-status?persona=bright-smile-dental&target=front_desk"
        status, _, first = await caller.post_signed(path, params)
        assert status == 200 and "<Stream" in first
        status, _, again = await caller.post_signed(path, params)
        assert status == 200 and again == first
    assert stack.state.prewarmer.waiting == 1  # one pre-warm for the returning stream


async def test_two_valid_tokens_for_one_call_open_one_stream():
    """Two different valid tokens for one CallSid (a webhook replayed to another instance, a
    transfer's resume token): the second stream is refused even while the first one is still
    claiming its model session, and the call being set up counts against the session cap."""
    model = FakeRealtimeServer(speed=None, handshake_delay=1.0)  # set-up takes a while
    async with LocalStack(EXAMPLE_PERSONAS, model=model) as stack:
        stack.state.settings = dataclasses.replace(stack.state.settings, max_calls=1)
        async with stack.caller(to=DENTAL, speed=0) as caller:
            await caller.dial()
            other = twin(stack, caller)
            token = stack.state.stream_token.issue(
                caller.call_sid, "bright-smile-dental", now=time.time() + 60
            )
            assert token != caller.answer.parameters["token"]
            other.answer.parameters = {**caller.answer.parameters, "token": token}
            await caller.connect()
            await caller.wait_until(
                lambda: stack.state.prewarmer.waiting == 0, 5, "the pre-warm to be claimed"
            )
            assert stack.state.at_capacity()  # being set up: no room for another call
            await other.connect()
            await other.wait_closed(timeout=5)
            assert other.messages("media") == []
            await caller.wait_for_event("media", timeout=10)
            assert not caller.closed
            await caller.hangup()
            await other.aclose()
        assert not stack.state.opening_calls and not stack.state.at_capacity()
    assert model.sessions_opened == 1  # the pre-warm only
    assert stack.state.metrics.streams_refused._value.get() == 1
