"""StepFun realtime dialect (OpenAI Realtime *beta* names, pcm16 at 24 kHz, nested tools).

Facts and their sources: reference/stepfun-realtime.md. Everything StepFun-specific about the
JSON lives in this module.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import urlencode

from phoneagent.realtime.base import (
    AddTextItem,
    AgentTranscriptDelta,
    AgentTranscriptDone,
    AppendAudio,
    AudioDelta,
    CancelResponse,
    CreateResponse,
    ModelCommand,
    ModelError,
    ModelEvent,
    ResponseDone,
    ResponseStarted,
    SessionReady,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    ToolOutput,
    TruncateItem,
    UpdateSession,
    UserTranscript,
)

# Errors that a correct client still meets because of races (reference section 7): cancelling a
# response that just finished, or truncating, which StepFun does not document.
BENIGN_ERRORS = ("no ongoing response to cancel", "truncate")

# The model's name is unsettled in public sources (reference section 1): when the upgrade is
# refused for one spelling, the connection retries once with the other.
MODEL_ALIASES = {
    "step-2.5-realtime": "stepaudio-2.5-realtime",
    "stepaudio-2.5-realtime": "step-2.5-realtime",
}


class StepFunDialect:
    name = "stepfun"
    input_rate = 24000
    output_rate = 24000

    def connect_url(self, base_url: str, model: str) -> str:
        return f"{base_url}?{urlencode({'model': model})}"

    def headers(self, api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"}

    def encode(self, command: ModelCommand) -> str:
        if isinstance(command, AppendAudio):
            # The per-frame hot path (50 a second per call): base64 needs no JSON escaping, so
            # the message is put together directly, a quarter of json.dumps' cost.
            audio = base64.b64encode(command.pcm).decode("ascii")
            return '{"type":"input_audio_buffer.append","audio":"' + audio + '"}'
        return json.dumps(_encode(command), ensure_ascii=False)

    def decode(self, text: str | bytes) -> ModelEvent | None:
        message = json.loads(text)
        decoder = _DECODERS.get(message.get("type"))
        return decoder(message) if decoder else None


def _encode(command: ModelCommand) -> dict[str, Any]:
    match command:
        case UpdateSession(config):
            session: dict[str, Any] = {
                "modalities": ["text", "audio"],
                "instructions": config.instructions,
                "voice": config.voice,
                "input_audio_format": "pcm16",
                "output_audio_format": "pcm16",
                # Server VAD is off by default on StepFun (reference section 5): always set it.
                "turn_detection": {
                    "type": "server_vad",
                    "prefix_padding_ms": config.prefix_padding_ms,
                    "silence_duration_ms": config.silence_duration_ms,
                    "energy_awakeness_threshold": config.vad_threshold,
                },
            }
            if config.tools:
                session["tools"] = [
                    {
                        "type": "function",
                        "function": {
                            "name": t.name,
                            "description": t.description,
                            "parameters": t.parameters,
                        },
                    }
                    for t in config.tools
                ]
                session["tool_choice"] = "auto"  # the object form is refused (PROBE5)
            return {"type": "session.update", "session": session}
        case CreateResponse(instructions):
            if instructions is None:
                return {"type": "response.create"}
            return {"type": "response.create", "response": {"instructions": instructions}}
        case CancelResponse():
            return {"type": "response.cancel"}
        case TruncateItem(item_id, audio_end_ms):
            return {
                "type": "conversation.item.truncate",
                "item_id": item_id,
                "content_index": 0,
                "audio_end_ms": audio_end_ms,
            }
        case AddTextItem(role, text):
            # Assistant history is injected with content type "text" (reference section 2).
            kind = "text" if role == "assistant" else "input_text"
            item = {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}
            return {"type": "conversation.item.create", "item": item}
        case ToolOutput(call_id, output):
            item = {"type": "function_call_output", "call_id": call_id, "output": output}
            return {"type": "conversation.item.create", "item": item}
    raise TypeError(f"not a model command: {command!r}")


def _error(message: dict[str, Any]) -> ModelError:
    error = message.get("error")
    if not isinstance(error, dict):  # one client saw a bare string here (reference section 3)
        return ModelError(code="", message=str(error))
    text = str(error.get("message", ""))
    return ModelError(
        code=str(error.get("code") or error.get("type") or ""),
        message=text,
        benign=any(marker in text for marker in BENIGN_ERRORS),
        details=error,
    )


_DECODERS = {
    "session.created": lambda m: SessionReady(session_id=str(m["session"].get("id", ""))),
    "session.updated": lambda m: SessionUpdated(),
    "input_audio_buffer.speech_started": lambda m: SpeechStarted(
        item_id=m.get("item_id", ""), audio_start_ms=int(m.get("audio_start_ms", 0))
    ),
    "input_audio_buffer.speech_stopped": lambda m: SpeechStopped(
        item_id=m.get("item_id", ""), audio_end_ms=int(m.get("audio_end_ms", 0))
    ),
    "conversation.item.input_audio_transcription.completed": lambda m: UserTranscript(
        item_id=m.get("item_id", ""), text=m.get("transcript", "")
    ),
    "response.created": lambda m: ResponseStarted(response_id=m["response"]["id"]),
    "response.audio.delta": lambda m: AudioDelta(
        response_id=m["response_id"], item_id=m["item_id"], pcm=base64.b64decode(m["delta"])
    ),
    "response.audio_transcript.delta": lambda m: AgentTranscriptDelta(
        response_id=m["response_id"], item_id=m["item_id"], text=m.get("delta", "")
    ),
    "response.audio_transcript.done": lambda m: AgentTranscriptDone(
        response_id=m["response_id"], item_id=m["item_id"], text=m.get("transcript", "")
    ),
    "response.function_call_arguments.done": lambda m: ToolCall(
        response_id=m.get("response_id", ""),
        call_id=m["call_id"],
        name=m["name"],
        arguments=m.get("arguments", ""),
    ),
    "response.done": lambda m: ResponseDone(
        response_id=m["response"]["id"], status=m["response"].get("status", "completed")
    ),
    "error": _error,
}
