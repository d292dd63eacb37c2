"""The StepFun dialect against the shapes in reference/stepfun-realtime.md."""

import base64
import json

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
    SessionConfig,
    SessionReady,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    ToolOutput,
    ToolSpec,
    TruncateItem,
    UpdateInstructions,
    UpdateSession,
    UserTranscript,
)
from phoneagent.realtime.stepfun import StepFunDialect

dialect = StepFunDialect()


def encoded(command):
    return json.loads(dialect.encode(command))


def test_connect_url_and_headers():
    url = dialect.connect_url("wss://api.stepfun.com/v1/realtime", "step-2.5-realtime")
    assert url == "wss://api.stepfun.com/v1/realtime?model=step-2.5-realtime"
    assert dialect.headers("k") == {"Authorization": "Bearer k"}


def test_session_update_sets_pcm16_server_vad_and_nested_tools():
    tool = ToolSpec("end_call", "Hang up.", {"type": "object", "properties": {}})
    config = SessionConfig("Be nice.", "linjiajiejie", 700, 300, 1000, tools=(tool,))
    assert encoded(UpdateSession(config)) == {
        "type": "session.update",
        "session": {
            "modalities": ["text", "audio"],
            "instructions": "Be nice.",
            "voice": "linjiajiejie",
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "turn_detection": {
                "type": "server_vad",
                "prefix_padding_ms": 300,
                "silence_duration_ms": 700,
                "energy_awakeness_threshold": 1000,
            },
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "end_call",
                        "description": "Hang up.",
                        "parameters": {"type": "object", "properties": {}},
                    },
                }
            ],
            "tool_choice": "auto",
        },
    }


def test_client_commands():
    assert encoded(AppendAudio(b"\x01\x00")) == {
        "type": "input_audio_buffer.append",
        "audio": "AQA=",
    }
    assert encoded(CreateResponse()) == {"type": "response.create"}
    # D-GUIDE 开发技巧/实现开场白: instructions go in the session, also nested in response.create.
    assert encoded(CreateResponse("Say hi")) == {
        "type": "response.create",
        "session": {"instructions": "Say hi"},
    }
    assert encoded(UpdateInstructions("Say hi")) == {
        "type": "session.update",
        "session": {"instructions": "Say hi"},
    }
    assert encoded(CancelResponse()) == {"type": "response.cancel"}
    assert encoded(TruncateItem("item1", 1200)) == {
        "type": "conversation.item.truncate",
        "item_id": "item1",
        "content_index": 0,
        "audio_end_ms": 1200,
    }
    assert encoded(AddTextItem("user", "pressed 1"))["item"] == {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": "pressed 1"}],
    }
    assert encoded(AddTextItem("assistant", "hi"))["item"]["content"][0]["type"] == "text"
    assert encoded(ToolOutput("call1", "ok")) == {
        "type": "conversation.item.create",
        "item": {"type": "function_call_output", "call_id": "call1", "output": "ok"},
    }


def decode(message):
    return dialect.decode(json.dumps(message))


def test_server_events_decode():
    audio = base64.b64encode(b"\x00\x01" * 10).decode()
    cases = [
        ({"type": "session.created", "session": {"id": "sess_1"}}, SessionReady("sess_1")),
        ({"type": "session.updated", "session": {}}, SessionUpdated()),
        (
            {"type": "input_audio_buffer.speech_started", "audio_start_ms": 40, "item_id": "u1"},
            SpeechStarted("u1", 40),
        ),
        (
            {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 900, "item_id": "u1"},
            SpeechStopped("u1", 900),
        ),
        (
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": "u1",
                "content_index": 0,
                "transcript": "hello",
            },
            UserTranscript("u1", "hello"),
        ),
        ({"type": "response.created", "response": {"id": "r1"}}, ResponseStarted("r1")),
        (
            {"type": "response.audio.delta", "response_id": "r1", "item_id": "i1",
             "output_index": 0, "content_index": 0, "delta": audio},
            AudioDelta("r1", "i1", b"\x00\x01" * 10),
        ),
        (
            {"type": "response.audio_transcript.delta", "response_id": "r1", "item_id": "i1",
             "delta": "Hel"},
            AgentTranscriptDelta("r1", "i1", "Hel"),
        ),
        (
            {"type": "response.audio_transcript.done", "response_id": "r1", "item_id": "i1",
             "transcript": "Hello"},
            AgentTranscriptDone("r1", "i1", "Hello"),
        ),
        (
            {"type": "response.function_call_arguments.done", "response_id": "r1",
             "call_id": "c1", "name": "end_call", "arguments": "{}"},
            ToolCall("r1", "c1", "end_call", "{}"),
        ),
        (
            {"type": "response.done", "response": {"id": "r1", "status": "cancelled"}},
            ResponseDone("r1", "cancelled"),
        ),
    ]  # fmt: skip
    for message, expected in cases:
        assert decode(message) == expected, message["type"]


def test_an_audio_delta_needs_no_response_id_and_may_be_a_binary_frame():
    """D-REF's sample of the delta has no response_id; an empty one is none either. A binary
    frame holds the same JSON (UTF-8 either way)."""
    audio = base64.b64encode(b"\x01\x02" * 3).decode()
    delta = {"type": "response.audio.delta", "item_id": "i1", "delta": audio}
    assert decode(delta) == AudioDelta(None, "i1", b"\x01\x02" * 3)
    assert decode({**delta, "response_id": ""}) == AudioDelta(None, "i1", b"\x01\x02" * 3)
    assert decode({**delta, "response_id": None}) == AudioDelta(None, "i1", b"\x01\x02" * 3)
    binary = json.dumps({**delta, "response_id": "r1", "event_id": "e1"}).encode()
    assert dialect.decode(binary) == AudioDelta("r1", "i1", b"\x01\x02" * 3)


def test_events_the_call_does_not_use_decode_to_none():
    for kind in ("response.content_part.added", "rate_limits.updated", "response.thinking.delta"):
        assert decode({"type": kind}) is None


def test_errors_are_typed_and_known_races_are_benign():
    error = decode(
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "code": "invalid_value",
                "message": "no ongoing response to cancel",
            },
        }
    )
    assert isinstance(error, ModelError)
    assert (error.code, error.benign) == ("invalid_value", True)
    serious = decode({"type": "error", "error": {"type": "server_error", "message": "boom"}})
    assert (serious.code, serious.benign) == ("server_error", False)
    bare = decode({"type": "error", "error": "quota exceeded"})
    assert (bare.message, bare.benign) == ("quota exceeded", False)


def test_the_calls_audio_runs_at_the_sessions_rates():
    # The stream route builds each Call with its session's Dialect.input_rate/output_rate: a
    # dialect at another rate gets audio at its own rate, in and out.
    from conftest import EXAMPLE_PERSONAS

    from phoneagent.call import Call, SendMedia, ToModel
    from phoneagent.personas import PersonaRegistry
    from phoneagent.realtime.base import AppendAudio, AudioDelta, ResponseStarted
    from phoneagent.twilio.wire.stream import Media

    persona = PersonaRegistry(EXAMPLE_PERSONAS).current.personas["bright-smile-dental"]
    assert (StepFunDialect.input_rate, StepFunDialect.output_rate) == (24000, 24000)
    call = Call(persona, "MZ", "CA", model_input_rate=16000, model_output_rate=16000)
    call.begin()
    [append] = [
        a.command
        for a in call.on_twilio(Media(timestamp_ms=0, payload=b"\xff" * 160))
        if isinstance(a, ToModel) and isinstance(a.command, AppendAudio)
    ]
    assert len(append.pcm) == 640  # 20 ms of pcm16 at 16 kHz
    call.on_model(ResponseStarted("r1"))
    sent = call.on_model(AudioDelta("r1", "i1", b"\x00\x01" * 3200))  # 200 ms at 16 kHz
    heard = sum(len(a.payload) for a in sent if isinstance(a, SendMedia))
    assert 1440 <= heard <= 1600  # up to 200 ms of μ-law at 8 kHz (the filter holds a little)
