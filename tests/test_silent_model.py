"""Limits hold whatever the model does: a mute model (nothing after set-up) or one stuck in a
response still gets the call ended at max_call_seconds or after the silence timeout, with the
goodbye skipped when it cannot be said."""

import asyncio
import shutil

import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.realtime.connection import ModelConnector
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.hostile_model import HostileModel
from phoneagent.testing.stack import LocalStack

DENTAL = "+14155550100"
SPEED = 10.0  # call time runs ten times faster than wall time, for the caller and the server


def dental(directory, **settings) -> None:
    shutil.copytree(EXAMPLE_PERSONAS, directory, dirs_exist_ok=True)
    path = directory / "bright-smile-dental.toml"
    lines = [line for line in path.read_text().splitlines() if not line.startswith(tuple(settings))]
    extra = [f"{name} = {value}" for name, value in settings.items()]
    at = lines.index("silence_duration_ms = 700")
    path.write_text("\n".join([*lines[:at], *extra, *lines[at:]]) + "\n")


async def stuck_forever(context):
    await asyncio.Event().wait()  # response.created, then nothing


@pytest.fixture(params=["mute", "stuck"])
async def model_url(request):
    """A model that never speaks: mute after set-up, or stuck in every response."""
    if request.param == "mute":
        async with HostileModel() as hostile:
            yield hostile.url
    else:
        async with FakeRealtimeServer(responder=stuck_forever, api_key=None) as fake:
            yield fake.url


async def run_silent_call(personas, model_url) -> tuple[str, float]:
    async with LocalStack(personas, use_fake_model=False, call_speed=SPEED) as stack:
        stack.state.prewarmer.connector = ModelConnector(
            url=model_url, api_key="k", model="stepaudio-2.5-realtime"
        )
        async with stack.caller(to=DENTAL, speed=SPEED) as caller:
            await caller.dial()
            await caller.connect()
            caller.start_background_silence()
            await caller.wait_call_over(timeout=120 / SPEED)
            call_ms = caller.now_ms()
        [update] = stack.twilio_api.updates
        assert update.params == {"Status": "completed"}
        return stack.state.calls.get(caller.call_sid).end_reason, call_ms


async def test_max_call_seconds_holds_with_a_silent_model(tmp_path, model_url):
    dental(tmp_path, max_call_seconds=30, silence_timeout_seconds=0)
    reason, call_ms = await run_silent_call(tmp_path, model_url)
    assert reason == "time_limit"
    assert 30_000 <= call_ms <= 30_000 + 15_000  # the goodbye's grace, not minutes


async def test_the_silence_timeout_holds_with_a_silent_model(tmp_path, model_url):
    dental(tmp_path, silence_timeout_seconds=10)
    reason, call_ms = await run_silent_call(tmp_path, model_url)
    assert reason == "agent_hung_up"
    assert call_ms <= 60_000  # asked at ~10 s, goodbye asked at ~20 s, hung up without it
