"""Persona tools over real sockets: the fake model calls a persona's tool, phoneagent POSTs the
arguments to a business endpoint on loopback (``ToolEndpoint``), and the answer goes back to
the model as the function call's output, which it speaks. Slow, failing and refused tools, and
arguments that do not fit the tool, are all answered to the model; the call goes on.
"""

from __future__ import annotations

import json
import re
import socket

import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.audio import pcm16_to_ulaw
from phoneagent.business_tools import MAX_ANSWER_BYTES
from phoneagent.delivery.signing import generate_secret, verify
from phoneagent.testing.fake_model import CallTool, FakeRealtimeServer, ResponseContext, Say
from phoneagent.testing.speech import synthesize
from phoneagent.testing.stack import LocalStack
from phoneagent.testing.tool_endpoint import ToolEndpoint, ToolReply

LINE = "+14155550142"
SPEED = 4.0
TOOL = "check_availability"
ARGUMENTS = {"date": "2026-12-11", "time": "20:00", "guests": 2}
APOLOGY = "Sorry, I cannot check the book right now."
FILLER = "One moment, let me look at the book."
SECRET_ENV = "TOOLS_E2E_SECRET"


def speech(text: str) -> bytes:
    return pcm16_to_ulaw(synthesize(text, sample_rate=8000))


def persona_file(url: str, *, timeout_ms: int = 15000, filler_after_ms: int = 1500) -> str:
    # The call's clock runs SPEED times faster than the wall clock in these tests (the stack's
    # call_speed): filler_after_ms is call time; timeout_ms bounds the request in wall time.
    return f"""
name = "Trattoria tools test"
numbers = ["{LINE}"]
language = "en-US"
voice = "linjiajiejie"
greeting = "Trattoria Luca, how can I help?"
instructions = "You take table bookings for Trattoria Luca."

[end_call]
goodbye = "Goodbye!"

[[tools]]
name = "{TOOL}"
description = "Check whether a table is free."
url = "{url}"
timeout_ms = {timeout_ms}
filler = "{FILLER}"
filler_after_ms = {filler_after_ms}
secret_env = "{SECRET_ENV}"
[tools.parameters]
type = "object"
required = ["date", "time", "guests"]
[tools.parameters.properties.date]
type = "string"
[tools.parameters.properties.time]
type = "string"
[tools.parameters.properties.guests]
type = "integer"
"""


def tool_using_model(shape: str = "full", arguments: dict | str = ARGUMENTS) -> FakeRealtimeServer:
    """A model that calls the tool on the caller's first turn and speaks its answer: the
    business's "say", or an apology for an error."""

    def respond(context: ResponseContext):
        if context.verbatim is not None:  # the greeting, the filler
            return Say(context.verbatim)
        items = context.conversation
        called = [i for i in items if i["type"] == "function_call"]
        if items and items[-1]["type"] == "function_call_output":
            answer = json.loads(items[-1]["output"])
            return Say(APOLOGY if "error" in answer else f"Good news: {answer['say']}")
        if context.trigger == "vad" and not called:
            return CallTool(TOOL, arguments)
        return Say("Anything else?")

    return FakeRealtimeServer(speed=8.0, shape=shape, responder=respond)


@pytest.fixture
def secret(monkeypatch):
    value = generate_secret()
    monkeypatch.setenv(SECRET_ENV, value)
    return value


async def stack_for(tmp_path, model, url: str, **tool_options) -> LocalStack:
    (tmp_path / "trattoria.toml").write_text(persona_file(url, **tool_options))
    stack = LocalStack(tmp_path, model=model, call_speed=SPEED, webhooks=False)
    await stack.start()
    return stack


async def ask_for_a_table(stack, model, *, outputs: int = 1):
    """Dial, hear the greeting, ask; return the caller once the model has had ``outputs``
    function call outputs and the answer after the last has been heard out."""
    caller = stack.caller(to=LINE, speed=SPEED)
    await caller.__aenter__()
    await caller.dial()
    await caller.connect()
    caller.start_background_silence()
    await model.wait_for(
        lambda: model.sessions and model.sessions[0].sent_events("response.done"), 30
    )
    await caller.wait_until_quiet(300, timeout=30)  # the greeting, generated and heard out
    await caller.play(speech("Do you have a table for two on Friday at eight?"))
    session = model.sessions[0]
    await model.wait_for(lambda: len(function_outputs(session)) >= outputs, 30)
    created = len(session.received_events("response.create"))
    await model.wait_for(lambda: len(session.sent_events("response.done")) >= created + 1, 30)
    await caller.wait_until_quiet(400, timeout=30)
    return caller


def function_outputs(session) -> list[dict]:
    items = [e["item"] for e in session.received_events("conversation.item.create")]
    return [i for i in items if i["type"] == "function_call_output"]


def agent_lines(stack, caller) -> list[str]:
    record = stack.state.calls.get(caller.call_sid)
    return [t["text"] for t in record.transcript if t["role"] == "agent"]


def tool_calls_metric(stack, outcome: str) -> float:
    value = stack.state.metrics.registry.get_sample_value(
        "phoneagent_tool_calls_total", {"outcome": outcome}
    )
    return value or 0.0


@pytest.mark.parametrize("shape", ["full", "documented"])
async def test_a_tool_answer_reaches_the_model_and_is_spoken(tmp_path, secret, shape):
    model = tool_using_model(shape)
    async with ToolEndpoint([ToolReply({"say": "a table is free at eight"})], secret=secret) as biz:
        stack = await stack_for(tmp_path, model, biz.url("/tools/availability?key=abc"))
        try:
            caller = await ask_for_a_table(stack, model)
            heard_before_hangup = caller.heard_ms()
            await caller.hangup()
            await caller.__aexit__(None, None, None)
            lines = agent_lines(stack, caller)
            record = stack.state.calls.get(caller.call_sid)
            ok_count = tool_calls_metric(stack, "ok")
        finally:
            await stack.close()

    # The business got one signed request: the call, the persona, the tool, the arguments.
    [request] = biz.received
    assert biz.verification_errors == []
    assert verify(request.body, request.headers, secret).startswith("tool_")
    assert request.method == "POST" and request.path == "/tools/availability"
    assert request.headers["Content-Type"] == "application/json"
    assert request.json == {
        "call_sid": caller.call_sid,
        "persona": "trattoria",
        "tool": TOOL,
        "arguments": ARGUMENTS,
    }
    # The model got the answer as the output of its own call, then spoke it.
    session = model.sessions[0]
    [output] = function_outputs(session)
    [call] = [i for i in session.conversation if i["type"] == "function_call"]
    assert output["call_id"] == call["call_id"]
    assert json.loads(output["output"]) == {"say": "a table is free at eight"}
    assert lines[-1] == "Good news: a table is free at eight"
    assert FILLER not in lines  # a quick answer needs no filler
    assert heard_before_hangup > 0
    [tool_call] = record.stats["tool_calls"]
    assert (tool_call["tool"], tool_call["outcome"]) == (TOOL, "ok")
    assert ok_count == 1
    # The model was told the tool exists, in StepFun's nested shape.
    [declared] = [t for t in session.tools if t["function"]["name"] == TOOL]
    assert declared["function"]["parameters"]["required"] == ["date", "time", "guests"]


async def test_a_slow_tool_gets_the_filler_first_then_the_answer(tmp_path, secret):
    model = tool_using_model()
    slow = ToolReply({"say": "the window table is yours"}, delay=2.5)
    async with ToolEndpoint([slow], secret=secret) as biz:
        # 1.5 s of call time is under 0.4 s of wall time here: the filler comes long before
        # the answer.
        stack = await stack_for(tmp_path, model, biz.url("/tools/availability"))
        try:
            caller = await ask_for_a_table(stack, model)
            await caller.hangup()
            await caller.__aexit__(None, None, None)
            lines = agent_lines(stack, caller)
        finally:
            await stack.close()

    assert lines[-2:] == [FILLER, "Good news: the window table is yours"]
    session = model.sessions[0]
    # The filler was a response of its own, done before the answer went to the model: the
    # answer's response.create did not collide with it.
    assert not [e for e in session.sent_events("error")]
    filler_create = next(
        e
        for e in session.received_events("response.create")
        if FILLER in e.get("session", {}).get("instructions", "")
    )
    position = {id(event): i for i, event in enumerate(session.received)}
    [output] = [
        e for e in session.received if e.get("item", {}).get("type") == "function_call_output"
    ]
    assert position[id(filler_create)] < position[id(output)]
    after_output = [e["type"] for e in session.received[position[id(output)] + 1 :]]
    assert after_output[0] == "response.create"


async def test_a_caller_who_talks_while_the_tool_works_still_gets_the_answer(tmp_path, secret):
    model = tool_using_model()
    slow = ToolReply({"say": "a table is free at nine"}, delay=2.5)
    async with ToolEndpoint([slow], secret=secret) as biz:
        stack = await stack_for(tmp_path, model, biz.url("/t"), filler_after_ms=15000)
        try:
            caller = stack.caller(to=LINE, speed=SPEED)
            async with caller:
                await caller.dial()
                await caller.connect()
                caller.start_background_silence()
                # The greeting generated first, as in ask_for_a_table: quiet alone holds before
                # the greeting's first delta, and the question would barge into it.
                await model.wait_for(
                    lambda: model.sessions and model.sessions[0].sent_events("response.done"), 30
                )
                await caller.wait_until_quiet(300, timeout=30)
                await caller.play(speech("Do you have a table for two on Friday at eight?"))
                await biz.wait_for(1, timeout=30)  # the business is thinking
                await caller.play(speech("Oh, and do you have parking?"))
                session = model.sessions[0]
                await model.wait_for(lambda: function_outputs(session), 30)
                await model.wait_for(
                    lambda: any(
                        "Good news" in e.get("transcript", "")
                        for e in session.sent_events("response.audio_transcript.done")
                    ),
                    30,
                )
                await caller.wait_until_quiet(400, timeout=30)
                await caller.hangup()
            lines = agent_lines(stack, caller)
        finally:
            await stack.close()

    # The caller's question in between was answered, then the tool's answer was said.
    assert lines[-2:] == ["Anything else?", "Good news: a table is free at nine"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAILURES = {
    "server_error": (ToolReply({"detail": "boom"}, status=500), "HTTP 500", "http_error"),
    "timeout": (ToolReply({"say": "too late"}, delay=3.0), "no answer in time", "timeout"),
    "garbage": (
        ToolReply(b"<html>oops</html>", content_type="text/html"),
        "not JSON",
        "bad_answer",
    ),
    "huge": (ToolReply({"say": "x" * MAX_ANSWER_BYTES}), "too large", "bad_answer"),
    "refused": (None, "could not be reached", "unreachable"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
async def test_a_failing_tool_is_told_to_the_model_and_the_call_goes_on(tmp_path, secret, failure):
    reply, reason, outcome = FAILURES[failure]
    model = tool_using_model()
    async with ToolEndpoint([reply or ToolReply()], secret=secret) as biz:
        url = biz.url("/tools/availability")
        if reply is None:
            url = f"http://127.0.0.1:{closed_port()}/tools/availability"
        stack = await stack_for(tmp_path, model, url, timeout_ms=500, filler_after_ms=15000)
        try:
            caller = await ask_for_a_table(stack, model)
            # The call goes on: the caller speaks again and the agent answers.
            session = model.sessions[0]
            done_before = len(session.sent_events("response.done"))
            await caller.play(speech("Okay, and are you open on Monday?"))
            await model.wait_for(
                lambda: len(session.sent_events("response.done")) > done_before, 30
            )
            await caller.wait_until_quiet(400, timeout=30)
            await caller.hangup()
            await caller.__aexit__(None, None, None)
            lines = agent_lines(stack, caller)
            record = stack.state.calls.get(caller.call_sid)
            counted = tool_calls_metric(stack, outcome)
        finally:
            await stack.close()

    [output] = function_outputs(session)
    error = json.loads(output["output"])["error"]
    assert reason in error
    assert "127.0.0.1" not in error and "http" not in error.lower().replace("http 500", "")
    assert APOLOGY in lines
    assert lines[-1] == "Anything else?"
    assert record.end_reason == "caller_hung_up"
    assert record.stats["tool_calls"][0]["outcome"] == outcome
    assert counted == 1
    if reply is not None:
        assert len(biz.received) == 1 and biz.verification_errors == []


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({"date": "2026-12-11"}, "missing time, guests"),
        ({**ARGUMENTS, "guests": "two"}, "guests must be of type integer"),
        ("{not json", "not valid JSON"),
    ],
)
async def test_invalid_arguments_are_refused_without_asking_the_business(
    tmp_path, secret, arguments, reason
):
    model = tool_using_model(arguments=arguments)
    async with ToolEndpoint(secret=secret) as biz:
        stack = await stack_for(tmp_path, model, biz.url("/tools/availability"))
        try:
            caller = await ask_for_a_table(stack, model)
            await caller.hangup()
            await caller.__aexit__(None, None, None)
            lines = agent_lines(stack, caller)
            counted = tool_calls_metric(stack, "invalid_arguments")
        finally:
            await stack.close()

    assert biz.received == []
    [output] = function_outputs(model.sessions[0])
    assert json.loads(output["output"]) == {"error": f"invalid arguments: {reason}"}
    assert lines[-1] == APOLOGY
    assert counted == 1


async def test_the_example_persona_without_its_tool_server_tells_the_model(tmp_path):
    """The demo's Trattoria Luca declares a tool on localhost that nothing serves: the model
    is told the system could not be reached, and the call goes on. (The copy's port is one
    known to be closed, so that whatever runs on this machine cannot answer.)"""
    shipped = (EXAMPLE_PERSONAS / "trattoria-luca.toml").read_text()
    [url] = re.findall(r'url = "(http://localhost:\d+/[^"]*)"', shipped)
    closed = re.sub(r":\d+/", f":{closed_port()}/", url, count=1)
    for path in EXAMPLE_PERSONAS.glob("*.toml"):
        (tmp_path / path.name).write_text(path.read_text().replace(url, closed))
    model = tool_using_model()
    async with LocalStack(tmp_path, model=model, call_speed=SPEED, webhooks=False) as stack:
        [tool] = stack.state.personas.current.personas["trattoria-luca"].tools
        assert tool.url == closed
        caller = await ask_for_a_table(stack, model)
        await caller.hangup()
        await caller.__aexit__(None, None, None)
        lines = agent_lines(stack, caller)
    [output] = function_outputs(model.sessions[0])
    assert json.loads(output["output"]) == {"error": "the business's system could not be reached"}
    assert lines[-1] == APOLOGY
