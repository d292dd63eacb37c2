"""``phoneagent demo``: the whole system on one laptop, one simulated call, no accounts needed.

It starts the server on loopback with the example personas, a stand-in for Twilio (the test
kit's scripted caller) and, unless ``STEPFUN_API_KEY`` is set, the built-in fake StepFun model;
places one call to the default persona (or ``--persona``) with a bundled caller recording in
that persona's language; prints the transcript as it happens.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from phoneagent.config import Settings
from phoneagent.personas import Persona, PersonaSet, load_directory
from phoneagent.simulate import SimulatedCall
from phoneagent.testing.fake_model import DEFAULT_SCRIPT, FakeRealtimeServer, queued_transcripts
from phoneagent.testing.speech import synthesizer_name
from phoneagent.testing.stack import LocalStack, demo_credentials
from phoneagent.testing.wav import CALLER_RECORDINGS, caller_recording

# What the bundled recording says (phoneagent/testing/assets/README.md). The fake model cannot
# recognise speech, so it is told; a real model hears it.
CALLER_BOOKING_TEXT = CALLER_RECORDINGS["en"].text
# What the fake model answers, in the persona's language (by a tag's first part).
FAKE_MODEL_LINES = {"en": DEFAULT_SCRIPT, "zh": ("这里是内置的模拟模型，我听到您说的话了。",)}


class UnknownPersona(LookupError):
    """``--persona`` names no persona of the directory."""


def chosen_persona(personas: PersonaSet, persona_id: str | None) -> Persona:
    """The persona the demo calls: ``persona_id``, else the default, else the first that
    answers calls (the demo is an inbound call: a persona that only calls out takes none)."""
    answering = {i: p for i, p in personas.personas.items() if p.numbers or p.default}
    if persona_id is None:
        return personas.default or next(iter(answering.values()))
    persona = answering.get(persona_id)
    if persona is None:
        why = "only places calls (phoneagent call)" if persona_id in personas.personas else ""
        raise UnknownPersona(
            f"persona {persona_id!r} {why}; the demo calls one that answers: "
            f"{', '.join(sorted(answering))}"
            if why
            else f"no persona {persona_id!r}; the personas are: {', '.join(sorted(answering))}"
        )
    return persona


async def run_demo(
    settings: Settings,
    *,
    keep_serving: bool = False,
    speed: float = 1.0,
    persona_id: str | None = None,
    say: Callable[[str], None] = print,
) -> int:
    personas = load_directory(settings.personas_dir)
    persona = chosen_persona(personas, persona_id)
    number = persona.numbers[0] if persona.numbers else "+14155550100"
    recording = caller_recording(persona.language)
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
        lines = FAKE_MODEL_LINES.get(persona.language.split("-")[0].lower(), DEFAULT_SCRIPT)
        model = FakeRealtimeServer(
            api_key=None, script=lines, transcriber=queued_transcripts([recording.text])
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
            wav=recording.wav,
            out=settings.data_dir / "demo-caller-heard.wav",
            speed=speed,
            say=say,
        )
        code = await call.run()
        if keep_serving and code == 0:
            say("\nThe server keeps serving. In another terminal:")
            say(f"  export TWILIO_ACCOUNT_SID={account_sid} TWILIO_AUTH_TOKEN={auth_token}")
            say(f"  phoneagent simulate --url {stack.base_url} --persona {persona.id}")
            say("Ctrl-C stops it.")
            await asyncio.Event().wait()
        return code
