"""Barge-in over real sockets: the caller talks over a long agent answer.

The fake model generates faster than the caller's line plays (Twilio buffers the rest), so at
each interruption some agent audio is queued at "Twilio" that the caller must never hear.
"""

import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.audio import pcm16_to_ulaw
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.speech import synthesize
from phoneagent.testing.stack import LocalStack

DENTAL = "+14155550100"
FRAME_MS = 20
LONG_ANSWER = (
    "We are open Monday to Friday from eight in the morning to six in the evening, and on "
    "Saturday from nine to one. Doctor Park sees children and adults for cleanings and "
    "checkups, and Doctor Okafor does implants and root canals. Parking is free behind the "
    "building, and we accept most dental insurance plans."
)
SHORT_ANSWER = "Of course, go ahead."
CALLER_SPEED = 4.0  # the caller's call clock runs four times faster than real time
MODEL_SPEED = 6.0  # the model generates 1.5× faster than the caller's line plays
# How close the truncate point must be to what the caller heard: one frame, plus a busy
# machine's scheduling delay (15 ms of wall time) on a call clock running CALLER_SPEED× faster.
TRUNCATE_TOLERANCE_MS = FRAME_MS + 15 * CALLER_SPEED
# Short of what was heard, by more: the server cannot know the transit of the last mark's echo
# nor of its `clear`, so it errs towards "heard less" (Playback.heard_now). On a loaded 2-core
# machine the two took 24 ms of wall time (96 ms of call time, once in 3 runs): 20 ms each.
# That is near a mark interval (200 ms), so a heard position that stopped at the last echo would
# often pass here: test_call.py's test_heard_position_runs_on_from_the_last_echo catches that,
# with exact clocks.
TRUNCATE_SHORT_TOLERANCE_MS = FRAME_MS + 2 * 20 * CALLER_SPEED


def caller_speech(text: str) -> bytes:
    return pcm16_to_ulaw(synthesize(text, sample_rate=8000))


# The fake model in its two shapes: every field of the reference's tables, and exactly what
# StepFun's documented samples show (no response_id on deltas, the guide's tool-call events).
# A representative subset of this file's tests runs in both, to keep the suite's time in check.
BOTH_SHAPES = pytest.mark.parametrize("model", ["full", "documented"], indirect=True)


@pytest.fixture
async def model(request):
    shape = getattr(request, "param", "full")
    return FakeRealtimeServer(speed=MODEL_SPEED, script=[LONG_ANSWER, SHORT_ANSWER], shape=shape)


@pytest.fixture
async def stack(model):
    async with LocalStack(EXAMPLE_PERSONAS, model=model, call_speed=CALLER_SPEED) as stack:
        yield stack


async def ask_for_the_long_answer(caller, model):
    """Dial, hear the greeting out, ask a question; return the long answer's item id."""
    await caller.dial()
    await caller.connect()
    caller.start_background_silence()
    await model.wait_for(lambda: model.sessions, 30)
    session = model.sessions[0]
    # The whole greeting generated, then heard out: 300 ms of quiet alone is 75 ms of wall
    # time, which a busy machine's pause in the model's deltas can exceed mid-greeting.
    await model.wait_for(lambda: session.sent_events("response.done"), 30)
    await caller.wait_until_quiet(300, timeout=30)
    await caller.play(caller_speech("When are you open?"))
    items = await model.wait_for(
        lambda: len(added := session.sent_events("response.output_item.added")) >= 2 and added,
        30,
    )
    return items[1]["item"]["id"]  # the greeting was the first


def heard_before(caller, at_ms: float) -> float:
    return sum(max(0.0, min(c.end_ms, at_ms) - c.start_ms) for c in caller.heard)


def marks_after_clear(caller, item_id: str) -> list[str]:
    """Marks of `item_id` that arrived after the first `clear` (each follows a media frame)."""
    seen_clear, names = False, []
    for received in caller.received:
        if received.event == "clear":
            seen_clear = True
        elif seen_clear and received.event == "mark":
            name = received.message["mark"]["name"]
            if name.split(":")[0] == item_id:
                names.append(name)
    return names


@pytest.mark.parametrize("point", ["early", "middle", "after generation finished"])
@BOTH_SHAPES
async def test_talking_over_the_agent_stops_it_where_the_caller_was(stack, model, point):
    async with stack.caller(to=DENTAL, speed=CALLER_SPEED) as caller:
        item_id = await ask_for_the_long_answer(caller, model)
        session = model.sessions[0]
        answer_started = caller.heard_ms()  # the greeting, heard in full
        if point == "early":
            await caller.wait_until_heard_ms(answer_started + 600, timeout=30)
        elif point == "middle":
            await caller.wait_until_heard_ms(answer_started + 4000, timeout=30)
        else:
            await model.wait_for(lambda: len(session.sent_events("response.done")) >= 2, 30)
            await caller.wait_until_heard_ms(answer_started + 9000, timeout=30)
        generation_done = len(session.sent_events("response.done")) >= 2
        assert generation_done == (point == "after generation finished")

        await caller.play(caller_speech("Sorry, can I stop you there?"))
        await caller.wait_for_event("clear", timeout=30)
        clear = caller.clears[0]
        await model.wait_for(lambda: session.truncations, 10)
        # The agent answers the interruption; the caller hears that answer out.
        await model.wait_for(lambda: len(session.sent_events("response.done")) >= 3, 30)
        await caller.wait_until_quiet(300, timeout=30)
        await caller.hangup()

    assert caller.violations == []
    assert clear.discarded_ms > 0  # audio was queued at Twilio: the caller never heard it
    # Not one frame of the interrupted answer after `clear`.
    assert marks_after_clear(caller, item_id) == []
    # The model is told exactly how much the caller heard.
    [truncate] = session.truncations
    heard_of_answer = heard_before(caller, clear.at_ms) - answer_started
    assert truncate["item_id"] == item_id
    short_by = heard_of_answer - truncate["audio_end_ms"]
    assert -TRUNCATE_TOLERANCE_MS <= short_by <= TRUNCATE_SHORT_TOLERANCE_MS
    # The transcript keeps the words the caller heard, and says the turn was cut.
    record = stack.state.calls.get(caller.call_sid)
    answer = next(t for t in record.transcript if t["text"] and LONG_ANSWER.startswith(t["text"]))
    assert answer["interrupted"] is True
    words = LONG_ANSWER.split()
    answer_ms = len(synthesize(LONG_ANSWER)) / 48
    expected_words = len(words) * truncate["audio_end_ms"] / answer_ms
    assert abs(len(answer["text"].split()) - expected_words) <= 3
    # The agent answered the interruption, and the caller heard that answer.
    assert record.transcript[-1]["text"] == SHORT_ANSWER
    assert record.transcript[-1]["interrupted"] is False


@BOTH_SHAPES
async def test_late_echoes_after_clear_do_not_disturb_the_next_answer(stack, model):
    model.script = (LONG_ANSWER, LONG_ANSWER)
    async with stack.caller(to=DENTAL, speed=CALLER_SPEED) as caller:
        await ask_for_the_long_answer(caller, model)
        session = model.sessions[0]
        await caller.wait_until_heard_ms(caller.heard_ms() + 1000, timeout=30)
        await caller.play(caller_speech("Wait, wait."))
        await caller.wait_for_event("clear", timeout=30)
        # Twilio flushes the cleared marks at once; then the second answer plays.
        await model.wait_for(lambda: len(session.sent_events("response.created")) >= 3, 30)
        await caller.wait_until(lambda: caller.heard and caller.heard[-1].start_ms
                                > caller.clears[0].at_ms, 30, "the second answer")  # fmt: skip
        second_started = heard_before(caller, caller.clears[0].at_ms + 1)
        await caller.wait_until_heard_ms(second_started + 1500, timeout=30)
        await caller.play(caller_speech("Sorry, one more thing."))
        await caller.wait_for_event("clear", count=2, timeout=30)
        second_clear = caller.clears[1]
        await model.wait_for(lambda: len(session.truncations) >= 2, 10)
        await caller.hangup()

    assert len(caller.clears[0].flushed_marks) > 0  # there were late echoes to ignore
    second = session.truncations[1]
    heard_of_second = heard_before(caller, second_clear.at_ms) - second_started
    short_by = heard_of_second - second["audio_end_ms"]
    assert -TRUNCATE_TOLERANCE_MS <= short_by <= TRUNCATE_SHORT_TOLERANCE_MS


async def test_a_short_mhm_does_not_interrupt_the_agent(stack, model):
    async with stack.caller(to=DENTAL, speed=CALLER_SPEED) as caller:
        item_id = await ask_for_the_long_answer(caller, model)
        session = model.sessions[0]
        await caller.wait_until_heard_ms(caller.heard_ms() + 1500, timeout=30)
        await caller.play(caller_speech("Mhm.")[: 8 * 160])  # 160 ms of "mhm"
        speech_turns = 2  # the question, then the "mhm"
        await model.wait_for(
            lambda: len(session.sent_events("input_audio_buffer.speech_stopped")) >= speech_turns,
            30,
        )
        await caller.wait_until_quiet(300, timeout=60)
        await caller.hangup()

    assert caller.clears == []
    assert session.truncations == []
    record = stack.state.calls.get(caller.call_sid)
    answer = next(t for t in record.transcript if t["text"] == LONG_ANSWER)
    assert answer["interrupted"] is False
    assert marks_after_clear(caller, item_id) == []


async def test_a_refused_truncate_does_not_disturb_the_call(stack, model):
    model.truncate_error = True  # StepFun does not document truncate: it may answer an error
    async with stack.caller(to=DENTAL, speed=CALLER_SPEED) as caller:
        await ask_for_the_long_answer(caller, model)
        session = model.sessions[0]
        await caller.wait_until_heard_ms(caller.heard_ms() + 800, timeout=30)
        await caller.play(caller_speech("Sorry, can I stop you there?"))
        await caller.wait_for_event("clear", timeout=30)
        await model.wait_for(lambda: len(session.sent_events("response.done")) >= 3, 30)
        await caller.wait_until_quiet(300, timeout=30)
        await caller.hangup()
    assert session.sent_events("error")  # the truncate was refused
    record = stack.state.calls.get(caller.call_sid)
    assert record.end_reason == "caller_hung_up"
    assert record.transcript[-1]["text"] == SHORT_ANSWER  # the agent answered the interruption
