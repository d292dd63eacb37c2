"""The Call state machine, driven event by event (no sockets)."""

import base64
import dataclasses
import json

import numpy as np
import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.audio import pcm16_to_ulaw
from phoneagent.call import (
    FRAMES_PER_MESSAGE,
    MARK_EVERY_MS,
    Call,
    CallState,
    EndCall,
    EndReason,
    HangUpCall,
    RenewModelSession,
    SendClear,
    SendMark,
    SendMedia,
    ToModel,
    TransferCall,
    TurnFinished,
)
from phoneagent.call.prompts import VERBATIM_PROMPT, session_config
from phoneagent.personas import load_directory
from phoneagent.realtime.base import (
    AddTextItem,
    AgentTranscriptDelta,
    AgentTranscriptDone,
    AppendAudio,
    AudioDelta,
    CancelResponse,
    CreateResponse,
    ModelError,
    ResponseDone,
    ResponseStarted,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    ToolOutput,
    TruncateItem,
    UpdateInstructions,
    UserTranscript,
)
from phoneagent.realtime.stepfun import StepFunDialect
from phoneagent.twilio.wire.stream import Dtmf, Mark, Media, Stop


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, ms):
        self.now += ms / 1000


@pytest.fixture
def persona():
    return load_directory(EXAMPLE_PERSONAS, environ={}).personas["bright-smile-dental"]


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def call(persona, clock):
    """A call whose persona interrupts the agent the moment the caller starts speaking."""
    immediate = dataclasses.replace(persona, barge_in_min_speech_ms=0)
    return Call(persona=immediate, stream_sid="MZ1", call_sid="CA1", clock=clock)


@pytest.fixture
def guarded_call(persona, clock):
    """A call with the persona's false barge-in guard (the default, 300 ms of speech)."""
    assert persona.barge_in_min_speech_ms == 300
    return Call(persona=persona, stream_sid="MZ1", call_sid="CA1", clock=clock)


def tone_pcm24k(ms: int, freq: float = 440.0) -> bytes:
    t = np.arange(ms * 24) / 24000
    return (np.sin(2 * np.pi * freq * t) * 8000).astype("<i2").tobytes()


def caller_frame(loud: bool, timestamp_ms: int) -> Media:
    """20 ms of caller audio: a 300 Hz tone (speech-loud) or near-silence (line noise, echo)."""
    t = np.arange(160) / 8000
    level = 8000 if loud else 200
    pcm = (np.sin(2 * np.pi * 300 * t) * level).astype("<i2").tobytes()
    return Media(timestamp_ms=timestamp_ms, payload=pcm16_to_ulaw(pcm))


def of_type(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def model_commands(actions, kind):
    return [a.command for a in actions if isinstance(a, ToModel) and isinstance(a.command, kind)]


def speak(call, response_id, item_id, ms, text=""):
    """The model produces one response of `ms` milliseconds of audio, fully."""
    actions = call.on_model(ResponseStarted(response_id))
    if text:
        actions += call.on_model(AgentTranscriptDelta(response_id, item_id, text))
    # 20 ms deltas: each makes one frame, so each frame gets its own message here.
    for _ in range(ms // 20):
        actions += call.on_model(AudioDelta(response_id, item_id, tone_pcm24k(20)))
    actions += call.on_model(ResponseDone(response_id, "completed"))
    return actions


def test_session_config_carries_the_persona(persona):
    config = session_config(persona)
    assert config.voice == "linjiajiejie"
    assert config.silence_duration_ms == 700
    assert config.vad_threshold == persona.vad_threshold
    assert config.instructions.startswith("You are Maya")
    assert "Always speak English" in config.instructions


def test_begin_greets_with_the_documented_verbatim_recipe_then_restores(call, persona):
    # D-GUIDE 开发技巧/实现开场白: the words in the session's instructions, then response.create.
    update, create = call.begin()
    base = session_config(persona).instructions
    assert update == ToModel(UpdateInstructions(f"{base}\n\n{VERBATIM_PROMPT}{persona.greeting}"))
    assert create == ToModel(CreateResponse(instructions=update.command.instructions))
    # Once the greeting is done, the persona's own instructions come back, once.
    actions = speak(call, "greeting", "item_g", 100)
    assert model_commands(actions, UpdateInstructions) == [UpdateInstructions(base)]
    assert model_commands(speak(call, "answer", "item_a", 100), UpdateInstructions) == []


def test_caller_audio_is_transcoded_frame_by_frame(call):
    [action] = call.on_twilio(Media(timestamp_ms=0, payload=b"\xff" * 160))
    assert isinstance(action.command, AppendAudio)
    assert len(action.command.pcm) == 960  # 20 ms of pcm16 at 24 kHz
    [action] = call.on_twilio(Media(timestamp_ms=20, payload=b"\x7f" * 80))
    assert len(action.command.pcm) == 480  # frames of any size


def test_inbound_timestamp_gap_is_filled_with_silence(call):
    call.on_twilio(Media(timestamp_ms=0, payload=b"\x10" * 160))
    [action] = call.on_twilio(Media(timestamp_ms=120, payload=b"\x10" * 160))
    # 100 ms of missing audio plus the 20 ms frame reach the model.
    assert len(action.command.pcm) == 120 * 48


def mark_ms(mark: SendMark) -> int:
    """How much of its item was sent before the mark (``<item>:<bytes sent>``)."""
    return int(mark.name.rpartition(":")[2]) // 8


def test_agent_audio_becomes_frames_with_a_unique_mark_every_200_ms(call):
    actions = speak(call, "resp1", "item1", 700)
    media = of_type(actions, SendMedia)
    marks = of_type(actions, SendMark)
    assert all(len(m.payload) == 160 for m in media[:-1])
    sent_ms = sum(len(m.payload) for m in media) // 8
    assert sent_ms == pytest.approx(700, abs=5)
    assert len({m.name for m in marks}) == len(marks)
    # After the first frame, then after the first frame 200 ms or more past the last mark,
    # then after the item's last frame (response.done): Twilio echoes the item's end.
    assert MARK_EVERY_MS == 200
    assert [mark_ms(m) for m in marks] == [20, 220, 420, 620, sent_ms]
    for mark in marks[:-1]:
        assert isinstance(actions[actions.index(mark) - 1], SendMedia)
    assert call.stats.first_audio_ms is not None


def test_marks_advance_played_and_transcript_end(call, clock):
    actions = speak(call, "resp1", "item1", 200, text="Hello there.")
    marks = of_type(actions, SendMark)
    clock.advance(100)
    call.on_twilio(Mark(marks[0].name))  # the first frame played (its echo came late)
    [turn] = call.transcript
    assert turn == {
        "role": "agent",
        "text": "Hello there.",
        "start_ms": 0,
        "end_ms": 100,
        "interrupted": False,
    }


def test_barge_in_clears_cancels_truncates_at_the_heard_position(call):
    call.on_model(ResponseStarted("resp1"))
    call.on_model(AgentTranscriptDelta("resp1", "item1", "one two three four five six"))
    sent = []
    for _ in range(30):
        sent += call.on_model(AudioDelta("resp1", "item1", tone_pcm24k(20)))
    marks = of_type(sent, SendMark)
    call.on_twilio(Mark(marks[1].name))  # 11 frames = 220 ms heard

    actions = call.on_model(SpeechStarted("user1", 1000))
    assert actions[0] == SendClear()
    assert model_commands(actions, CancelResponse) == [CancelResponse()]
    [truncate] = model_commands(actions, TruncateItem)
    assert truncate == TruncateItem("item1", 220)
    [finished] = of_type(actions, TurnFinished)
    assert (finished.turn["text"], finished.turn["interrupted"]) == ("one two", True)

    # Every later delta of the cancelled response is dropped, and so is its flush.
    assert call.on_model(AudioDelta("resp1", "item1", tone_pcm24k(100))) == []
    assert call.on_model(ResponseDone("resp1", "cancelled")) == []
    # Twilio echoes the pending marks after `clear`: they do not count as played.
    for mark in marks[2:]:
        call.on_twilio(Mark(mark.name))
    [turn] = [t for t in call.transcript if t["role"] == "agent"]
    assert turn["interrupted"] is True
    assert turn["text"] == "one two"  # 220 of ~600 ms heard: about a third of the words
    assert call.stats.barge_ins == 1


def test_late_echoes_after_clear_do_not_disturb_the_next_response(call):
    first = speak(call, "resp1", "item1", 300)
    old_marks = of_type(first, SendMark)
    call.on_model(SpeechStarted("user1", 0))
    second = speak(call, "resp2", "item2", 200)
    new_marks = of_type(second, SendMark)
    assert not {m.name for m in old_marks} & {m.name for m in new_marks}
    for mark in old_marks:  # late echoes of the cleared marks
        call.on_twilio(Mark(mark.name))
    call.on_twilio(Mark(new_marks[0].name))
    # A second barge-in truncates item2 at what was heard of item2 alone.
    actions = call.on_model(SpeechStarted("user2", 0))
    assert model_commands(actions, TruncateItem) == [TruncateItem("item2", 20)]


def test_speech_with_no_agent_audio_pending_is_not_a_barge_in(call):
    actions = speak(call, "resp1", "item1", 100)
    for mark in of_type(actions, SendMark):
        call.on_twilio(Mark(mark.name))
    assert call.on_model(SpeechStarted("user1", 0)) == []


def test_barge_in_after_generation_finished_still_clears_the_tail(call):
    actions = speak(call, "resp1", "item1", 500)  # response.done already arrived
    marks = of_type(actions, SendMark)
    call.on_twilio(Mark(marks[1].name))
    actions = call.on_model(SpeechStarted("user1", 0))
    assert actions[0] == SendClear()
    assert model_commands(actions, CancelResponse) == []  # nothing to cancel
    assert model_commands(actions, TruncateItem) == [TruncateItem("item1", 220)]


def test_transcript_orders_turns_by_start(call, clock):
    greeting = speak(call, "resp1", "item1", 100, text="Hi, how can I")
    call.on_model(AgentTranscriptDone("resp1", "item1", "Hi, how can I help?"))
    clock.advance(2000)
    call.on_twilio(Mark(of_type(greeting, SendMark)[-1].name))  # the greeting was heard
    call.on_model(SpeechStarted("user1", 0))
    clock.advance(1500)
    call.on_model(SpeechStopped("user1", 1500))
    speak(call, "resp2", "item2", 100, text="Sure.")
    [finished] = call.on_model(UserTranscript("user1", " I need a cleaning. "))  # arrives late
    assert finished.turn["text"] == "I need a cleaning."
    assert [(t["role"], t["text"]) for t in call.transcript] == [
        ("agent", "Hi, how can I help?"),
        ("caller", "I need a cleaning."),
        ("agent", "Sure."),
    ]
    caller = call.transcript[1]
    assert (caller["start_ms"], caller["end_ms"]) == (2000, 3500)


def test_stop_ends_the_call_and_later_events_are_ignored(call):
    assert call.on_twilio(Stop("CA1")) == [EndCall(EndReason.CALLER_HUNG_UP)]
    assert call.ended
    assert call.on_twilio(Media(0, b"\xff" * 160)) == []
    assert call.on_model(AudioDelta("r", "i", tone_pcm24k(100))) == []


@pytest.mark.parametrize(
    ("event", "reason"),
    [("twilio", EndReason.TWILIO_DISCONNECTED), ("model", EndReason.MODEL_DISCONNECTED)],
)
def test_socket_closures_end_the_call(call, event, reason):
    actions = call.on_twilio_closed() if event == "twilio" else call.on_model_closed()
    assert actions == [EndCall(reason)]
    assert call.end_reason is reason


def test_model_errors_do_not_end_the_call(call):
    assert call.on_model(ModelError("invalid_value", "no ongoing response to cancel", True)) == []
    assert call.on_model(ModelError("server_error", "something broke")) == []
    assert not call.ended
    [action] = call.on_twilio(Media(timestamp_ms=0, payload=b"\xff" * 160))
    assert isinstance(action.command, AppendAudio)


# --- the false barge-in guard ----------------------------------------------------------------


def talk(call, frames: int, loud: bool, start_ms: int = 0) -> list:
    actions = []
    for i in range(frames):
        actions += call.on_twilio(caller_frame(loud, start_ms + 20 * i))
    return actions


def test_guard_waits_for_enough_speech_then_interrupts(guarded_call):
    call = guarded_call
    speak(call, "resp1", "item1", 1000)
    assert call.on_model(SpeechStarted("user1", 0)) == []  # not yet: maybe just "mhm"
    actions = talk(call, 14, loud=True)  # 280 ms
    assert of_type(actions, SendClear) == []
    assert len(model_commands(actions, AppendAudio)) == 14  # the model hears it all the same
    actions = talk(call, 1, loud=True, start_ms=280)  # 300 ms: the caller means it
    assert actions[0] == SendClear()
    assert model_commands(actions, TruncateItem) == [TruncateItem("item1", 0)]
    assert isinstance(actions[-1].command, AppendAudio)  # this frame still reaches the model
    assert call.stats.barge_ins == 1


def test_guard_ignores_a_short_mhm_and_quiet_echo(guarded_call):
    call = guarded_call
    actions = speak(call, "resp1", "item1", 1000)
    call.on_model(SpeechStarted("user1", 0))
    talk(call, 5, loud=True)  # 100 ms "mhm"
    assert of_type(talk(call, 40, loud=False, start_ms=100), SendClear) == []  # echo, noise
    call.on_model(SpeechStopped("user1", 900))
    assert call.stats.barge_ins_ignored == 1
    assert of_type(talk(call, 30, loud=True, start_ms=900), SendClear) == []  # turn is over
    # The agent's turn goes on and is heard in full.
    call.on_twilio(Mark(of_type(actions, SendMark)[-1].name))
    assert call.transcript[0]["interrupted"] is False
    assert call.stats.barge_ins == 0


def test_guard_drops_the_candidate_when_the_agent_finishes_first(guarded_call):
    call = guarded_call
    actions = speak(call, "resp1", "item1", 200)
    call.on_model(SpeechStarted("user1", 0))
    call.on_twilio(Mark(of_type(actions, SendMark)[-1].name))  # all heard
    assert of_type(talk(call, 30, loud=True), SendClear) == []
    assert call.stats.barge_ins == 0


def test_a_long_delta_goes_out_in_a_few_messages_marked_every_200_ms(call):
    call.on_model(ResponseStarted("resp1"))
    actions = call.on_model(AudioDelta("resp1", "item1", tone_pcm24k(500)))
    media = of_type(actions, SendMedia)
    assert [len(m.payload) for m in media] == [160 * FRAMES_PER_MESSAGE] * 2 + [800]
    assert [m.name for m in of_type(actions, SendMark)] == ["item1:1600", "item1:3200"]
    assert [type(a) for a in actions] == [SendMedia, SendMark] * 2 + [SendMedia]
    # The last 100 ms are marked when the item ends (with the resampler's last samples).
    done = call.on_model(ResponseDone("resp1", "completed"))
    [last] = of_type(done, SendMark)
    assert last.name == f"item1:{4000 + sum(len(m.payload) for m in of_type(done, SendMedia))}"


def test_mark_names_say_whose_audio_they_follow(call):
    actions = speak(call, "resp1", "item1", 100)
    marks = of_type(actions, SendMark)
    # <item>:<bytes sent so far>: 160 bytes of μ-law per 20 ms frame.
    sent = sum(len(m.payload) for m in of_type(actions, SendMedia))
    assert [m.name for m in marks] == ["item1:160", f"item1:{sent}"]


def test_heard_position_runs_on_from_the_last_echo(call, clock):
    actions = speak(call, "resp1", "item1", 1000)
    clock.advance(220)
    call.on_twilio(Mark(of_type(actions, SendMark)[1].name))  # 220 ms played, echo now
    clock.advance(30)  # Twilio plays on: the caller is 30 ms into the next frame
    actions = call.on_model(SpeechStarted("user1", 0))
    assert model_commands(actions, TruncateItem) == [TruncateItem("item1", 250)]


def test_heard_position_runs_on_through_frames_not_yet_marked(call, clock):
    call.on_model(ResponseStarted("resp1"))
    sent = []
    for _ in range(5):  # 100 ms: only the first frame is marked so far
        sent += call.on_model(AudioDelta("resp1", "item1", tone_pcm24k(20)))
    [first] = of_type(sent, SendMark)
    clock.advance(20)
    call.on_twilio(Mark(first.name))  # no mark is out now, but 80 ms are playing
    clock.advance(50)
    actions = call.on_model(SpeechStarted("user1", 0))
    assert model_commands(actions, TruncateItem) == [TruncateItem("item1", 70)]


def test_heard_position_counts_from_when_audio_was_sent_after_an_idle_line(call, clock):
    greeting = speak(call, "resp1", "item1", 100)
    call.on_twilio(Mark(of_type(greeting, SendMark)[-1].name))  # heard in full
    clock.advance(5000)  # the line is quiet for five seconds
    speak(call, "resp2", "item2", 1000)  # the answer is sent now, and starts playing now
    clock.advance(50)
    actions = call.on_model(SpeechStarted("user1", 0))
    assert model_commands(actions, TruncateItem) == [TruncateItem("item2", 50)]


# --- handing the call on: tools, keypad, transfer, hang-up ----------------------------------


def finish_tool_response(call, tool_name, arguments='{"target": "front_desk"}'):
    """The model answers with a tool call (and no audio), then ends that response."""
    call.on_model(ResponseStarted("tool_resp"))
    call.on_model(ToolCall("tool_resp", "call_1", tool_name, arguments))
    return call.on_model(ResponseDone("tool_resp", "completed"))


def test_transfer_tool_answers_the_model_then_announces(call, persona):
    actions = finish_tool_response(call, "transfer_call")
    [output] = model_commands(actions, ToolOutput)
    assert output.call_id == "call_1" and output.output.startswith("ok")
    [announce] = model_commands(actions, CreateResponse)
    assert persona.transfer["front_desk"].announcement in announce.instructions
    # The documented order: the tool output, then the next response.
    assert actions.index(ToModel(output)) < actions.index(ToModel(announce))
    assert call.state is CallState.ANNOUNCING


def test_transfer_waits_until_the_announcement_was_heard(call, persona):
    finish_tool_response(call, "transfer_call")
    sent = speak(call, "announce", "item_a", 200)
    assert of_type(sent, TransferCall) == []  # sent to Twilio, not yet heard
    marks = of_type(sent, SendMark)
    assert of_type(call.on_twilio(Mark(marks[-2].name)), TransferCall) == []
    [transfer] = of_type(call.on_twilio(Mark(marks[-1].name)), TransferCall)
    assert transfer.target == persona.transfer["front_desk"]
    assert call.state is CallState.TRANSFERRING
    # Twilio's `stop` after the REST update is the transfer, not a hang-up.
    assert call.on_twilio(Stop("CA1")) == [EndCall(EndReason.TRANSFERRED)]


def test_barge_in_during_the_announcement_cancels_the_transfer(call):
    finish_tool_response(call, "transfer_call")
    sent = speak(call, "announce", "item_a", 400)
    call.on_twilio(Mark(of_type(sent, SendMark)[0].name))
    actions = call.on_model(SpeechStarted("user1", 0))
    assert actions[0] == SendClear()
    [note] = model_commands(actions, AddTextItem)
    assert note.role == "system" and "transfer did not happen" in note.text
    assert call.state is CallState.ACTIVE
    for mark in of_type(sent, SendMark):  # late echoes after `clear`
        assert of_type(call.on_twilio(Mark(mark.name)), TransferCall) == []


def test_unknown_transfer_target_is_an_error_for_the_model(call):
    actions = finish_tool_response(call, "transfer_call", '{"target": "dentist"}')
    [output] = model_commands(actions, ToolOutput)
    assert "unknown target 'dentist'" in output.output
    assert model_commands(actions, CreateResponse) == [CreateResponse()]
    assert call.state is CallState.ACTIVE


def test_failed_transfer_returns_to_the_agent_who_tells_the_caller(call):
    finish_tool_response(call, "transfer_call")
    sent = speak(call, "announce", "item_a", 100)
    call.on_twilio(Mark(of_type(sent, SendMark)[-1].name))
    actions = call.on_transfer_result("Twilio error 21210: Caller ID not verified")
    assert call.state is CallState.ACTIVE
    [note] = model_commands(actions, AddTextItem)
    assert "21210" in note.text
    [tell] = model_commands(actions, CreateResponse)
    assert "could not connect them" in tell.instructions
    assert call.on_twilio(Stop("CA1")) == [EndCall(EndReason.CALLER_HUNG_UP)]


def test_end_call_says_goodbye_then_hangs_up(call, persona):
    actions = finish_tool_response(call, "end_call", "{}")
    [goodbye] = model_commands(actions, CreateResponse)
    assert persona.goodbye in goodbye.instructions
    sent = speak(call, "bye", "item_b", 100)
    assert of_type(call.on_twilio(Mark(of_type(sent, SendMark)[-1].name)), HangUpCall)
    assert call.on_hang_up_result(None) == [EndCall(EndReason.AGENT_HUNG_UP)]


def test_commands_wait_while_the_model_is_still_answering(call):
    call.on_model(ResponseStarted("busy"))
    actions = call.on_twilio(Dtmf("0"))  # keypad shortcut while the agent talks
    assert model_commands(actions, CancelResponse) == [CancelResponse()]
    assert model_commands(actions, CreateResponse) == []  # "ongoing response" otherwise
    actions = call.on_model(ResponseDone("busy", "cancelled"))
    [announce] = model_commands(actions, CreateResponse)
    assert "front desk" in announce.instructions


def test_keypad_digits_reach_the_model_together_after_a_pause(call):
    call.on_twilio(Media(timestamp_ms=0, payload=b"\xff" * 160))
    for digit in "42#":
        assert call.on_twilio(Dtmf(digit)) == []
    ms = 20
    while True:  # the caller's line keeps streaming; the digits go once it was quiet a while
        actions = call.on_twilio(Media(timestamp_ms=ms, payload=b"\xff" * 160))
        ms += 20
        if model_commands(actions, AddTextItem):
            break
    assert ms - 20 >= 1200
    [digits] = model_commands(actions, AddTextItem)
    assert (digits.role, digits.text) == ("user", "(I pressed 42# on my phone's keypad.)")
    assert model_commands(actions, CreateResponse) == [CreateResponse()]
    assert "[keypad: 42#]" in [t["text"] for t in call.transcript]


def test_time_limit_warns_then_says_goodbye_and_hangs_up(persona, clock):
    short = dataclasses.replace(persona, max_call_seconds=60)
    call = Call(persona=short, stream_sid="MZ1", call_sid="CA1", clock=clock)
    silence = b"\xff" * 160
    assert model_commands(call.on_twilio(Media(29_980, silence)), AddTextItem) == []
    [warning] = model_commands(call.on_twilio(Media(30_000, silence)), AddTextItem)
    assert "end in 30 seconds" in warning.text
    [goodbye] = model_commands(call.on_twilio(Media(60_000, silence)), CreateResponse)
    assert short.goodbye in goodbye.instructions
    sent = speak(call, "bye", "item_b", 100)
    assert of_type(call.on_twilio(Mark(of_type(sent, SendMark)[-1].name)), HangUpCall)
    assert call.on_hang_up_result(None) == [EndCall(EndReason.TIME_LIMIT)]


def test_an_unanswered_turn_gets_a_nudge(call, clock):
    call.on_model(SpeechStarted("user1", 0))
    call.on_model(SpeechStopped("user1", 900))
    clock.advance(1900)
    assert model_commands(call.on_twilio(Media(0, b"\xff" * 160)), CreateResponse) == []
    clock.advance(200)
    [nudge] = model_commands(call.on_twilio(Media(20, b"\xff" * 160)), CreateResponse)
    assert nudge == CreateResponse()
    clock.advance(5000)  # once
    assert model_commands(call.on_twilio(Media(40, b"\xff" * 160)), CreateResponse) == []


def test_an_answered_turn_gets_no_nudge(call, clock):
    call.on_model(SpeechStopped("user1", 900))
    call.on_model(ResponseStarted("resp1"))
    clock.advance(5000)
    assert model_commands(call.on_twilio(Media(0, b"\xff" * 160)), CreateResponse) == []


def test_session_renewal_waits_for_a_quiet_moment(call, clock):
    actions = speak(call, "resp1", "item1", 200, text="Hello there.")
    clock.advance(25 * 60 * 1000)
    assert of_type(call.on_twilio(Media(0, b"\xff" * 160)), RenewModelSession) == []  # playing
    for mark in of_type(actions, SendMark):
        call.on_twilio(Mark(mark.name))
    # The watchers run on the first frame of each 100 ms of stream time (watchers.Cadence).
    assert of_type(call.on_twilio(Media(20, b"\xff" * 160)), RenewModelSession) == []
    assert of_type(call.on_twilio(Media(100, b"\xff" * 160)), RenewModelSession)
    assert of_type(call.on_twilio(Media(200, b"\xff" * 160)), RenewModelSession) == []  # once
    replay = call.on_model_reconnected()
    assert model_commands(replay, AddTextItem) == [AddTextItem("assistant", "Hello there.")]
    assert model_commands(replay, CreateResponse) == []  # nothing was being said


def test_a_reconnect_mid_answer_asks_the_model_to_finish_it(call):
    call.on_model(ResponseStarted("resp1"))
    call.on_model(AgentTranscriptDelta("resp1", "item1", "Our hours are"))
    call.on_model(AudioDelta("resp1", "item1", tone_pcm24k(300)))
    actions = call.on_model_reconnected()
    assert model_commands(actions, AddTextItem) == [AddTextItem("assistant", "Our hours are")]
    [finish] = model_commands(actions, CreateResponse)
    assert "cut off" in finish.instructions


def test_a_silent_caller_is_asked_then_the_agent_says_goodbye(call, persona):
    def quiet_until(ms):
        actions = []
        for t in range(0, ms + 1, 20):
            actions += call.on_twilio(Media(t, b"\xff" * 160))
        return actions

    assert persona.silence_timeout_seconds == 20
    [ask] = model_commands(quiet_until(20_000), CreateResponse)
    assert "still there" in ask.instructions
    call.on_model(ResponseStarted("ask"))
    call.on_model(ResponseDone("ask", "completed"))
    actions = []
    # 20 s after the ask, on the first frame of that 100 ms (watchers.Cadence)
    for t in range(20_020, 40_101, 20):
        actions += call.on_twilio(Media(t, b"\xff" * 160))
    [goodbye] = model_commands(actions, CreateResponse)
    assert persona.goodbye in goodbye.instructions
    assert call.state is CallState.ANNOUNCING


def test_speech_resets_the_silence_timeout(call):
    for t in range(0, 15_000, 20):
        call.on_twilio(Media(t, b"\xff" * 160))
    call.on_model(SpeechStarted("user1", 0))
    call.on_model(SpeechStopped("user1", 0))
    call.on_model(ResponseStarted("resp1"))
    call.on_model(ResponseDone("resp1", "completed"))
    actions = []
    for t in range(15_000, 30_000, 20):
        actions += call.on_twilio(Media(t, b"\xff" * 160))
    assert model_commands(actions, CreateResponse) == []


def quiet_line(call, start_ms, end_ms):
    """The caller's line streams near-silence from start_ms to end_ms (stream time)."""
    actions = []
    for t in range(start_ms, end_ms, 20):
        actions += call.on_twilio(Media(t, b"\xff" * 160))
    return actions


def test_a_stalled_guided_response_gives_the_persona_instructions_back(call, persona):
    base = session_config(persona).instructions
    call.begin()  # the greeting: the verbatim prompt becomes the session's instructions
    call.on_model(ResponseStarted("r1"))  # ... and the model never says it, nor ends it
    actions = quiet_line(call, 0, 11_000)
    assert model_commands(actions, CancelResponse) == [CancelResponse()]
    # Its response.done may never come: the persona's instructions come back at once.
    assert model_commands(actions, UpdateInstructions) == [UpdateInstructions(base)]
    # Once: neither a late done of the stuck response nor the next answer changes them again.
    late = call.on_model(ResponseDone("r1", "cancelled"))
    assert model_commands(late, UpdateInstructions) == []
    assert model_commands(speak(call, "r2", "item2", 100), UpdateInstructions) == []


@pytest.mark.parametrize("sentence_started", [False, True])
def test_a_handoff_sentence_not_said_in_time_gives_the_persona_instructions_back(
    call, persona, sentence_started
):
    base = session_config(persona).instructions
    actions = finish_tool_response(call, "transfer_call")
    [verbatim] = model_commands(actions, UpdateInstructions)
    assert verbatim != UpdateInstructions(base)
    if sentence_started:
        call.on_model(ResponseStarted("announce"))
    actions = quiet_line(call, 0, 9_000)  # past HANDOFF_SENTENCE_DEADLINE_MS, nothing said
    assert of_type(actions, TransferCall)
    assert model_commands(actions, UpdateInstructions) == [UpdateInstructions(base)]
    # Should the transfer fail, the agent is back with the persona's own instructions.
    back = call.on_transfer_result("busy")
    call.on_model(ResponseStarted("tell"))
    restored = model_commands(call.on_model(ResponseDone("tell", "completed")), UpdateInstructions)
    assert model_commands(back, UpdateInstructions) and restored == [UpdateInstructions(base)]


# --- StepFun's documented shapes: events without response_id (tests/fixtures/stepfun/) -------

FIXTURES = EXAMPLE_PERSONAS.parent / "tests" / "fixtures" / "stepfun"
TOOL_RESPONSE_DONE = "guide-response-done-function-call.json"  # D-GUIDE 自定义 Tool Call 完整示例


def documented(sample, **changes):
    """A documented StepFun sample, decoded by the product's dialect."""
    message = json.loads((FIXTURES / sample).read_text()) | changes
    if "delta" in changes and message["type"] == "response.audio.delta":
        message["delta"] = base64.b64encode(changes["delta"]).decode()
    return StepFunDialect().decode(json.dumps(message))


def test_documented_audio_deltas_without_response_id_reach_the_caller(call):
    call.on_model(ResponseStarted("resp_001"))
    call.on_model(documented("ref-output-item-added.json"))  # msg_007 is of resp_001
    actions = []
    for _ in range(5):
        delta = documented("ref-audio-delta.json", item_id="msg_007", delta=tone_pcm24k(20))
        assert delta.response_id is None
        actions += call.on_model(delta)
    actions += call.on_model(
        documented("ref-audio-transcript-delta.json", item_id="msg_007", delta="Hello there")
    )
    actions += call.on_model(ResponseDone("resp_001", "completed"))
    assert sum(len(a.payload) for a in of_type(actions, SendMedia)) >= 100 * 8  # all 100 ms
    assert [(t["role"], t["text"]) for t in call.transcript] == [("agent", "Hello there")]


def test_documented_delta_of_an_unannounced_item_is_of_the_response_in_progress(call):
    call.on_model(ResponseStarted("resp_1"))
    delta = documented("ref-audio-delta.json", item_id="msg_x", delta=tone_pcm24k(20))
    assert of_type(call.on_model(delta), SendMedia)
    # The caller interrupts: every later delta without a response_id, of this item or of a
    # new item of the cancelled response, is dropped with it.
    call.on_model(SpeechStarted("user1", 0))
    assert call.on_model(delta) == []
    other = documented("ref-audio-delta.json", item_id="msg_y", delta=tone_pcm24k(20))
    assert call.on_model(other) == []
    call.on_model(ResponseDone("resp_1", "cancelled"))
    assert call.on_model(other) == []
    # The next response's audio plays again.
    call.on_model(ResponseStarted("resp_2"))
    fresh = documented("ref-audio-delta.json", item_id="msg_z", delta=tone_pcm24k(20))
    assert of_type(call.on_model(fresh), SendMedia)


def test_documented_tool_call_without_ids_hangs_up_once(call, persona):
    call.on_model(ResponseStarted("resp_t"))
    call_id = "call_20250622225814_get_weather"
    assert call.on_model(documented("guide-function-call-item-created.json")) == []
    assert call.on_model(documented("guide-function-call-arguments-delta.json")) == []
    done = documented("guide-function-call-arguments-done.json", name="end_call", arguments="{}")
    assert call.on_model(done) == []
    # The guide's response.done: no id, no status; the same call listed again in its output.
    output = [{"type": "function_call", "name": "end_call", "call_id": call_id, "arguments": ""}]
    response_done = documented(TOOL_RESPONSE_DONE, response={"output": output})
    actions = call.on_model(response_done)
    [tool_output] = model_commands(actions, ToolOutput)  # once, though listed twice
    assert tool_output.call_id == call_id and tool_output.output.startswith("ok")
    assert call.state is CallState.ANNOUNCING
    sent = speak(call, "goodbye", "item_g", 100)
    assert of_type(call.on_twilio(Mark(of_type(sent, SendMark)[-1].name)), HangUpCall)


def test_documented_tool_call_only_in_response_done_is_answered(call, persona):
    call.on_model(ResponseStarted("resp_t"))
    arguments = '{"target": "front_desk"}'
    output = [
        {"type": "function_call", "name": "transfer_call", "call_id": "c1", "arguments": arguments}
    ]
    response_done = documented(TOOL_RESPONSE_DONE, response={"output": output})
    actions = call.on_model(response_done)
    [tool_output] = model_commands(actions, ToolOutput)
    assert tool_output.call_id == "c1" and tool_output.output.startswith("ok")
    assert call.state is CallState.ANNOUNCING


def test_a_late_id_less_done_of_a_cancelled_response_does_not_close_the_next(call):
    call.on_model(ResponseStarted("r1"))
    first = documented("ref-audio-delta.json", item_id="msg_1", delta=tone_pcm24k(20))
    assert of_type(call.on_model(first), SendMedia)
    call.on_model(SpeechStarted("user1", 0))  # barge-in: r1 is cancelled, its done is due
    call.on_model(ResponseStarted("r2"))  # r2 starts before r1's done (out of the usual order)
    r2_first = documented("ref-audio-delta.json", item_id="msg_2", delta=tone_pcm24k(20))
    assert of_type(call.on_model(r2_first), SendMedia)
    late_done = documented(TOOL_RESPONSE_DONE, response={"output": []})
    assert late_done.response_id is None
    call.on_model(late_done)  # r1's, late: it must not close r2
    # r2 goes on: a delta of a new item, announced by nothing, is still r2's and plays.
    r2_next = documented("ref-audio-delta.json", item_id="msg_3", delta=tone_pcm24k(20))
    assert of_type(call.on_model(r2_next), SendMedia)
    # r2's own id-less done, with a tool call, ends r2: the tool call is r2's and is taken.
    output = [{"type": "function_call", "name": "end_call", "call_id": "c1", "arguments": "{}"}]
    actions = call.on_model(documented(TOOL_RESPONSE_DONE, response={"output": output}))
    [tool_output] = model_commands(actions, ToolOutput)
    assert tool_output.output.startswith("ok")
    assert call.state is CallState.ANNOUNCING


def test_an_id_less_done_listing_a_noted_tool_call_is_of_that_response(call):
    call.on_model(ResponseStarted("r1"))
    call.on_model(SpeechStarted("user1", 0))  # r1 is cancelled, its done is due
    call.on_model(ResponseStarted("r2"))
    arguments = documented("guide-function-call-arguments-done.json", name="end_call")
    call.on_model(arguments)  # id-less: of r2, the response in progress
    output = [{"type": "function_call", "name": "end_call", "call_id": arguments.call_id}]
    actions = call.on_model(documented(TOOL_RESPONSE_DONE, response={"output": output}))
    [tool_output] = model_commands(actions, ToolOutput)
    assert tool_output.output.startswith("ok")  # r2's done (not r1's, cancelled: "interrupted")
    assert call.state is CallState.ANNOUNCING


def test_a_late_handoff_sentence_is_heard_to_its_unmarked_end_before_the_handoff(call, clock):
    """The sentence starts just before its deadline and the model is slow: the first frame's
    mark is echoed while the frames after it, not marked yet, still play. The handoff waits
    until they have played by the clock (Twilio plays at real time)."""
    finish_tool_response(call, "transfer_call")
    call.on_model(ResponseStarted("announce"))
    quiet_line(call, 0, 7_900)
    sent = []
    for _ in range(5):  # 100 ms: only the first frame is marked so far
        sent += call.on_model(AudioDelta("announce", "item_a", tone_pcm24k(20)))
    [first] = of_type(sent, SendMark)
    clock.advance(20)
    assert of_type(call.on_twilio(Mark(first.name)), SendMark) == []  # no mark per echo
    # Past the deadline, 60 ms later by the clock: 20 of the 80 unmarked ms still play.
    clock.advance(60)
    assert of_type(quiet_line(call, 7_900, 9_000), TransferCall) == []
    clock.advance(40)  # they have played by now: the sentence is given up, the call handed on
    later = quiet_line(call, 9_000, 9_200)
    [tail] = of_type(later, SendMark)  # what was sent of the sentence is marked as it ends
    assert tail.name == f"item_a:{sum(len(m.payload) for m in of_type(sent, SendMedia))}"
    assert of_type(later, TransferCall)
    assert call.state is CallState.TRANSFERRING
