"""``phoneagent demo``: the whole system on one laptop, one simulated call, no accounts needed.

It starts the server on loopback with the example personas, a stand-in for Twilio (the test
kit's scripted caller) and, unless ``STEPFUN_API_KEY`` is set, the built-in fake StepFun model;
places one call with a bundled caller recording; prints the transcript as it happens.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from phoneagent.config import Settings
from phoneagent.personas import load_directory
from phoneagent.simulate import SimulatedCall
from phoneagent.testing.fake_model import FakeRealtimeServer, queued_transcripts
from phoneagent.testing.speech import synthesizer_name
from phoneagent.testing.stack import LocalStack, demo_credentials
from phoneagent.testing.wav import CALLER_BOOKING_WAV

# What the bundled recording says (phoneagent/testing/assets/README.md). The fake model cannot
# recognise speech, so it is told; a real model hears it.
CALLER_BOOKING_TEXT = "Hi, I'd like to book a cleaning for next Tuesday morning, please."


async def run_demo(
    settings: Settings,
    *,
    keep_serving: bool = False,
    speed: float = 1.0,
    say: Callable[[str], None] = print,
) -> int:
    personas = load_directory(settings.personas_dir)
    persona = personas.default or next(iter(personas.personas.values()))
    number = persona.numbers[0] if persona.numbers else "+14155550100"
    account_sid, auth_token = demo_credentials()
    settings = dataclasses.replace(
        settings, twilio_account_sid=account_sid, twilio_auth_token=auth_token
    )
    if settings.stepfun_api_key:
        say(f"STEPFUN_API_KEY is set: talking to the real model at {settings.stepfun_realtime_url}")
        model = None
    else:
        say(
            "STEPFUN_API_KEY is not set: the built-in fake model stands in for StepFun "
            f"(its voice: {synthesizer_name()}; it says the greeting, then a fixed line)."
        )
        model = FakeRealtimeServer(
            api_key=None, transcriber=queued_transcripts([CALLER_BOOKING_TEXT])
        )
    stack = LocalStack(
        settings.personas_dir, model=model, settings=settings, use_fake_model=model is not None
    )
    async with stack:
        say(f"server on {stack.base_url}; persona {persona.id!r} answers {number}")
        call = SimulatedCall(
            base_url=stack.base_url,
            account_sid=account_sid,
            auth_token=auth_token,
            to=number,
            wav=CALLER_BOOKING_WAV,
            out=settings.data_dir / "demo-caller-heard.wav",
            speed=speed,
            say=say,
        )
        code = await call.run()
        if keep_serving and code == 0:
            say("\nThe server keeps serving. In another terminal:")
            say(f"  export TWILIO_ACCOUNT_SID={account_sid} TWILIO_AUTH_TOKEN={auth_token}")
            say(f"  phoneagent simulate --url {stack.base_url} --to {number}")
            say("Ctrl-C stops it.")
            await asyncio.Event().wait()
        return code
