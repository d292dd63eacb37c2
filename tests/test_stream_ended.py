"""When the agent cannot take or keep a call, the caller hears the apology, never silence.

Twilio ends a call when the server closes its `<Connect><Stream>` unless TwiML follows; the
test kit's Twilio does the same (it asks `<Connect action>`, or ends the call). So every path
here is checked by what Twilio runs once the stream is over, not by what the server meant to do.
"""

import shutil

import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.testing.fake_model import CallTool, FakeRealtimeServer
from phoneagent.testing.stack import LocalStack
from phoneagent.testing.twilio_signing import Signature
from phoneagent.twilio.routes.webhooks import NO_PERSONA_APOLOGY

DENTAL = "+14155550100"
FRONT_DESK = "+14155550111"


def apologised(stack) -> float:
    return stack.state.metrics.calls_apologised._value.get()


async def test_a_model_that_stalls_during_set_up_gives_the_apology_and_the_fallback():
    model = FakeRealtimeServer(handshake_delay=3.0)  # the upgrade is never answered in time
    async with LocalStack(EXAMPLE_PERSONAS, model=model) as stack:
        stack.state.prewarmer.connector.open_timeout = 0.3
        persona = stack.state.personas.current.personas["bright-smile-dental"]
        async with stack.caller(to=DENTAL, speed=0) as caller:
            await caller.dial()
            await caller.connect()
            after = await caller.wait_call_over(timeout=10)
        assert after is not None and after.ok, after
        assert after.says == [persona.apology]
        assert after.dials == [FRONT_DESK]
        assert caller.messages("media") == []
        assert apologised(stack) == 1


async def test_a_persona_removed_before_the_stream_starts_gives_an_apology(tmp_path):
    shutil.copytree(EXAMPLE_PERSONAS, tmp_path, dirs_exist_ok=True)
    async with LocalStack(tmp_path, model=FakeRealtimeServer()) as stack:
        async with stack.caller(to=DENTAL, speed=0) as caller:
            await caller.dial()
            (tmp_path / "bright-smile-dental.toml").unlink()
            await caller.wait_until(
                lambda: "bright-smile-dental" not in stack.state.personas.current.personas,
                10,
                "the persona to be unloaded",
            )
            await caller.connect()
            after = await caller.wait_call_over(timeout=10)
        assert after is not None and after.ok, after
        assert after.says == [NO_PERSONA_APOLOGY]
        assert after.hangup and caller.call_ended


async def test_a_goodbye_whose_hang_up_request_fails_still_ends_the_call():
    model = FakeRealtimeServer(speed=None, script=[CallTool("end_call")])
    async with LocalStack(EXAMPLE_PERSONAS, model=model) as stack:
        stack.twilio_api.fail_next(1, status=500, code=20500, message="Internal Server Error")
        async with stack.caller(to=DENTAL, speed=0) as caller:
            await caller.dial()
            await caller.connect()
            await caller.play_silence(200)
            await caller.play(b"\x00" * 8000)  # loud enough to be a turn for the fake's VAD
            await caller.play_silence(1500)
            after = await caller.wait_call_over(timeout=20)
        # Twilio refused the hang-up; the stream closed anyway and the action said: hang up.
        assert [u.status for u in stack.twilio_api.updates] == [500]
        assert after is not None and after.verbs == ["Hangup"]
        assert caller.call_ended
        assert stack.state.calls.get(caller.call_sid).end_reason == "agent_hung_up"
        assert apologised(stack) == 0


async def test_an_instance_that_does_not_know_the_call_apologises_for_the_persona():
    async with LocalStack(EXAMPLE_PERSONAS, model=FakeRealtimeServer()) as stack:
        persona = stack.state.personas.current.personas["bright-smile-dental"]
        async with stack.caller(to=DENTAL, speed=0) as caller:
            path = "/twilio/stream-ended?persona=bright-smile-dental"
            params = caller.webhook_params(call_status="in-progress")
            status, _, body = await caller.post_signed(path, params)
            assert status == 200
            assert persona.apology in body and FRONT_DESK in body
            status, _, _ = await caller.post_signed(path, params, Signature.WRONG)
            assert status == 403


@pytest.mark.parametrize("persona_query", ["", "?persona=nobody"])
async def test_an_unknown_persona_still_gets_an_apology(persona_query):
    async with (
        LocalStack(EXAMPLE_PERSONAS, model=FakeRealtimeServer()) as stack,
        stack.caller(to=DENTAL, speed=0) as caller,
    ):
        params = caller.webhook_params(call_status="in-progress")
        path = "/twilio/stream-ended" + persona_query
        status, _, body = await caller.post_signed(path, params)
    assert status == 200 and NO_PERSONA_APOLOGY in body


async def test_a_drain_goodbye_whose_hang_up_request_fails_still_ends_the_call():
    """The agent said goodbye because the instance is stopping: the caller hears a hang-up,
    not the apology, even if Twilio refused the REST hang-up."""
    model = FakeRealtimeServer(speed=None)
    async with LocalStack(EXAMPLE_PERSONAS, model=model) as stack:
        stack.twilio_api.fail_next(1, status=500, code=20500, message="Internal Server Error")
        async with stack.caller(to=DENTAL, speed=0) as caller:
            await caller.dial()
            await caller.connect()
            await caller.wait_for_event("media", timeout=10)
            await caller.wait_until_quiet()  # the greeting was heard
            await stack.state.active_calls[caller.call_sid].drain()
            after = await caller.wait_call_over(timeout=20)
        assert [u.status for u in stack.twilio_api.updates] == [500]
        assert after is not None and after.verbs == ["Hangup"]
        assert caller.call_ended
        assert stack.state.calls.get(caller.call_sid).end_reason == "drain_goodbye"
        assert apologised(stack) == 0


async def test_a_call_cut_at_the_end_of_a_drain_gives_the_apology_and_the_fallback():
    model = FakeRealtimeServer(speed=None)
    async with LocalStack(EXAMPLE_PERSONAS, model=model) as stack:
        persona = stack.state.personas.current.personas["bright-smile-dental"]
        async with stack.caller(to=DENTAL, speed=0) as caller:
            await caller.dial()
            await caller.connect()
            await caller.wait_for_event("media", timeout=10)
            await stack.state.active_calls[caller.call_sid].shut_down()
            after = await caller.wait_call_over(timeout=20)
        assert after is not None and after.ok, after
        assert after.says == [persona.apology] and after.dials == [FRONT_DESK]
        assert stack.state.calls.get(caller.call_sid).end_reason == "server_shutdown"
        assert apologised(stack) == 1
