"""The realtime model as the ``Call`` sees it: typed events in, typed commands out.

A provider dialect (StepFun today, OpenAI GA later) translates these to and from its JSON, so
no provider field name leaks into the call logic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

# --- session configuration -----------------------------------------------------------------


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict  # JSON Schema of the arguments


@dataclass(frozen=True)
class SessionConfig:
    instructions: str
    voice: str
    silence_duration_ms: int
    prefix_padding_ms: int
    vad_threshold: int
    tools: tuple[ToolSpec, ...] = ()


# --- commands: Call → model -----------------------------------------------------------------


@dataclass(frozen=True)
class UpdateSession:
    config: SessionConfig


@dataclass(frozen=True)
class AppendAudio:
    pcm: bytes  # pcm16 little-endian at the dialect's input rate


@dataclass(frozen=True)
class UpdateInstructions:
    """Replace the session's instructions (documented: any session field but the voice may
    change at any time). How the Call makes the model say a scripted sentence, and undoes it."""

    instructions: str


@dataclass(frozen=True)
class CreateResponse:
    # The session's instructions as they are for this response, carried along as StepFun's
    # greeting sample does (D-GUIDE 开发技巧/实现开场白). Not a per-response override: StepFun
    # documents none, so the Call sends UpdateInstructions first.
    instructions: str | None = None


@dataclass(frozen=True)
class CancelResponse:
    pass


@dataclass(frozen=True)
class TruncateItem:
    item_id: str
    audio_end_ms: int  # how much of the item's audio the caller actually heard


@dataclass(frozen=True)
class AddTextItem:
    role: str  # "user", "assistant" or "system"
    text: str


@dataclass(frozen=True)
class ToolOutput:
    call_id: str
    output: str


ModelCommand = (
    UpdateSession
    | UpdateInstructions
    | AppendAudio
    | CreateResponse
    | CancelResponse
    | TruncateItem
    | AddTextItem
    | ToolOutput
)

# --- events: model → Call -------------------------------------------------------------------
#
# ``response_id`` is None where the provider left it out: StepFun's documented samples of audio
# and transcript deltas, function-call events and a tool call's response.done carry none
# (tests/fixtures/stepfun/). The ``Call`` attributes such an event to the item's response, or
# to the response in progress: it alone knows which that is (see ``Call._response_of``).


@dataclass(frozen=True)
class SessionReady:
    session_id: str


@dataclass(frozen=True)
class SessionUpdated:
    pass


@dataclass(frozen=True)
class SpeechStarted:
    item_id: str
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStopped:
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True)
class UserTranscript:
    item_id: str
    text: str


@dataclass(frozen=True)
class ResponseStarted:
    response_id: str


@dataclass(frozen=True)
class AudioDelta:
    response_id: str | None
    item_id: str
    pcm: bytes  # pcm16 little-endian at the dialect's output rate


@dataclass(frozen=True)
class AgentTranscriptDelta:
    response_id: str | None
    item_id: str
    text: str


@dataclass(frozen=True)
class AgentTranscriptDone:
    response_id: str | None
    item_id: str
    text: str


@dataclass(frozen=True)
class ToolCall:
    response_id: str | None
    call_id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass(frozen=True)
class ResponseDone:
    response_id: str | None
    status: str  # completed, cancelled, failed, incomplete
    # Function calls listed in the response's output: StepFun's guide shows a call only there
    # (its function_call_arguments.done may be missed); the Call de-duplicates by call_id.
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class ItemAdded:
    """An output item of a response was announced: remembers which response the item is of."""

    response_id: str
    item_id: str


class ModelUnavailable(Exception):
    """No configured session could be opened. ``status`` is the HTTP status of a refused
    upgrade (401 bad key, 402 no balance, 429 rate or concurrency limit, 5xx), if any."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.status = status


class MalformedEvent(ValueError):
    """A model message no event can be made of (not JSON, the wrong shape, a field of the wrong
    type or out of range). The dialect raises only this; the call logs it and goes on."""


@dataclass(frozen=True)
class ModelError:
    code: str
    message: str
    benign: bool = False  # a known race the call can ignore (see the dialect)
    details: dict = field(default_factory=dict)


ModelEvent = (
    SessionReady
    | SessionUpdated
    | SpeechStarted
    | SpeechStopped
    | UserTranscript
    | ResponseStarted
    | AudioDelta
    | AgentTranscriptDelta
    | AgentTranscriptDone
    | ToolCall
    | ResponseDone
    | ItemAdded
    | ModelError
)


class Dialect(Protocol):
    """One provider's wire format. Pure functions: no sockets."""

    name: str
    # pcm16 sample rates of AppendAudio.pcm and AudioDelta.pcm. The Call's audio pipelines run
    # at audio/'s defaults for now; tests/test_stepfun_dialect.py holds the two together.
    input_rate: int
    output_rate: int

    def connect_url(self, base_url: str, model: str) -> str: ...

    def headers(self, api_key: str) -> dict[str, str]: ...

    def encode(self, command: ModelCommand) -> bytes:
        """The command as the JSON text of one text frame, UTF-8 encoded (as it goes out)."""
        ...

    def decode(self, text: str | bytes) -> ModelEvent | None:
        """The typed event, or None for events the call has no use for."""
        ...
