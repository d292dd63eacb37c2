"""StepFun realtime dialect (OpenAI Realtime *beta* names, pcm16 at 24 kHz, nested tools).

Facts and their sources: reference/stepfun-realtime.md. Everything StepFun-specific about the
JSON lives in this module.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import msgspec

from phoneagent.realtime.base import (
    AddTextItem,
    AgentTranscriptDelta,
    AgentTranscriptDone,
    AppendAudio,
    AudioDelta,
    CancelResponse,
    CreateResponse,
    ItemAdded,
    MalformedEvent,
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
    UpdateInstructions,
    UpdateSession,
    UserTranscript,
)

# Errors that a correct client still meets because of races (reference section 7): cancelling a
# response that just finished, or truncating, which StepFun does not document.
BENIGN_ERRORS = ("no ongoing response to cancel", "truncate")

# The documents (D-REF 请求参数) name `stepaudio-2.5-realtime`; `step-2.5-realtime` appears
# only in the launch press release (reference section 1). When one spelling is refused (the
# upgrade, or an error about the model in the session), the connection retries once with the
# other.
MODEL_ALIASES = {
    "step-2.5-realtime": "stepaudio-2.5-realtime",
    "stepaudio-2.5-realtime": "step-2.5-realtime",
}


# The model's events are decoded by msgspec (JSON in C). The audio delta, a dozen a second per
# call and kilobytes of base64 each, is decoded into its fields in one pass, the base64
# included: json.loads and then base64 in Python cost five times as much. Every other event is
# read as a plain object by the decoders below. msgspec is stricter than json.loads in one way
# that matters: an escaped lone surrogate ("\ud800", half of a UTF-16 pair) anywhere in an
# event makes it malformed, where json.loads passed it on into a text no UTF-8 can carry (and
# that would fail later, in a log line or a call event).
class _Kind(msgspec.Struct):
    """Only the event's type; the rest of the message is skipped."""

    type: Any = None


class _AudioDeltaWire(msgspec.Struct):
    item_id: str
    delta: bytes  # base64 in the message: decoded, and refused if it is not base64
    # D-REF's sample of the delta has no response_id (reference section 2)
    response_id: str | None = None


class _AppendWire(msgspec.Struct, tag_field="type", tag="input_audio_buffer.append"):
    audio: bytes  # base64 in the message


_ENCODER = msgspec.json.Encoder()
_KIND = msgspec.json.Decoder(_Kind)
_AUDIO_DELTA = msgspec.json.Decoder(_AudioDeltaWire)
_OBJECT = msgspec.json.Decoder(dict[str, Any])


def _audio_delta(wire: _AudioDeltaWire) -> AudioDelta:
    return AudioDelta(response_id=wire.response_id or None, item_id=wire.item_id, pcm=wire.delta)


class StepFunDialect:
    name = "stepfun"
    input_rate = 24000
    output_rate = 24000

    def connect_url(self, base_url: str, model: str) -> str:
        return f"{base_url}?{urlencode({'model': model})}"

    def headers(self, api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"}

    def encode(self, command: ModelCommand) -> bytes:
        if isinstance(command, AppendAudio):
            # The per-frame hot path (50 a second per call): msgspec writes the JSON and the
            # base64 in one pass, a fifth of json.dumps' cost.
            return _ENCODER.encode(_AppendWire(command.pcm))
        return json.dumps(_encode(command), ensure_ascii=False).encode()

    def decode(self, text: str | bytes) -> ModelEvent | None:
        """The typed event, None for events the call has no use for; MalformedEvent for
        anything else, whatever was wrong with it (the model is outside input too)."""
        try:
            kind = _KIND.decode(text).type
            if kind == "response.audio.delta":
                return _audio_delta(_AUDIO_DELTA.decode(text))
            decoder = _DECODERS.get(kind) if isinstance(kind, str) else None
            if decoder is None and isinstance(kind, str) and kind.endswith("_error"):
                decoder = _error  # D-GUIDE 错误处理: a bare error, its type as the event's type
            return decoder(_OBJECT.decode(text)) if decoder else None
        except MalformedEvent:
            raise
        # Not JSON or not an object (msgspec's DecodeError and ValidationError are ValueErrors;
        # UnicodeError: a lone surrogate in a text), JSON too deep (RecursionError), a number
        # out of range (OverflowError), a field of the wrong type (KeyError, TypeError,
        # AttributeError, ValueError)
        except (ValueError, KeyError, TypeError, AttributeError, ArithmeticError,
                RecursionError) as exc:  # fmt: skip
            raise MalformedEvent(f"{type(exc).__name__}: {exc}"[:200]) from None


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
        case UpdateInstructions(instructions):
            return {"type": "session.update", "session": {"instructions": instructions}}
        case CreateResponse(instructions):
            if instructions is None:
                return {"type": "response.create"}
            # D-GUIDE 开发技巧/实现开场白 nests the session's instructions in response.create;
            # response.instructions (OpenAI's per-response override) is not documented.
            return {"type": "response.create", "session": {"instructions": instructions}}
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
    """D-REF (Server Event 列表/错误事件) wraps the error: ``{"type": "error", "error": {...}}``;
    D-GUIDE (错误处理) shows it bare: ``{"type": "invalid_request_error", "code", "message",
    "param", "event_id"}``. Both are a model error."""
    error = message.get("error") if message.get("type") == "error" else message
    if not isinstance(error, dict):  # one client saw a bare string here (reference section 3)
        return ModelError(code="", message=str(error))
    text = str(error.get("message", ""))
    return ModelError(
        code=str(error.get("code") or error.get("type") or ""),
        message=text,
        benign=any(marker in text for marker in BENIGN_ERRORS),
        details=error,
    )


def _optional_id(message: dict[str, Any]) -> str | None:
    """The response id, when the event carries one: D-REF's samples of audio and transcript
    deltas and D-GUIDE's function-call events do not (the field tables list it)."""
    value = _text(message, "response_id")
    return value or None


def _text(message: dict[str, Any], key: str, *, required: bool = False) -> str:
    """A string field ('' when absent or null, unless ``required``); anything else is
    malformed: an object as an id or a number as a transcript would break the call later."""
    value = message.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise MalformedEvent(f"{key} is {type(value).__name__}, not a string")
    return value


def _object(message: dict[str, Any], key: str) -> dict[str, Any]:
    value = message.get(key)
    if not isinstance(value, dict):
        raise MalformedEvent(f"{key} is {type(value).__name__}, not an object")
    return value


def _ms(value: Any) -> int:
    """D-REF types speech_started's ``audio_start_ms`` as a string, its sample as a number."""
    ms = int(float(value or 0))  # inf (1e400) raises OverflowError, nan ValueError
    if not 0 <= ms < 2**40:
        raise MalformedEvent(f"time out of range: {ms}")
    return ms


def _response_done(message: dict[str, Any]) -> ResponseDone:
    # D-GUIDE's tool-call example (自定义 Tool Call/完整示例) has a response with neither id nor
    # status, only ``output``; the call is in it as {type, name, call_id, arguments}.
    response = message.get("response") or {}
    response_id = _optional_id({"response_id": response.get("id")})
    calls = tuple(
        ToolCall(
            response_id=response_id,
            call_id=str(item["call_id"]),
            name=str(item.get("name", "")),
            arguments=str(item.get("arguments") or ""),
        )
        for item in response.get("output") or ()
        if isinstance(item, dict) and item.get("type") == "function_call" and item.get("call_id")
    )
    return ResponseDone(
        response_id=response_id,
        status=str(response.get("status") or "completed"),
        tool_calls=calls,
    )


def _item_added(message: dict[str, Any]) -> ItemAdded | None:
    """Which response an output item is of, when the announcement says (D-REF's sample of
    response.output_item.added does; D-GUIDE's conversation.item.created does not)."""
    item = message.get("item") or {}
    response_id = _optional_id(message)
    if response_id is None or not item.get("id"):
        return None
    return ItemAdded(response_id=response_id, item_id=str(item["id"]))


_DECODERS = {
    # D-REF's sample of the update's answer is labelled session.created (更新 session 响应):
    # the connection takes a second session.created as the update's ack.
    "session.created": lambda m: SessionReady(session_id=_text(_object(m, "session"), "id")),
    "session.updated": lambda m: SessionUpdated(),
    "input_audio_buffer.speech_started": lambda m: SpeechStarted(
        item_id=_text(m, "item_id"), audio_start_ms=_ms(m.get("audio_start_ms"))
    ),
    "input_audio_buffer.speech_stopped": lambda m: SpeechStopped(
        item_id=_text(m, "item_id"), audio_end_ms=_ms(m.get("audio_end_ms"))
    ),
    "conversation.item.input_audio_transcription.completed": lambda m: UserTranscript(
        item_id=_text(m, "item_id"), text=_text(m, "transcript")
    ),
    "response.created": lambda m: ResponseStarted(
        response_id=_text(_object(m, "response"), "id", required=True)
    ),
    "response.output_item.added": _item_added,
    "conversation.item.created": _item_added,
    "response.audio_transcript.delta": lambda m: AgentTranscriptDelta(
        response_id=_optional_id(m),
        item_id=_text(m, "item_id", required=True),
        text=_text(m, "delta"),
    ),
    "response.audio_transcript.done": lambda m: AgentTranscriptDone(
        response_id=_optional_id(m),
        item_id=_text(m, "item_id", required=True),
        text=_text(m, "transcript"),
    ),
    # D-GUIDE 函数调用流程: {type, call_id, arguments, name}, no response_id, no item_id.
    "response.function_call_arguments.done": lambda m: ToolCall(
        response_id=_optional_id(m),
        call_id=_text(m, "call_id", required=True),
        name=_text(m, "name", required=True),
        arguments=_text(m, "arguments"),
    ),
    "response.done": _response_done,
    "error": _error,
}
