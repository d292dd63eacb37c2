"""A malformed model event mid-call is logged and skipped, like a malformed Twilio frame: the
call goes on. The model is outside input too (a proxy, a buggy release, a hostile endpoint)."""

import json

import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.realtime.base import MalformedEvent
from phoneagent.realtime.stepfun import StepFunDialect
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.stack import LocalStack
from phoneagent.testing.wav import CALLER_BOOKING_WAV

DENTAL = "+14155550100"

MALFORMED = [
    "not json at all",
    "[1, 2, 3]",
    '"a string"',
    "null",
    "[" * 50_000 + "]" * 50_000,  # deeper than the parser goes
    json.dumps({"type": "response.created"}),
    json.dumps({"type": "session.created", "session": "sess_1"}),
    json.dumps({"type": "response.created", "response": None}),
    json.dumps({"type": "response.created", "response": {"id": {"x": 1}}}),
    json.dumps(
        {
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": "i1",
            "transcript": None,
        }
    ).replace("null", "12"),  # a number as the transcript
    json.dumps(
        {
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": {"obj": 1},
            "transcript": "hi",
        }
    ),
    '{"type": "input_audio_buffer.speech_started", "item_id": "i1", "audio_start_ms": 1e400}',
    json.dumps(
        {"type": "input_audio_buffer.speech_started", "item_id": "i1", "audio_start_ms": "soon"}
    ),
    json.dumps({"type": "input_audio_buffer.speech_stopped", "item_id": "i1", "audio_end_ms": -5}),
    json.dumps({"type": "response.audio.delta", "item_id": "i1", "delta": "%%%not base64"}),
    json.dumps({"type": "response.audio.delta", "item_id": ["i1"], "delta": ""}),
    json.dumps({"type": "response.audio.delta", "item_id": "i1", "delta": "AAA"}),  # no padding
    json.dumps({"type": "response.audio.delta", "item_id": "i1", "delta": "AA\nAA"}),
    json.dumps({"type": "response.audio.delta", "item_id": "i1"}),
    json.dumps({"type": "response.audio.delta", "item_id": "i1", "delta": None}),
    json.dumps({"type": "response.audio.delta", "delta": "AAAA"}),
    json.dumps({"type": "response.audio.delta", "item_id": "i1", "delta": "", "response_id": 7}),
    r'{"type": "response.audio.delta", "item_id": "\ud800", "delta": ""}',  # a lone surrogate
    '{"type": "response.audio.delta", "item_id": "\ud800", "delta": ""}',  # the same, unescaped
    b'{"type": "response.audio.delta", "item_id": "\xff", "delta": ""}',  # not UTF-8
    b'{"type": "response.created", "response": {"id": "\xff"}}',
    json.dumps({"type": "response.audio_transcript.delta", "item_id": "i1", "delta": 42}),
    json.dumps({"type": "response.function_call_arguments.done", "call_id": 7, "name": "x"}),
    json.dumps({"type": "response.done", "response": [1]}),
]


@pytest.mark.parametrize("text", MALFORMED, ids=range(len(MALFORMED)))
def test_the_dialect_raises_only_malformed_event(text):
    with pytest.raises(MalformedEvent):
        StepFunDialect().decode(text)


def test_a_null_transcript_is_an_empty_one():
    message = {"type": "conversation.item.input_audio_transcription.completed", "item_id": "i1"}
    event = StepFunDialect().decode(json.dumps({**message, "transcript": None}))
    assert event.text == ""


def _fits_a_frame(text: str | bytes) -> bool:
    """A text frame is UTF-8: a lone surrogate cannot be sent in one."""
    try:
        return bool(text.encode() if isinstance(text, str) else text)
    except UnicodeEncodeError:
        return False


async def test_the_call_goes_on_through_malformed_events():
    model = FakeRealtimeServer(speed=None, script=["Of course, Tuesday works."])
    async with LocalStack(EXAMPLE_PERSONAS, model=model) as stack:
        async with stack.caller(to=DENTAL, speed=0) as caller:
            await caller.dial()
            await caller.connect()
            await caller.wait_for_event("media", timeout=10)  # the greeting
            session = model.sessions[0]
            for text in MALFORMED:  # straight onto the wire, as a broken server would send
                if _fits_a_frame(text):  # bytes go as a binary frame
                    session._outbox.put_nowait(("raw", text, {}))
            await caller.play_wav(CALLER_BOOKING_WAV)
            await caller.play_silence(1500)
            await model.wait_for(lambda: len(session.sent_events("response.done")) >= 2, 20)
            await caller.wait_until_quiet(200, timeout=20)
            assert not caller.closed  # the call is still up
            await caller.hangup()
        record = stack.state.calls.get(caller.call_sid)
        assert record.end_reason == "caller_hung_up"
        assert record.transcript[-1]["text"] == "Of course, Tuesday works."
