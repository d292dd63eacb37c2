"""Every documented StepFun sample (tests/fixtures/stepfun/) parses into the typed event the
Call needs: the dialect follows StepFun's documents, not our fake."""

import base64
import json
from pathlib import Path

import pytest

from phoneagent.realtime.base import (
    AgentTranscriptDelta,
    AgentTranscriptDone,
    AudioDelta,
    ItemAdded,
    ModelError,
    ResponseDone,
    SessionReady,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    UserTranscript,
)
from phoneagent.realtime.stepfun import StepFunDialect

FIXTURES = Path(__file__).parent / "fixtures" / "stepfun"
PCM = b"\x01\x00\x02\x00"

EXPECTED = {
    "ref-error.json": ModelError(
        "invalid_param",
        "音频内容不完整",
        details={
            "type": "invalid_request_error",
            "code": "invalid_param",
            "message": "音频内容不完整",
            "event_id": "event_567",
        },
    ),
    "guide-error.json": ModelError(
        "invalid_value",
        "无效值: 'scooby.dooby.doo' ...",
        details={
            "type": "invalid_request_error",
            "code": "invalid_value",
            "message": "无效值: 'scooby.dooby.doo' ...",
            "param": "type",
            "event_id": "my_awesome_event",
        },
    ),
    "ref-session-created.json": SessionReady("sess_001"),
    # Labelled session.created in the docs: the connection takes it as the update's ack.
    "ref-session-updated.json": SessionReady(""),
    "ref-speech-started.json": SpeechStarted("msg_003", 1000),
    "ref-speech-stopped.json": SpeechStopped("msg_003", 2000),
    "ref-audio-delta.json": AudioDelta(None, "msg_008", PCM),
    "ref-audio-done.json": None,
    "ref-audio-transcript-delta.json": AgentTranscriptDelta(None, "msg_002", "Hello, how can I a"),
    "ref-audio-transcript-done.json": AgentTranscriptDone(
        "resp_001", "msg_008", "Hello, how can I assist you today?"
    ),
    "ref-conversation-item-created.json": None,  # a user item, no response to remember
    "ref-input-transcription-completed.json": UserTranscript("msg_003", "你好"),
    "ref-output-item-added.json": ItemAdded("resp_001", "msg_007"),
    # Labelled response.done, status completed, in the docs: nothing tells it from a real end.
    "ref-response-created.json": ResponseDone("resp_001", "completed"),
    "ref-response-done.json": ResponseDone("resp_001", "completed"),
    "guide-function-call-item-created.json": None,  # no response_id to remember
    "guide-function-call-arguments-delta.json": None,
    "guide-function-call-arguments-done.json": ToolCall(
        None, "call_20250622225814_get_weather", "get_weather", '{"location":"北京"}'
    ),
    "guide-response-done-function-call.json": ResponseDone(
        None,
        "completed",
        tool_calls=(
            ToolCall(None, "call_sHlR7iaFwQ2YQOqm", "generate_horoscope", '{"sign":"水瓶座"}'),
        ),
    ),
}


def sample(name: str) -> dict:
    message = json.loads((FIXTURES / name).read_text())
    if name == "ref-audio-delta.json":
        # The docs' delta is the placeholder "Base64EncodedAudioDelta", not base64.
        message["delta"] = base64.b64encode(PCM).decode()
    return message


def test_every_fixture_has_an_expectation_and_a_source():
    files = {path.name for path in FIXTURES.glob("*.json")}
    assert files == set(EXPECTED)
    readme = (FIXTURES / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in files)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_documented_sample_parses_into_the_typed_event(name):
    assert StepFunDialect().decode(json.dumps(sample(name), ensure_ascii=False)) == EXPECTED[name]


def test_speech_started_audio_start_ms_typed_string_in_the_table_is_accepted():
    message = sample("ref-speech-started.json") | {"audio_start_ms": "1000"}
    assert StepFunDialect().decode(json.dumps(message)) == SpeechStarted("msg_003", 1000)
