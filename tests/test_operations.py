"""Operations: the busy line, the model unreachable, graceful drain on SIGTERM."""

import asyncio
import dataclasses
import os
import shutil
import signal
import sys
import xml.etree.ElementTree as ET

import aiohttp
import pytest
from conftest import EXAMPLE_PERSONAS, PROJECT_ROOT, VALID_ENV, free_port, wait_for_port

from phoneagent.testing.caller import TwilioCaller
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.fake_twilio_api import FakeTwilioApi
from phoneagent.testing.stack import LocalStack
from phoneagent.testing.wav import CALLER_BOOKING_WAV
from phoneagent.testing.webhook_sink import WebhookSink

DENTAL = "+14155550100"
FRONT_DESK = "+14155550111"


async def test_over_the_session_cap_a_new_call_hears_busy_and_goes_to_the_fallback():
    model = FakeRealtimeServer(speed=None)
    async with LocalStack(EXAMPLE_PERSONAS, model=model) as stack:
        stack.state.settings = dataclasses.replace(stack.settings, max_calls=1)
        persona = stack.state.personas.current.personas["bright-smile-dental"]
        async with stack.caller(to=DENTAL, speed=0) as first:
            await first.dial()
            await first.connect()
            await first.wait_for_event("media", timeout=10)
            async with stack.caller(to=DENTAL, speed=0) as second:
                answer = await second.dial()
            await first.hangup()
    assert answer.ok and answer.stream_url is None
    assert answer.says == [persona.busy_message]
    root = ET.fromstring(answer.body)
    assert [el.tag for el in root] == ["Say", "Dial", "Hangup"]
    assert root.find("Dial").text == FRONT_DESK  # the persona's fallback target
    assert model.sessions_opened == 1


async def test_model_unreachable_the_caller_hears_the_apology_then_the_fallback():
    model = FakeRealtimeServer()
    async with LocalStack(EXAMPLE_PERSONAS, model=model) as stack:
        model.fail_next_handshakes(2, status=402)  # no balance: pre-warm and retry both fail
        persona = stack.state.personas.current.personas["bright-smile-dental"]
        async with stack.caller(to=DENTAL, speed=0) as caller:
            await caller.dial()
            await caller.connect()
            # The server closes the stream; Twilio then runs whatever TwiML follows, or the
            # call is over (<Connect> semantics): the apology must come in time for that.
            after = await caller.wait_call_over(timeout=10)
    assert after is not None and after.ok, after
    assert after.verbs == ["Say", "Dial", "Hangup"]
    assert after.says == [persona.apology]
    assert after.dials == [FRONT_DESK]
    assert caller.messages("media") == []
    metrics = stack.state.metrics.exposition().decode()
    assert 'phoneagent_model_session_failures_total{status="402"} 1.0' in metrics


def twilio_caller(base: str, speed: float = 1.0) -> TwilioCaller:
    sid, token = VALID_ENV["TWILIO_ACCOUNT_SID"], VALID_ENV["TWILIO_AUTH_TOKEN"]
    return TwilioCaller(base, account_sid=sid, auth_token=token, to=DENTAL, speed=speed)


async def serve_with_webhook(tmp_path, sink, model, **env):
    """`phoneagent serve` as a real process on a free port, the dental persona sending its
    events to ``sink``; returns the process and its base URL."""
    personas = tmp_path / "personas"
    shutil.copytree(EXAMPLE_PERSONAS, personas)
    dental = personas / "bright-smile-dental.toml"
    dental.write_text(
        dental.read_text()
        + f'\n[webhook]\nurl = "{sink.url("/hooks")}"\nsecret_env = "HOOK_SECRET"\n'
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = os.environ | VALID_ENV | {
        "PUBLIC_URL": base, "PORT": str(port), "STEPFUN_REALTIME_URL": model.url,
        "PHONEAGENT_PERSONAS_DIR": str(personas), "PHONEAGENT_DATA_DIR": str(tmp_path / "d"),
        "HOOK_SECRET": "whsec_c2VjcmV0", "PHONEAGENT_METRICS_PORT": str(free_port()), **env,
    }  # fmt: skip
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "phoneagent.cli", "serve", "--host", "127.0.0.1",
        cwd=PROJECT_ROOT, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_for_port(port)
    except BaseException:
        server.kill()
        await server.wait()
        raise
    return server, base


@pytest.fixture
async def sink():
    async with WebhookSink() as sink:
        yield sink


async def test_sigterm_drains_calls_refuses_new_ones_and_flushes_the_outbox(tmp_path, sink):
    async with FakeRealtimeServer(api_key=VALID_ENV["STEPFUN_API_KEY"], speed=2.0) as model:
        server, base = await serve_with_webhook(
            tmp_path, sink, model, PHONEAGENT_DRAIN_SECONDS="60"
        )
        try:
            caller = twilio_caller(base, speed=2.0)
            async with caller:
                await caller.dial()
                await caller.connect()
                caller.start_background_silence()
                await caller.wait_until_heard_ms(500, timeout=20)

                server.send_signal(signal.SIGTERM)
                async with aiohttp.ClientSession() as http:
                    for _ in range(100):
                        async with http.get(f"{base}/readyz") as response:
                            status, ready = response.status, await response.json()
                        if status == 503:
                            break
                        await asyncio.sleep(0.05)
                    assert (status, ready["draining"]) == (503, True)
                late = twilio_caller(base)
                async with late:
                    refused = await late.dial()
                assert refused.status == 503  # Twilio tries the number's fallback URL

                # The call in progress goes on: the caller speaks and hears the answer.
                heard = caller.heard_ms()
                # The greeting generated in full first: the model paces it at the caller's own
                # speed, so any pause in its deltas on a busy machine is a stretch of quiet.
                await model.wait_for(lambda: model.sessions[0].sent_events("response.done"), 30)
                await caller.wait_until_quiet(300, timeout=30)
                await caller.play_wav(CALLER_BOOKING_WAV)
                await caller.wait_until(lambda: caller.heard_ms() > heard + 3000, 30, "answer")
                await caller.hangup()
            code = await asyncio.wait_for(server.wait(), timeout=30)
        finally:
            if server.returncode is None:
                server.kill()
                await server.wait()
    assert code == 0
    assert model.sessions_opened == 1  # the refused call cost nothing
    # The outbox was flushed on the way out: the call's transcript reached the business.
    [event] = [r.json for r in sink.received]
    assert event["type"] == "call.ended"
    assert event["data"]["call_sid"] == caller.call_sid


async def test_drain_time_is_honoured_calls_get_a_goodbye_or_are_cut_and_events_flushed(
    tmp_path, sink
):
    """Calls that do not end by themselves: near the end of PHONEAGENT_DRAIN_SECONDS the agent
    says goodbye and hangs up; what is still going at the end is cut; the process exits well
    before a Kubernetes grace period, with every call's `call.ended` delivered."""
    sid, token = VALID_ENV["TWILIO_ACCOUNT_SID"], VALID_ENV["TWILIO_AUTH_TOKEN"]
    async with (
        FakeRealtimeServer(api_key=VALID_ENV["STEPFUN_API_KEY"], speed=4.0) as model,
        FakeTwilioApi(sid, token) as twilio_api,
    ):
        server, base = await serve_with_webhook(
            tmp_path, sink, model, PHONEAGENT_DRAIN_SECONDS="6",
            TWILIO_API_BASE_URL=twilio_api.base_url,
        )  # fmt: skip
        try:
            callers = [twilio_caller(base, speed=4.0) for _ in range(2)]
            for caller in callers:
                twilio_api.attach(caller)
                await caller.__aenter__()
                await caller.dial()
                await caller.connect()
                caller.start_background_silence()
            # The first caller is in the middle of a long answer when the drain begins.
            model.script = ("Let me tell you about all our opening hours. " * 8,)
            await callers[0].play_wav(CALLER_BOOKING_WAV)
            await callers[1].wait_until_heard_ms(500, timeout=20)
            server.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(server.wait(), timeout=6 + 15)
            for caller in callers:
                await caller.wait_closed(timeout=10)
                await caller.__aexit__(None, None, None)
        finally:
            if server.returncode is None:
                server.kill()
                await server.wait()
    assert code == 0
    goodbyes = [u for u in twilio_api.updates if u.params == {"Status": "completed"}]
    assert goodbyes  # the quiet call was ended politely, through Twilio
    ended = {r.json["data"]["call_sid"]: r.json["data"] for r in sink.received}
    assert set(ended) == {caller.call_sid for caller in callers}
    assert {data["end_reason"] for data in ended.values()} == {"server_shutdown"}
