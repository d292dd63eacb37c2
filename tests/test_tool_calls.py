"""Persona tool calls in the Call core, event by event (no sockets): what goes to the business,
what the model is told, the filler, the limits, barge-in and new sessions while one is out."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.call import (
    AskBusinessTool,
    Call,
    CallState,
    RenewModelSession,
    ToModel,
    ToolAnswer,
    ToolCallFinished,
)
from phoneagent.call.model_link import SESSION_RENEW_SECONDS
from phoneagent.call.prompts import VERBATIM_PROMPT
from phoneagent.call.tool_calls import (
    ANSWER_GRACE_MS,
    MAX_CALLS_PER_CALL,
    MAX_CALLS_PER_RESPONSE,
    MAX_REFUSALS_PER_CALL,
    check_arguments,
)
from phoneagent.call.watchers import Tick
from phoneagent.personas import KeypadTransfer, load_directory
from phoneagent.personas.model import TRANSFER_TOOL
from phoneagent.realtime.base import (
    AddTextItem,
    AudioDelta,
    CreateResponse,
    ResponseDone,
    ResponseStarted,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    ToolOutput,
    UpdateInstructions,
)
from phoneagent.twilio.wire.stream import Dtmf

ARGS = '{"date": "2026-12-11", "time": "20:00", "guests": 2}'
TOOL = "check_availability"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, ms):
        self.now += ms / 1000


@pytest.fixture
def persona():
    luca = load_directory(EXAMPLE_PERSONAS, environ={}).personas["trattoria-luca"]
    return dataclasses.replace(luca, barge_in_min_speech_ms=0, keypad={})


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def call(persona, clock):
    return Call(persona=persona, stream_sid="MZ1", call_sid="CA1", clock=clock)


def commands(actions, kind):
    return [a.command for a in actions if isinstance(a, ToModel) and isinstance(a.command, kind)]


def of_type(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def tool_response(call, *calls, response_id="tool_resp"):
    """The model ends a response in which it called tools: (call_id, name, arguments) each."""
    call.on_model(ResponseStarted(response_id))
    for call_id, name, arguments in calls:
        call.on_model(ToolCall(response_id, call_id, name, arguments))
    return call.on_model(ResponseDone(response_id, "completed"))


def answer(output='{"free": true}', outcome="ok", ms=120):
    return ToolAnswer(output, outcome, ms, 200)


def test_a_call_with_fitting_arguments_goes_to_the_business(call, persona):
    actions = tool_response(call, ("c1", TOOL, ARGS))
    [ask] = of_type(actions, AskBusinessTool)
    assert ask == AskBusinessTool("c1", persona.tools[0], json.loads(ARGS))
    # Nothing for the model yet: it waits for the answer.
    assert commands(actions, ToolOutput) == [] and commands(actions, CreateResponse) == []

    actions = call.on_tool_answer("c1", answer())
    assert commands(actions, ToolOutput) == [ToolOutput("c1", '{"free": true}')]
    assert commands(actions, CreateResponse) == [CreateResponse()]
    assert of_type(actions, ToolCallFinished) == [ToolCallFinished(TOOL, "ok", 120)]
    assert call.stats.as_dict()["tool_calls"] == [
        {"tool": TOOL, "outcome": "ok", "duration_ms": 120}
    ]
    assert call.on_tool_answer("c1", answer()) == []  # once


def test_arguments_that_do_not_fit_are_refused_without_asking(call):
    actions = tool_response(call, ("c1", TOOL, '{"date": "2026-12-11"}'))
    assert of_type(actions, AskBusinessTool) == []
    [output] = commands(actions, ToolOutput)
    assert json.loads(output.output) == {"error": "invalid arguments: missing time, guests"}
    assert commands(actions, CreateResponse) == [CreateResponse()]
    assert of_type(actions, ToolCallFinished) == [ToolCallFinished(TOOL, "invalid_arguments", None)]


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ("", "missing date, time, guests"),
        ("[1, 2]", "not a JSON object"),
        ("{", "not valid JSON"),
        ("[" * 100_000, "not valid JSON"),
        ('{"date": 11, "time": "20:00", "guests": 2}', "date must be of type string"),
        ('{"date": "x", "time": "20:00", "guests": true}', "guests must be of type integer"),
        ('{"date": "x", "time": "20:00", "guests": 2.5}', "guests must be of type integer"),
        # Python reads these, the business's JSON parser would not (or not the same way).
        ('{"date": "x", "time": "20:00", "guests": 2, "n": NaN}', "not valid JSON"),
        ('{"date": "x", "time": "20:00", "guests": 2, "n": 1e999}', "not valid JSON"),
        ('{"date": "x", "time": "20:00", "guests": 2, "n": "\\ud800"}', "not valid JSON"),
        ('{"date": "x", "time": "20:00", "guests": 2, "guests": 9}', "not valid JSON"),
    ],
)
def test_check_arguments(persona, arguments, problem):
    assert check_arguments(persona.tools[0], arguments) == problem


def test_check_arguments_keeps_what_fits(persona):
    tool = dataclasses.replace(
        persona.tools[0],
        parameters={
            "type": "object",
            "properties": {"size": {"type": "number", "enum": [1, 2.5]}},
        },
    )
    assert check_arguments(tool, '{"size": 2.5, "note": "extra"}') == {"size": 2.5, "note": "extra"}
    assert check_arguments(tool, '{"size": 3}') == "size must be one of 1, 2.5"


def test_several_calls_of_one_response_get_one_response_after_the_last_answer(call):
    actions = tool_response(call, ("c1", TOOL, ARGS), ("c2", TOOL, ARGS))
    assert len(of_type(actions, AskBusinessTool)) == 2
    first = call.on_tool_answer("c2", answer('{"n": 2}'))
    assert commands(first, ToolOutput) == [ToolOutput("c2", '{"n": 2}')]
    assert commands(first, CreateResponse) == []  # c1 is still out
    second = call.on_tool_answer("c1", answer('{"n": 1}'))
    assert commands(second, CreateResponse) == [CreateResponse()]


def test_limits_per_response_and_per_call(call):
    many = [(f"c{i}", TOOL, ARGS) for i in range(MAX_CALLS_PER_RESPONSE + 1)]
    actions = tool_response(call, *many)
    assert len(of_type(actions, AskBusinessTool)) == MAX_CALLS_PER_RESPONSE
    [refused] = commands(actions, ToolOutput)
    assert "at most 3 tool calls at a time" in refused.output
    assert commands(actions, CreateResponse) == []  # the answers bring the response
    for i in range(MAX_CALLS_PER_RESPONSE):
        call.on_tool_answer(f"c{i}", answer())
    made = MAX_CALLS_PER_RESPONSE
    round_ = 0
    while made < MAX_CALLS_PER_CALL:
        round_ += 1
        call_id = f"r{round_}"
        tool_response(call, (call_id, TOOL, ARGS), response_id=f"resp{round_}")
        call.on_tool_answer(call_id, answer())
        made += 1
    actions = tool_response(call, ("last", TOOL, ARGS), response_id="last_resp")
    assert of_type(actions, AskBusinessTool) == []
    [output] = commands(actions, ToolOutput)
    assert "no more tool calls in this call" in output.output
    assert of_type(actions, ToolCallFinished)[0].outcome == "too_many"


def test_a_slow_answer_gets_the_filler_then_the_answer_after_it(call, persona, clock):
    tool = persona.tools[0]
    tool_response(call, ("c1", TOOL, ARGS))
    clock.advance(tool.filler_after_ms - 10)
    assert commands(call.on_tick(Tick(None, clock())), CreateResponse) == []
    clock.advance(20)
    filler = call.on_tick(Tick(None, clock()))
    [update] = commands(filler, UpdateInstructions)
    assert update.instructions.endswith(f"{VERBATIM_PROMPT}{tool.filler}")
    assert len(commands(filler, CreateResponse)) == 1
    clock.advance(500)
    assert commands(call.on_tick(Tick(None, clock())), CreateResponse) == []  # said once

    # The answer comes while the filler was asked for and has not started: it waits.
    assert commands(call.on_tool_answer("c1", answer()), ToolOutput) == []
    call.on_model(ResponseStarted("filler"))
    call.on_model(AudioDelta("filler", "item_f", b"\0\0" * 480))
    done = call.on_model(ResponseDone("filler", "completed"))
    # The persona's instructions come back first, then the answer and its response.
    kinds = [type(a.command).__name__ for a in done if isinstance(a, ToModel)]
    assert kinds[-3:] == ["UpdateInstructions", "ToolOutput", "CreateResponse"]


def test_the_call_gives_up_on_an_answer_the_shell_never_brings(persona, clock):
    tool = dataclasses.replace(persona.tools[0], filler_after_ms=15_000)
    call = Call(
        dataclasses.replace(persona, tools=(tool,)), stream_sid="MZ1", call_sid="CA1", clock=clock
    )
    tool_response(call, ("c1", TOOL, ARGS))
    clock.advance(tool.timeout_ms + ANSWER_GRACE_MS)
    actions = call.on_tick(Tick(None, clock()))
    [output] = commands(actions, ToolOutput)
    assert json.loads(output.output) == {"error": "no answer in time"}
    assert commands(actions, CreateResponse) == [CreateResponse()]
    assert call.on_tool_answer("c1", answer()) == []  # too late: ignored


def test_a_barge_in_while_the_business_thinks_still_gets_the_answer_to_the_model(call):
    tool_response(call, ("c1", TOOL, ARGS))
    # The agent says something and the caller talks over it.
    call.on_model(ResponseStarted("chat"))
    call.on_model(AudioDelta("chat", "item_c", b"\0\0" * 4800))
    call.on_model(SpeechStarted("user_2", 0))
    # The answer comes while the cancelled response has not ended: it waits for it.
    assert commands(call.on_tool_answer("c1", answer()), ToolOutput) == []
    done = call.on_model(ResponseDone("chat", "cancelled"))
    assert commands(done, ToolOutput) == [ToolOutput("c1", '{"free": true}')]
    assert commands(done, CreateResponse) == [CreateResponse()]


def test_an_answer_for_an_old_model_session_becomes_a_note(call):
    tool_response(call, ("c1", TOOL, ARGS))
    call.on_model_reconnected()
    call.on_model(ResponseStarted("cut"))  # the new session finishes the cut answer, if any
    call.on_model(ResponseDone("cut", "completed"))
    actions = call.on_tool_answer("c1", answer())
    assert commands(actions, ToolOutput) == []
    [note] = commands(actions, AddTextItem)
    assert note.role == "system" and TOOL in note.text and '{"free": true}' in note.text


def test_an_answer_during_a_handoff_is_given_but_asks_for_no_response(persona, clock):
    manager = KeypadTransfer(persona.transfer["manager"])
    call = Call(dataclasses.replace(persona, keypad={"0": manager}), "MZ1", "CA1", clock=clock)
    tool_response(call, ("c1", TOOL, ARGS))
    call.on_twilio(Dtmf("0"))
    assert call.state is CallState.ANNOUNCING
    call.on_model(ResponseStarted("announce"))
    call.on_model(ResponseDone("announce", "completed"))
    actions = call.on_tool_answer("c1", answer())
    assert commands(actions, ToolOutput) == [ToolOutput("c1", '{"free": true}')]
    assert commands(actions, CreateResponse) == []


def test_a_pending_call_holds_off_the_session_renewal(call, clock):
    clock.advance((SESSION_RENEW_SECONDS - 1) * 1000)
    assert not renewals(call.on_tick(Tick(None, clock())))
    tool_response(call, ("c1", TOOL, ARGS))
    clock.advance(2000)  # the renewal is due, but a new session could not take the answer
    assert not renewals(call.on_tick(Tick(None, clock())))
    call.on_tool_answer("c1", answer())
    call.on_model(ResponseStarted("answer"))
    call.on_model(ResponseDone("answer", "completed"))
    assert renewals(call.on_tick(Tick(None, clock())))


def renewals(actions):
    return [a for a in actions if isinstance(a, RenewModelSession)]


def test_an_answer_while_the_model_is_reconnecting_goes_to_the_next_session(call):
    tool_response(call, ("c1", TOOL, ARGS))
    call.on_model_dropped()
    actions = call.on_tool_answer("c1", answer())
    assert [a for a in actions if isinstance(a, ToModel)] == []  # no session to take it
    assert of_type(actions, ToolCallFinished) == [ToolCallFinished(TOOL, "ok", 120)]
    back = call.on_model_reconnected()
    [note] = [n for n in commands(back, AddTextItem) if TOOL in n.text]
    assert '{"free": true}' in note.text
    assert commands(back, CreateResponse)  # and the model answers with it


def test_a_model_that_keeps_calling_wrong_is_not_asked_to_go_on_without_end(call):
    """Each refusal asks the model for a response, in which it may call wrong again: past the
    bound, the refusal is still told but asks for nothing, and the loop stops."""
    for i in range(MAX_REFUSALS_PER_CALL):
        actions = tool_response(call, (f"bad{i}", TOOL, "{"), response_id=f"resp{i}")
        assert commands(actions, CreateResponse) == [CreateResponse()], i
    actions = tool_response(call, ("bad_last", TOOL, "{"), response_id="resp_last")
    [output] = commands(actions, ToolOutput)
    assert json.loads(output.output) == {"error": "invalid arguments: not valid JSON"}
    assert commands(actions, CreateResponse) == []
    assert of_type(actions, ToolCallFinished)[0].outcome == "invalid_arguments"
    # A good call still goes to the business, and its answer gets its response.
    actions = tool_response(call, ("good", TOOL, ARGS), response_id="resp_good")
    assert len(of_type(actions, AskBusinessTool)) == 1
    assert commands(call.on_tool_answer("good", answer()), CreateResponse) == [CreateResponse()]


def test_the_filler_waits_while_the_caller_is_speaking(call, persona, clock):
    tool = persona.tools[0]
    tool_response(call, ("c1", TOOL, ARGS))
    call.on_model(SpeechStarted("user_2", 0))  # the agent is silent: no barge-in, just talk
    clock.advance(tool.filler_after_ms + 500)
    assert commands(call.on_tick(Tick(None, clock())), CreateResponse) == []
    call.on_model(SpeechStopped("user_2", 1500))
    call.on_model(ResponseStarted("reply"))  # the model answers the turn (server VAD)...
    call.on_model(ResponseDone("reply", "completed"))
    filler = call.on_tick(Tick(None, clock()))  # ...and the caller still waits: the filler
    [update] = commands(filler, UpdateInstructions)
    assert update.instructions.endswith(f"{VERBATIM_PROMPT}{tool.filler}")


def test_a_model_that_keeps_asking_for_a_transfer_to_nowhere_stops_looping_too(call):
    nowhere = '{"target": "the moon"}'
    # Two refusals of one response ask for one response, not one each (the second
    # response.create would be refused: a response is already under way).
    actions = tool_response(call, ("t0", TRANSFER_TOOL, nowhere), ("t1", "no_such_tool", "{}"))
    assert len(commands(actions, ToolOutput)) == 2
    assert commands(actions, CreateResponse) == [CreateResponse()]
    for i in range(2, MAX_REFUSALS_PER_CALL):
        actions = tool_response(call, (f"t{i}", TRANSFER_TOOL, nowhere), response_id=f"r{i}")
        assert commands(actions, CreateResponse) == [CreateResponse()], i
    actions = tool_response(call, ("t_last", TRANSFER_TOOL, nowhere), response_id="r_last")
    [output] = commands(actions, ToolOutput)
    assert "unknown target" in output.output
    assert commands(actions, CreateResponse) == []
