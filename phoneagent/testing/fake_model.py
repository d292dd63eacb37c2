"""A protocol-faithful fake of StepFun's realtime speech API, served on loopback.

Tests, benchmarks and ``phoneagent demo``/``simulate`` talk to this instead of StepFun. It is
written from ``reference/stepfun-realtime.md`` (cited below as "ref §N"), not from what our
product expects: it behaves as the real service is documented to, including its errors on
misuse, so a client bug shows up here rather than on the first live call.

Shape of the module:

- :class:`FakeRealtimeServer` — the WebSocket server: handshake checks and faults, the list of
  sessions, ``wait_for`` and ``drop_all`` for tests.
- :class:`FakeSession` — one connection: the session config, the input audio buffer, the
  conversation, at most one active response, and a record of every event both ways.
- :class:`EnergyVad` — the server VAD, sans-I/O: pcm16 in, speech start/stop offsets out.
- The replies come from a pluggable *responder* (:class:`ScriptedResponder` by default) and the
  caller's words from a pluggable *transcriber* (:func:`describe_audio` by default).

Every server event is emitted synchronously into a per-session queue that one writer task sends
in order. State changes and the events that announce them are therefore atomic: a
``response.cancel`` can never land between two events of a sequence, and no delta of a
cancelled response can follow its ``response.audio.done``.

Where the reference is silent the fake makes an explicit, documented assumption (search for
"Assumption").

Two shapes (``FakeRealtimeServer(shape=...)``):

- ``"full"`` (default): every field the reference's *field tables* list (``response_id``,
  ``output_index``, ``content_index`` on every delta), OpenAI-beta style.
- ``"documented"``: the events exactly as StepFun's own *samples* show them (D-REF = the API
  reference https://platform.stepfun.com/docs/zh/api-reference/realtime/chat, D-GUIDE = the
  developer guide https://platform.stepfun.com/docs/zh/guides/developer/realtime; copies of the
  samples are in ``tests/fixtures/stepfun/``). Fakes follow the documents, not our code: where a
  sample omits a field, so does this mode, and what the documents do not describe (per-response
  ``response.instructions``) has no effect. Search for "documented shape" below.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import dataclasses
import enum
import http
import inspect
import itertools
import json
import logging
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal, NamedTuple, TypeVar
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from phoneagent.testing.speech import synthesize

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_SCRIPT",
    "CallTool",
    "EnergyVad",
    "FakeRealtimeServer",
    "FakeSession",
    "HandshakeRecord",
    "ResponseContext",
    "Say",
    "ScriptedResponder",
    "VadEvent",
    "describe_audio",
    "queued_transcripts",
]

logger = logging.getLogger(__name__)

PATH = "/v1/realtime"
# ref §1: the docs name `stepaudio-2.5-realtime`, the press `step-2.5-realtime`; accept both.
DEFAULT_MODELS = frozenset({"step-2.5-realtime", "stepaudio-2.5-realtime"})
DEFAULT_SCRIPT = ("This is the built-in fake model. I heard you.",)
# ref §5: docs samples for the 2.5 model use this voice. Assumption: it is the default.
DEFAULT_VOICE = "linjiajiejie"
# ref §4: "single append chunk ≤ 15 MB".
MAX_MESSAGE_BYTES = 15 * 1024 * 1024
# ref §7: sessions last at most 30 minutes.
SESSION_MAX_SECONDS = 1800.0

# ref §4: pcm16, mono, 24 kHz, little-endian: 48 bytes per millisecond.
SAMPLE_RATE = 24_000
BYTES_PER_MS = 48

# ref §5 turn_detection defaults.
VAD_DEFAULTS = {
    "prefix_padding_ms": 500,
    "silence_duration_ms": 100,
    "energy_awakeness_threshold": 2500,
}
VAD_THRESHOLD_RANGE = (0, 5000)

INVALID_EVENT_FORMAT = "invalid event format"  # ref §7: the real message for malformed input
# Error codes. ref §7 documents `invalid_value` (unknown event type) and `invalid_param` (bad
# parameter). Assumption: refusals caused by the session's *state* (commit under server VAD, a
# second response, nothing to cancel, empty buffer) carry `invalid_state`; the reference gives
# only their messages, which are reproduced exactly.
CODE_INVALID_VALUE = "invalid_value"
CODE_INVALID_PARAM = "invalid_param"
CODE_INVALID_STATE = "invalid_state"
# D-GUIDE 开发技巧/实现开场白: the documented way to make the model say fixed words is this prompt
# in the session's instructions, followed by the words.
VERBATIM_PROMPT = "请你原样无修改地输出下面的话："
SHAPES = ("full", "documented")

# ------------------------------------------------------------------------------------------
# What the model says: responder and transcriber plug-ins
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Say:
    """A reply: speak *text* (audio deltas plus its transcript)."""

    text: str


@dataclasses.dataclass(frozen=True)
class CallTool:
    """A reply: call tool *name* with *arguments* (a dict, or a JSON string sent verbatim).

    *say*, when given, is spoken first in the same response, as the real model may say a filler
    ("let me check") and call the tool in one turn (ref §5 tools).
    """

    name: str
    arguments: dict[str, Any] | str = dataclasses.field(default_factory=dict)
    say: str = ""

    @property
    def arguments_json(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, separators=(",", ":"))


Reply = str | Say | CallTool


@dataclasses.dataclass(frozen=True)
class ResponseContext:
    """What a responder knows when it decides a reply (all copies, safe to keep).

    *trigger* is ``"vad"`` (server VAD closed a user turn) or ``"response.create"``;
    *instructions* is the request's ``response.instructions`` (None when absent);
    *session* is the session object (``instructions``, ``tools``, ``voice``, …).
    """

    trigger: Literal["vad", "response.create"]
    instructions: str | None
    last_user_transcript: str | None
    session: dict[str, Any]
    conversation: list[dict[str, Any]]
    session_id: str

    @property
    def session_instructions(self) -> str:
        return self.session.get("instructions", "")

    @property
    def tools(self) -> list[dict[str, Any]]:
        return self.session.get("tools", [])

    @property
    def verbatim(self) -> str | None:
        """The words the documented greeting recipe asks for (D-GUIDE 开发技巧/实现开场白): what
        follows ``请你原样无修改地输出下面的话：`` in the session's instructions, else None."""
        _, found, words = self.session_instructions.rpartition(VERBATIM_PROMPT)
        return words.strip() or None if found else None


Responder = Callable[[ResponseContext], Reply | Awaitable[Reply]]
Transcriber = Callable[[bytes], str]


QUOTED = re.compile(r'"(.+)"', re.DOTALL)


class ScriptedResponder:
    """The default responder.

    If the session's instructions end with the documented verbatim prompt and words (D-GUIDE
    开发技巧/实现开场白) it says those words, exactly. Else, if the ``response.create`` carried
    ``response.instructions`` (only ever set in the "full" shape: the documented shape ignores
    them) it speaks them: echoing them is the honest fake of a model that follows them.
    Otherwise it says the next entry of *script*, cycling. Entries may be :class:`CallTool` to
    script a tool call at a given turn.
    """

    def __init__(self, script: Sequence[Reply] = DEFAULT_SCRIPT) -> None:
        if not script:
            raise ValueError("script must not be empty")
        self._lines = itertools.cycle(script)

    def __call__(self, context: ResponseContext) -> Reply:
        if context.verbatim is not None:
            return Say(context.verbatim)
        if context.instructions:
            # "Say exactly: \"…\"" is how a client asks for fixed words; a real model says the
            # quoted words, not the request around them.
            quoted = QUOTED.search(context.instructions)
            return Say(quoted.group(1) if quoted else context.instructions)
        return next(self._lines)


def describe_audio(pcm16: bytes) -> str:
    """The default transcriber: says how long the caller spoke, as it cannot know what was said."""
    return f"(caller spoke for {len(pcm16) / BYTES_PER_MS / 1000:.1f} s)"


def queued_transcripts(texts: Iterable[str], fallback: Transcriber = describe_audio) -> Transcriber:
    """A transcriber that returns *texts* in order, one per user turn, then uses *fallback*."""
    queue = deque(texts)
    return lambda pcm16: queue.popleft() if queue else fallback(pcm16)


# ------------------------------------------------------------------------------------------
# Server VAD
# ------------------------------------------------------------------------------------------


class VadEvent(NamedTuple):
    """Speech start or stop, as a byte offset in the session's input audio timeline."""

    kind: Literal["started", "stopped"]
    offset: int


class EnergyVad:
    """StepFun's energy-based server VAD, sans-I/O (ref §5 turn_detection).

    Energy of a 20 ms window = RMS of its int16 samples, ``sqrt(mean(x²))`` (0 for digital
    silence, 23170 for a full-scale sine). A window is *loud* when its energy is above
    ``energy_awakeness_threshold`` (ref: "energy above it = speech start"). Speech starts after
    ``START_WINDOWS`` consecutive loud windows (a click is not speech), at the first of them
    minus ``prefix_padding_ms``; it stops once ``silence_duration_ms`` of consecutive quiet
    windows have been fed, at the end of that silence (as OpenAI's ``audio_end_ms`` does).

    Time is the amount of audio fed, never the wall clock, so results are deterministic.
    """

    WINDOW_BYTES = 20 * BYTES_PER_MS
    START_WINDOWS = 3

    def __init__(
        self,
        *,
        energy_awakeness_threshold: int,
        prefix_padding_ms: int,
        silence_duration_ms: int,
        origin: int = 0,
    ) -> None:
        self.threshold = energy_awakeness_threshold
        self.padding = prefix_padding_ms * BYTES_PER_MS
        self.silence = silence_duration_ms * BYTES_PER_MS
        self.speaking = False
        self.position = origin  # byte offset of the next window
        self._pending = bytearray()
        self._loud_run = 0
        self._run_start = origin
        self._quiet = 0

    @property
    def earliest_start(self) -> int:
        """The earliest offset a speech start not yet reported can have (padding included)."""
        return max(0, self.position - self._loud_run * self.WINDOW_BYTES - self.padding)

    def feed(self, pcm16: bytes) -> list[VadEvent]:
        """Feed appended audio (any length); return the speech starts/stops it completes."""
        self._pending += pcm16
        whole = len(self._pending) // self.WINDOW_BYTES * self.WINDOW_BYTES
        if not whole:
            return []
        if self.threshold >= 256 and not self._pending[:whole].translate(None, b"\x00\xff"):
            # Every byte 0x00 or 0xFF: every sample is 0, -1, 255 or -256, so every window's
            # energy is at most 256, none is loud. The same result as below, without numpy's
            # per-call cost (silence is what a benchmark's callers send all the time).
            del self._pending[:whole]
            events = []
            for _ in range(whole // self.WINDOW_BYTES):
                if event := self._window(False):
                    events.append(event)
            return events
        samples = np.frombuffer(bytes(self._pending[:whole]), dtype="<i2").astype(np.float64)
        del self._pending[:whole]
        energies = np.sqrt(np.mean(samples.reshape(-1, self.WINDOW_BYTES // 2) ** 2, axis=1))
        events = []
        for energy in energies:
            event = self._window(bool(energy > self.threshold))
            if event:
                events.append(event)
        return events

    def _window(self, loud: bool) -> VadEvent | None:
        start, self.position = self.position, self.position + self.WINDOW_BYTES
        if not self.speaking:
            if not loud:
                self._loud_run = 0
                return None
            if self._loud_run == 0:
                self._run_start = start
            self._loud_run += 1
            if self._loud_run < self.START_WINDOWS:
                return None
            self.speaking, self._quiet = True, 0
            return VadEvent("started", max(0, self._run_start - self.padding))
        self._quiet = 0 if loud else self._quiet + self.WINDOW_BYTES
        if self._quiet < self.silence or self._quiet == 0:
            return None
        self.speaking, self._loud_run = False, 0
        return VadEvent("stopped", self.position)


# ------------------------------------------------------------------------------------------
# Sessions
# ------------------------------------------------------------------------------------------


class ClientEventError(Exception):
    """A client event the service refuses. It becomes an ``error`` event; the session stays
    open (ref §3 ``error``)."""

    def __init__(self, message: str, code: str = CODE_INVALID_PARAM) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


T = TypeVar("T")


def _require(value: Any, kind: type[T] | tuple[type, ...], what: str) -> T:
    """*value* if it has type *kind*, else the real service's "invalid event format"."""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ClientEventError(f"{INVALID_EVENT_FORMAT}: {what}")
    return value


class _Close(NamedTuple):
    code: int
    reason: str


class SessionState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"  # the server decided to close (session expired); nothing more is emitted
    CLOSED = "closed"


class FakeSession:
    """One realtime session (one WebSocket connection) and everything recorded about it.

    For tests: ``received`` (every client event, parsed, in order; a message that is not a
    JSON object as ``{"_unparsed": message}``), ``sent`` (every server event emitted, in wire
    order), ``config`` (the session object), ``conversation`` (items, in order),
    ``truncations`` (``conversation.item.truncate`` events accepted), ``state``,
    ``close_code``.
    """

    def __init__(
        self, server: FakeRealtimeServer, ws: ServerConnection, model: str, index: int
    ) -> None:
        self.server = server
        self.documented = server.shape == "documented"
        self.id = _new_id("sess")
        self.model = model
        self.state = SessionState.OPEN
        self.close_code: int | None = None
        self.received: list[dict[str, Any]] = []
        # Messages that came in binary frames. D-GUIDE's client samples send every event as
        # JSON text (`ws.send(json.dumps(event))`, a text frame); nothing documents a binary
        # frame being refused, so one is taken like text, and counted, so tests can tell.
        self.binary_frames = 0
        self.sent: list[dict[str, Any]] = []
        # (type, time.monotonic() once written) of every event but the deltas, always kept.
        self.sent_at: list[tuple[str, float]] = []
        self.truncations: list[dict[str, Any]] = []
        self.conversation: list[dict[str, Any]] = []
        self.last_user_transcript: str | None = None
        # ref §3 session.created: the documented fields; ref §5: server VAD is off by default.
        self.config: dict[str, Any] = {
            "id": self.id,
            "object": "realtime.session",
            "model": model,
            "modalities": ["text", "audio"],
            "instructions": "",
            "voice": DEFAULT_VOICE,
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "turn_detection": None,
            "max_response_output_tokens": "4096",
        }
        self.audio_produced = False  # ref §2: the voice is locked once audio was produced
        self.response: _Response | None = None
        self._ws = ws
        self._responder = server.responder or ScriptedResponder(server.script)
        self._rng = random.Random(None if server.seed is None else server.seed * 1_000_003 + index)
        # Input audio: the uncommitted buffer and where it starts in the session's timeline.
        self._input = bytearray()
        self._input_start = 0
        self._vad: EnergyVad | None = None
        self._speech_item_id: str | None = None
        self._speech_start = 0
        # (type, JSON text, the event) per emitted event, in order; or the close to perform.
        self._outbox: asyncio.Queue[tuple[str, str, dict[str, Any]] | _Close] = asyncio.Queue()
        self._timers: list[asyncio.TimerHandle] = []
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "session.update": self._on_session_update,
            "input_audio_buffer.append": self._on_append,
            "input_audio_buffer.commit": self._on_commit,
            "input_audio_buffer.clear": self._on_clear,
            "conversation.item.create": self._on_item_create,
            "conversation.item.delete": self._on_item_delete,
            "conversation.item.truncate": self._on_item_truncate,
            "response.create": self._on_response_create,
            "response.cancel": self._on_response_cancel,
        }

    # -- public inspection ------------------------------------------------------------------

    @property
    def instructions(self) -> str:
        return self.config["instructions"]

    @property
    def tools(self) -> list[dict[str, Any]]:
        return self.config.get("tools", [])

    @property
    def input_audio_ms(self) -> int:
        """Milliseconds of input audio appended so far (the VAD's clock)."""
        return (self._input_start + len(self._input)) // BYTES_PER_MS

    @property
    def buffered_ms(self) -> int:
        """Milliseconds of uncommitted input audio the server holds."""
        return len(self._input) // BYTES_PER_MS

    def sent_events(self, type_: str) -> list[dict[str, Any]]:
        """Server events of one type, in order."""
        return [event for event in self.sent if event["type"] == type_]

    def received_events(self, type_: str) -> list[dict[str, Any]]:
        """Client events of one type, in order."""
        return [event for event in self.received if event.get("type") == type_]

    def drop(self) -> None:
        """Abort the TCP connection without a close frame, as a crashed server would."""
        self._ws.transport.abort()

    # -- connection life --------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes."""
        writer = asyncio.create_task(self._write())
        if self.server.session_max_seconds is not None:
            self._later(self.server.session_max_seconds, self._expire)
        self.emit("session.created", session=self.config)
        if self.model in self.server.models_refused_in_session:
            # An upgrade accepted, then the model refused in the session, as an `error` event in
            # D-REF's documented (wrapped) shape (Server Event 列表/错误事件). Assumption: the code
            # and message; StepFun documents neither for this case.
            self.emit(
                "error",
                error={
                    "type": "invalid_request_error",
                    "code": "model_not_found",
                    "message": f"model {self.model} not found or no permission",
                    "event_id": None,
                },
            )
        try:
            async for message in self._ws:
                self._receive(message)
        except ConnectionClosed:
            pass
        finally:
            self.state = SessionState.CLOSED
            self.close_code = self._ws.close_code
            if self.response:
                self.response.abandon()
            for timer in self._timers:
                timer.cancel()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            self.server.notify()

    async def _write(self) -> None:
        """The only writer to the socket: sends emitted events in order."""
        try:
            while True:
                item = await self._outbox.get()
                if isinstance(item, _Close):
                    await self._ws.close(item.code, item.reason)
                    return
                type_, text, event = item
                if type_ == "response.audio.delta" and (trace := self.server.audio_trace):
                    trace(self, "out", _decoded_length(event["delta"]))
                await self._ws.send(text)
                if not type_.endswith(".delta"):  # cheap enough to keep even in long benches
                    self.sent_at.append((type_, time.monotonic()))
        except ConnectionClosed:
            pass

    def _expire(self) -> None:
        # ref §7: sessions end at 30 minutes. Assumption: the server closes normally (1000) after
        # sending what it had queued; the reference does not say how the end is signalled.
        self.state = SessionState.CLOSING
        if self.response:
            self.response.abandon()
        self._outbox.put_nowait(_Close(1000, "session reached its maximum duration"))

    def _later(self, delay: float, callback: Callable[[], None]) -> None:
        self._timers.append(asyncio.get_running_loop().call_later(delay, callback))

    # -- events out ---------------------------------------------------------------------------

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        """Queue one server event (ref §3: every server event has an ``event_id``)."""
        event = {"event_id": _new_id("event"), "type": type_, **copy.deepcopy(fields)}
        if self.state is SessionState.OPEN:
            self._outbox.put_nowait((type_, json.dumps(event), event))
            if self.server.record_events:
                self.sent.append(event)
            self.server.notify()
        return event

    def _error(self, error: ClientEventError, event_id: Any) -> None:
        event_id = event_id if isinstance(event_id, str) else None
        if self.documented:
            if error.code == CODE_INVALID_VALUE:
                # documented shape, D-GUIDE 错误处理: an unknown event type is answered by a bare
                # object (no `error` wrapper, the error's type as the event's type).
                self._emit_bare(
                    type="invalid_request_error",
                    code=error.code,
                    message=error.message,
                    param="type",
                    event_id=event_id,
                )
                return
            # documented shape, D-REF Server Event 列表/错误事件: wrapped, no `param`.
            self.emit(
                "error",
                error={
                    "type": "invalid_request_error",
                    "code": error.code,
                    "message": error.message,
                    "event_id": event_id,
                },
            )
            return
        # ref §3 error shape; `event_id` echoes the offending client event's id (ref §2).
        self.emit(
            "error",
            error={
                "type": "invalid_request_error",
                "code": error.code,
                "message": error.message,
                "param": None,
                "event_id": event_id,
            },
        )

    def _emit_bare(self, **event: Any) -> None:
        """Queue an event exactly as given (no event_id added): a documented sample's shape."""
        if self.state is SessionState.OPEN:
            self._outbox.put_nowait((event["type"], json.dumps(event), event))
            if self.server.record_events:
                self.sent.append(event)
            self.server.notify()

    # -- events in ----------------------------------------------------------------------------

    def _receive(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self.binary_frames += 1
        event: Any = None
        with contextlib.suppress(ValueError):  # UnicodeDecodeError is a ValueError
            event = json.loads(message)
        if self.server.record_events:
            recorded = event if isinstance(event, dict) else {"_unparsed": message}
            self.received.append(recorded)
        self.server.notify()
        event_id = event.get("event_id") if isinstance(event, dict) else None
        try:
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise ClientEventError(f"{INVALID_EVENT_FORMAT}: not a JSON object with a type")
            handler = self._handlers.get(event["type"])
            if handler is None:
                # ref §7: unknown event types are refused with `invalid_value`.
                raise ClientEventError(f"unknown event type: {event['type']}", CODE_INVALID_VALUE)
            handler(event)
        except ClientEventError as error:
            self._error(error, event_id)

    # session.update (ref §2, §5) ------------------------------------------------------------

    def _on_session_update(self, event: dict[str, Any]) -> None:
        patch = dict(_require(event.get("session"), dict, "session must be an object"))
        for key in ("id", "object", "model"):
            patch.pop(key, None)
        # Assumption: an update with one invalid field is refused as a whole.
        for key in ("input_audio_format", "output_audio_format"):
            if key in patch and patch[key] != "pcm16":
                raise ClientEventError(f"{key} must be pcm16, the only supported format")
        if "modalities" in patch:
            patch["modalities"] = _valid_modalities(patch["modalities"])
        if "instructions" in patch:
            _require(patch["instructions"], str, "instructions must be a string")
        if "voice" in patch:
            voice = _require(patch["voice"], str, "voice must be a string")
            if voice != self.config["voice"] and self.audio_produced:
                raise ClientEventError("voice cannot be changed after audio was produced")
            if self.server.voices is not None and voice not in self.server.voices:
                # ref §5: voices are per model and account (cloned ids); an unknown one is a
                # bad parameter. Assumption: the message names it (the reference has no sample).
                raise ClientEventError(f"voice not found: {voice}")
        if "turn_detection" in patch:
            patch["turn_detection"] = _valid_turn_detection(patch["turn_detection"])
        if "tools" in patch:
            patch["tools"] = _valid_tools(patch["tools"])
        if "tool_choice" in patch and patch["tool_choice"] not in ("auto", "required", "none"):
            # ref §5: string tool_choice only; the object form → "invalid event format".
            raise ClientEventError(f"{INVALID_EVENT_FORMAT}: tool_choice must be a string")
        vad_changed = (
            "turn_detection" in patch and patch["turn_detection"] != self.config["turn_detection"]
        )
        self.config.update(patch)
        if vad_changed:
            self._restart_vad()
        # documented shape, D-REF Server Event 列表/更新 session 响应: the sample of the update's
        # answer is labelled `session.created` (the heading says session.updated); a client
        # must take either as the ack.
        ack = "session.created" if self.documented else "session.updated"
        self.emit(ack, session=self.config)

    def _restart_vad(self) -> None:
        detection = self.config["turn_detection"]
        self._speech_item_id = None
        self._vad = (
            EnergyVad(
                energy_awakeness_threshold=detection["energy_awakeness_threshold"],
                prefix_padding_ms=detection["prefix_padding_ms"],
                silence_duration_ms=detection["silence_duration_ms"],
                origin=self._input_start + len(self._input),
            )
            if detection
            else None
        )

    # input audio buffer (ref §2, §3) ---------------------------------------------------------

    def _on_append(self, event: dict[str, Any]) -> None:
        # ref §2: no ack. With server VAD the appended audio drives turn detection.
        audio = _require(event.get("audio"), str, "audio must be a base64 string")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except binascii.Error:
            raise ClientEventError("audio is not valid base64") from None
        self._input += pcm
        if trace := self.server.audio_trace:
            trace(self, "in", len(pcm))
        if not self._vad:
            return
        for vad_event in self._vad.feed(pcm):
            if vad_event.kind == "started":
                self._on_speech_started(vad_event.offset)
            else:
                self._on_speech_stopped(vad_event.offset)
        if not self._vad.speaking:
            # Between turns only the audio a coming speech start can reach back to is needed;
            # dropping the rest keeps a long silent call from growing the buffer without end.
            drop = self._vad.earliest_start - self._input_start
            if drop > 0:
                del self._input[:drop]
                self._input_start += drop

    def _on_speech_started(self, offset: int) -> None:
        # The padded start cannot reach back into audio already committed or cleared.
        self._speech_start = max(offset, self._input_start)
        self._speech_item_id = _new_id("item")
        self.emit(
            "input_audio_buffer.speech_started",
            audio_start_ms=self._speech_start // BYTES_PER_MS,
            item_id=self._speech_item_id,
        )

    def _on_speech_stopped(self, offset: int) -> None:
        item_id = self._speech_item_id or _new_id("item")
        self._speech_item_id = None
        self.emit(
            "input_audio_buffer.speech_stopped",
            audio_end_ms=offset // BYTES_PER_MS,
            item_id=item_id,
        )
        self._commit(item_id, self._speech_start, offset)
        # Assumption: a turn that ends while a response is still active (the client did not
        # cancel on speech_started) gets no new response: the real service has no documented
        # interrupt_response (ref §6) and refuses a second active response (ref §2).
        if self.response is None:
            self._start_response("vad", {})

    def _on_commit(self, event: dict[str, Any]) -> None:
        if self.config["turn_detection"]:
            raise ClientEventError("commit when server vad", CODE_INVALID_STATE)  # ref §2
        if not self._input:
            raise ClientEventError("input audio buffer is empty", CODE_INVALID_STATE)  # ref §2
        end = self._input_start + len(self._input)
        self._commit(_new_id("item"), self._input_start, end)

    def _commit(self, item_id: str, start: int, end: int) -> None:
        """Turn input audio [start, end) into a user item; drop the buffer up to *end*."""
        audio = bytes(self._input[start - self._input_start : end - self._input_start])
        del self._input[: end - self._input_start]
        self._input_start = end
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        previous = self._add_item(item)
        self.emit("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        self._announce(item, previous)
        # ref §3: user ASR runs without any configuration and its result arrives asynchronously,
        # before or after the response. The responder sees it at once (a real model heard it).
        transcript = self.server.transcriber(audio)
        self.last_user_transcript = transcript

        def completed() -> None:
            item["content"][0]["transcript"] = transcript
            self.emit(
                "conversation.item.input_audio_transcription.completed",
                item_id=item_id,
                content_index=0,
                transcript=transcript,
            )

        self._later(self.server.transcript_delay, completed)

    def _on_clear(self, event: dict[str, Any]) -> None:
        self._input_start += len(self._input)
        self._input.clear()
        if self._vad:
            self._restart_vad()  # cleared speech must not produce a speech_stopped later
        self.emit("input_audio_buffer.cleared")

    # conversation items (ref §2, §3) -----------------------------------------------------------

    def _on_item_create(self, event: dict[str, Any]) -> None:
        item = _valid_item(_require(event.get("item"), dict, "item must be an object"))
        previous = event.get("previous_item_id")
        if previous is not None and self._index_of(previous) is None:
            raise ClientEventError(
                f"previous_item_id {previous} does not exist", CODE_INVALID_VALUE
            )
        # ref §2: the server assigns its own item id, whatever the client sent.
        item["id"] = _new_id("item")
        if item["type"] == "message" and item["role"] == "user":
            texts = [part["text"] for part in item["content"] if "text" in part]
            self.last_user_transcript = " ".join(texts) or self.last_user_transcript
        self._announce(item, self._add_item(item, after=previous))

    def _on_item_delete(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        index = self._index_of(item_id)
        if index is None:
            raise ClientEventError(f"item {item_id} does not exist", CODE_INVALID_VALUE)
        del self.conversation[index]
        self.emit("conversation.item.deleted", item_id=item_id)

    def _on_item_truncate(self, event: dict[str, Any]) -> None:
        # ref §2: undocumented for StepFun, effect unknown. By default it is accepted, recorded and
        # acknowledged (the SDK declares `conversation.item.truncated`); `truncate_error=True`
        # makes it refused instead, the other plausible real behaviour.
        if self.server.truncate_error:
            raise ClientEventError(
                "unknown event type: conversation.item.truncate", CODE_INVALID_VALUE
            )
        fields = {key: event.get(key) for key in ("item_id", "content_index", "audio_end_ms")}
        self.truncations.append(fields)
        self.emit("conversation.item.truncated", **fields)

    def _index_of(self, item_id: Any) -> int | None:
        return next((i for i, it in enumerate(self.conversation) if it["id"] == item_id), None)

    def _add_item(self, item: dict[str, Any], after: str | None = None) -> str | None:
        """Insert *item* (at the end, or after item *after*); return the previous item's id."""
        index = len(self.conversation) if after is None else self._index_of(after) + 1
        previous = self.conversation[index - 1]["id"] if index else None
        self.conversation.insert(index, item)
        return previous

    def _announce(self, item: dict[str, Any], previous: str | None) -> None:
        self.emit("conversation.item.created", previous_item_id=previous, item=item)

    # responses (ref §2, §3) ---------------------------------------------------------------------

    def _on_response_create(self, event: dict[str, Any]) -> None:
        request = _require(event.get("response", {}), dict, "response must be an object")
        # D-GUIDE 开发技巧/实现开场白 sends instructions nested as `response.create`'s `session`;
        # taken as the session's instructions for this response.
        nested = _require(event.get("session", {}), dict, "session must be an object")
        if nested.get("instructions") is not None:
            _require(nested["instructions"], str, "session.instructions must be a string")
            request = {**request, "_session_instructions": nested["instructions"]}
        if self.response is not None:
            raise ClientEventError("ongoing response already exists", CODE_INVALID_STATE)
        if "modalities" in request:
            _valid_modalities(request["modalities"])
        if request.get("instructions") is not None:
            _require(request["instructions"], str, "response.instructions must be a string")
        self._start_response("response.create", request)

    def _on_response_cancel(self, event: dict[str, Any]) -> None:
        if self.response is None:
            # ref §2: the real error text and type.
            raise ClientEventError("no ongoing response to cancel", CODE_INVALID_STATE)
        self.response.cancel()

    def _start_response(self, trigger: Literal["vad", "response.create"], request: dict) -> None:
        modalities = request.get("modalities") or self.config["modalities"]
        session = copy.deepcopy(self.config)
        if "_session_instructions" in request:
            session["instructions"] = request["_session_instructions"]
        # documented shape: StepFun documents no per-response `response.instructions` (D-REF
        # Client Event 列表/推理提交 shows a bare response.create), so they have no effect.
        instructions = None if self.documented else request.get("instructions")
        context = ResponseContext(
            trigger=trigger,
            instructions=instructions,
            last_user_transcript=self.last_user_transcript,
            session=session,
            conversation=copy.deepcopy(self.conversation),
            session_id=self.id,
        )
        self.response = _Response(self, audio="audio" in modalities)
        self.response.start(context)

    def _response_finished(self, response: _Response) -> None:
        if self.response is response:
            self.response = None

    def _next_chunk_samples(self) -> int:
        """A deliberately irregular delta size: real deltas are not 20 ms frame-aligned."""
        low, high = self.server.delta_ms
        samples = self._rng.randint(low * SAMPLE_RATE // 1000, high * SAMPLE_RATE // 1000)
        return samples + 7 if samples % 480 == 0 else samples


# documented shape: the position fields each D-REF sample carries (Server Event 列表, the
# section named on each line). Events not listed carry all four, as their samples do.
DOCUMENTED_FIELDS = {
    "response.audio.delta": ("item_id",),  # 音频内容流式返回
    "response.audio_transcript.delta": ("item_id", "output_index"),  # 音频内容文字流返回
    "response.audio.done": ("response_id", "item_id"),  # 音频内容流式结束
    "response.audio_transcript.done": ("response_id", "item_id", "content_index"),  # 文字流结束
}


class _Response:
    """One response: its output items, the task that streams them, and how it ends.

    All events are emitted synchronously between the task's await points (responder, speech
    synthesis, pacing), so :meth:`cancel` is atomic: nothing of this response follows it
    except the closing events it emits itself.
    """

    def __init__(self, session: FakeSession, audio: bool) -> None:
        self.id = _new_id("resp")
        self.session = session
        self.audio = audio
        self.status = "in_progress"
        self.output: list[dict[str, Any]] = []
        self._message: dict[str, Any] | None = None  # the message item being streamed
        self._spoken = ""  # its transcript so far
        self._task: asyncio.Task[None] | None = None

    def resource(self, **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "realtime.response",
            "status": self.status,
            "status_details": None,
            "output": self.output,
            **extra,
        }

    def start(self, context: ResponseContext) -> None:
        self.session.emit("response.created", response=self.resource())
        self._task = asyncio.create_task(self._run(context))

    def cancel(self) -> None:
        """ref §2 response.cancel: audio stops at once; the response ends ``cancelled``.

        Assumption: no ``response.cancelled`` event (named in the docs, never observed, ref §3).
        """
        if self._task:
            self._task.cancel()
        self._finish("cancelled", {"type": "cancelled", "reason": "client_cancelled"})

    def abandon(self) -> None:
        """Stop streaming without emitting anything (the connection is gone)."""
        if self._task:
            self._task.cancel()
        self.session._response_finished(self)

    async def _run(self, context: ResponseContext) -> None:
        try:
            reply = self.session._responder(context)
            if inspect.isawaitable(reply):
                reply = await reply
            if isinstance(reply, str):
                reply = Say(reply)
            text = reply.say if isinstance(reply, CallTool) else reply.text
            if text or isinstance(reply, Say):
                await self._speak(text)
            if isinstance(reply, CallTool):
                self._call_tool(reply)
            self._finish("completed")
        except Exception as exc:
            logger.exception("fake model: responder failed")
            self._finish("failed", {"type": "failed", "error": {"message": repr(exc)}})

    # message items (ref §3 response flow) ------------------------------------------------------

    async def _speak(self, text: str) -> None:
        item = {
            "id": _new_id("item"),
            "object": "realtime.item",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        self._open_item(item)
        self._message, self._spoken = item, ""
        self.session.emit(
            "response.content_part.added", **self._part_fields(item), part=self._part()
        )
        if not self.audio:
            # ref §5 modalities ["text"]: text deltas instead of audio and its transcript.
            for word in _words(text):
                self._say("response.text.delta", item, word)
            self._close_message("completed")
            return
        pcm = await asyncio.to_thread(synthesize, text, SAMPLE_RATE)
        pacer = _Pacer(self.session.server.speed, self.session.server.lead_ms / 1000)
        offset = 0
        while offset < len(pcm):
            chunk = pcm[offset : offset + 2 * self.session._next_chunk_samples()]
            offset += len(chunk)
            # The transcript runs alongside the audio, cut at word boundaries.
            cut = (
                len(text) if offset >= len(pcm) else _word_end(text, len(text) * offset // len(pcm))
            )
            if cut > len(self._spoken):
                self._say("response.audio_transcript.delta", item, text[len(self._spoken) : cut])
            self.session.emit(
                "response.audio.delta",
                **self._fields("response.audio.delta", item),
                delta=base64.b64encode(chunk).decode("ascii"),
            )
            self.session.audio_produced = True
            await pacer.wait(len(chunk) / BYTES_PER_MS / 1000)
        if len(self._spoken) < len(text):  # text with no audio (e.g. punctuation only)
            self._say("response.audio_transcript.delta", item, text[len(self._spoken) :])
        self._close_message("completed")

    def _say(self, type_: str, item: dict[str, Any], delta: str) -> None:
        self._spoken += delta
        self.session.emit(type_, **self._fields(type_, item), delta=delta)

    def _part(self) -> dict[str, Any]:
        if self.audio:
            return {"type": "audio", "transcript": self._spoken}
        return {"type": "text", "text": self._spoken}

    def _part_fields(self, item: dict[str, Any]) -> dict[str, Any]:
        return {
            "response_id": self.id,
            "item_id": item["id"],
            "output_index": self.output.index(item),
            "content_index": 0,
        }

    def _fields(self, type_: str, item: dict[str, Any]) -> dict[str, Any]:
        fields = self._part_fields(item)
        if self.session.documented and type_ in DOCUMENTED_FIELDS:
            return {key: fields[key] for key in DOCUMENTED_FIELDS[type_]}
        return fields

    def _close_message(self, status: str) -> None:
        """The closing events of the streaming message; ref §3: audio.done also on cancel."""
        item, self._message = self._message, None
        if item is None:
            return
        fields = self._part_fields(item)
        if self.audio:
            self.session.emit("response.audio.done", **self._fields("response.audio.done", item))
            self.session.emit(
                "response.audio_transcript.done",
                **self._fields("response.audio_transcript.done", item),
                transcript=self._spoken,
            )
        else:
            self.session.emit("response.text.done", **fields, text=self._spoken)
        self.session.emit("response.content_part.done", **fields, part=self._part())
        item["status"] = status
        item["content"] = [self._part()]
        self._close_item(item)

    # function calls (ref §5 tools) ---------------------------------------------------------------

    def _call_tool(self, call: CallTool) -> None:
        arguments = call.arguments_json
        item = {
            "id": _new_id("item"),
            "object": "realtime.item",
            "type": "function_call",
            "status": "incomplete",
            "name": call.name,
            "call_id": _new_id("call"),
            "arguments": "",
        }
        if self.session.documented:
            self._call_tool_documented(item, arguments)
            return
        self._open_item(item)
        fields = {
            "response_id": self.id,
            "item_id": item["id"],
            "output_index": self.output.index(item),
            "call_id": item["call_id"],
            "name": call.name,
        }
        # ref §3: the docs carry the partial arguments in `arguments` (not OpenAI's `delta`).
        for start in range(0, len(arguments), 16):
            self.session.emit(
                "response.function_call_arguments.delta",
                **fields,
                arguments=arguments[start : start + 16],
            )
        self.session.emit("response.function_call_arguments.done", **fields, arguments=arguments)
        item["status"], item["arguments"] = "completed", arguments
        self._close_item(item)

    def _call_tool_documented(self, item: dict[str, Any], arguments: str) -> None:
        """documented shape, D-GUIDE 自定义 Tool Call/函数调用流程: the call is announced by
        `conversation.item.created` (D-REF says output_item.added carries messages only), its
        arguments stream as `{type, call_id, arguments, name}` (no response_id, no item_id), and
        the finished call is in response.done's output (完整示例/2. 用户请求与函数调用)."""
        self.output.append(item)
        announced = {k: item[k] for k in ("id", "type", "status", "call_id", "name", "object")}
        self.session._add_item(item)
        self.session.emit("conversation.item.created", item=announced)
        if self.session.server.function_call_events:
            fields = {"call_id": item["call_id"], "name": item["name"]}
            for start in range(0, len(arguments), 16):
                self.session._emit_bare(
                    type="response.function_call_arguments.delta",
                    **fields,
                    arguments=arguments[start : start + 16],
                )
            self.session._emit_bare(
                type="response.function_call_arguments.done", **fields, arguments=arguments
            )
        item["status"], item["arguments"] = "completed", arguments

    # shared by both item kinds -------------------------------------------------------------------

    def _open_item(self, item: dict[str, Any]) -> None:
        self.output.append(item)
        self.session.emit(
            "response.output_item.added",
            response_id=self.id,
            output_index=self.output.index(item),
            item=item,
        )
        self.session._announce(item, self.session._add_item(item))

    def _close_item(self, item: dict[str, Any]) -> None:
        self.session.emit(
            "response.output_item.done",
            response_id=self.id,
            output_index=self.output.index(item),
            item=item,
        )

    def _finish(self, status: str, details: dict[str, Any] | None = None) -> None:
        if self.status != "in_progress":
            return
        self._close_message("incomplete")
        self.status = status
        calls = [item for item in self.output if item["type"] == "function_call"]
        if self.session.documented and calls:
            # documented shape, D-GUIDE 自定义 Tool Call/完整示例/2: the response.done of a tool
            # call has only `output`, the call as {type, name, call_id, arguments}; no id.
            output = [
                {k: item[k] for k in ("type", "name", "call_id", "arguments")}
                if item["type"] == "function_call"
                else item
                for item in self.output
            ]
            self.session.emit("response.done", response={"output": output})
        else:
            self.session.emit("response.done", response=self.resource(status_details=details))
        if self.session.documented:
            # documented shape, D-GUIDE 文本输入与输出 (the server events, in order): after
            # response.done comes `rate_limits.updated`, an event no sample shows. Assumption:
            # OpenAI beta's fields.
            self.session.emit(
                "rate_limits.updated",
                rate_limits=[{"name": "requests", "limit": 1000, "remaining": 999}],
            )
        self.session._response_finished(self)


class _Pacer:
    """Paces audio at *speed* × real time (None: as fast as possible), from the first delta;
    the first *lead* seconds of audio go out at once."""

    def __init__(self, speed: float | None, lead: float = 0.0) -> None:
        self.speed = speed
        self.start = asyncio.get_running_loop().time()
        self.audio_seconds = -lead

    async def wait(self, seconds_of_audio: float) -> None:
        self.audio_seconds += seconds_of_audio
        if self.speed is None:
            await asyncio.sleep(0)  # still let the client's cancel in between deltas
            return
        due = self.start + max(0.0, self.audio_seconds) / self.speed
        await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))


def _decoded_length(b64: str) -> int:
    """Bytes in a base64 string, without decoding it."""
    return len(b64) // 4 * 3 - b64.endswith("=") - b64.endswith("==")


# Chinese and Japanese are written without spaces: their transcript deltas cannot wait for a
# space, or a whole sentence would come as one delta with the first audio. Assumption (no
# documented sample is in Chinese): a delta may end after any such character, as the
# documented English sample ends mid-word ("Hello, how can I a", D-REF).
_UNSPACED = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _boundary(text: str, i: int) -> bool:
    """True when a delta may end before ``text[i]``: at a space, or beside a character of a
    script written without spaces."""
    return (
        i >= len(text)
        or text[i] == " "
        or bool(_UNSPACED.match(text[i]))
        or (i > 0 and bool(_UNSPACED.match(text[i - 1])))
    )


def _words(text: str) -> list[str]:
    """*text* split into word-sized deltas (a Chinese character each) that join back to it
    exactly."""
    cuts = [i for i in range(1, len(text) + 1) if _boundary(text, i)]
    return [text[a:b] for a, b in zip([0, *cuts], cuts, strict=False) if text[a:b]]


def _word_end(text: str, position: int) -> int:
    """The end of the word at *position* (a cut there does not split a word)."""
    while not _boundary(text, position):
        position += 1
    return position


# ------------------------------------------------------------------------------------------
# Validation of client payloads (ref §2, §5)
# ------------------------------------------------------------------------------------------


def _valid_modalities(value: Any) -> list[str]:
    # ref §5: "fixed to ["text","audio"]"; ["text"] was accepted in a probe.
    modalities = _require(value, list, "modalities must be a list")
    if sorted(modalities) not in (["audio", "text"], ["text"]):
        raise ClientEventError('modalities must be ["text", "audio"] or ["text"]')
    return list(modalities)


def _valid_turn_detection(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    detection = _require(value, dict, "turn_detection must be an object or null")
    if detection.get("type") != "server_vad":
        raise ClientEventError('turn_detection.type must be "server_vad"')  # ref §5: only type
    merged = {**VAD_DEFAULTS, **detection}
    for key in VAD_DEFAULTS:
        _require(merged[key], int, f"turn_detection.{key} must be an integer")
        if merged[key] < 0:
            raise ClientEventError(f"turn_detection.{key} must not be negative")
    low, high = VAD_THRESHOLD_RANGE
    if not low <= merged["energy_awakeness_threshold"] <= high:
        raise ClientEventError(f"turn_detection.energy_awakeness_threshold must be {low}-{high}")
    return merged


def _valid_tools(value: Any) -> list[dict[str, Any]]:
    """ref §5: tools are nested ``{"type", "function": {...}}``; a flat OpenAI-style tool is a
    malformed event for StepFun."""
    tools = _require(value, list, "tools must be a list")
    for index, tool in enumerate(tools):
        _require(tool, dict, f"tools[{index}] must be an object")
        if tool.get("type") not in ("function", "web_search", "retrieval"):
            raise ClientEventError(f"{INVALID_EVENT_FORMAT}: tools[{index}].type is unsupported")
        function = _require(
            tool.get("function"), dict, f'tools[{index}] must be {{"type", "function": {{...}}}}'
        )
        if tool["type"] == "function":
            _require(function.get("name"), str, f"tools[{index}].function.name is required")
    return copy.deepcopy(tools)


def _valid_item(item: dict[str, Any]) -> dict[str, Any]:
    """A client item as the server stores it (ref §2 conversation.item.create)."""
    item = copy.deepcopy(item)
    if item.get("type") == "function_call_output":
        _require(item.get("call_id"), str, "item.call_id is required")
        _require(item.get("output"), str, "item.output must be a string")
        return {**item, "object": "realtime.item"}
    if item.get("type") != "message":
        raise ClientEventError(f"unsupported item type: {item.get('type')}", CODE_INVALID_VALUE)
    role = item.get("role")
    if role not in ("user", "assistant", "system"):
        raise ClientEventError(f"unsupported item role: {role}", CODE_INVALID_VALUE)
    content = _require(item.get("content"), list, "item.content must be a list")
    allowed = {
        "user": ("input_text", "text", "input_audio"),
        "system": ("input_text", "text"),
        # ref §2: assistant *audio* cannot be injected; text history can (3P practice).
        "assistant": ("text", "input_text"),
    }[role]
    for part in content:
        kind = _require(part, dict, "item.content entries must be objects").get("type")
        if kind not in allowed:
            raise ClientEventError(f"content type {kind} is not allowed for role {role}")
        field = "audio" if kind == "input_audio" else "text"
        _require(part.get(field), str, f"{kind} content needs a string {field}")
    return {**item, "object": "realtime.item", "status": "completed"}


# ------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HandshakeRecord:
    """One WebSocket upgrade attempt: its path (with query) and the HTTP status answered."""

    path: str
    status: int


class FakeRealtimeServer:
    """A fake StepFun realtime server on 127.0.0.1, for tests, benchmarks and the demo.

    Use ``async with FakeRealtimeServer() as fake:`` (or :meth:`start`/:meth:`close`) and
    connect to :attr:`url` with ``Authorization: Bearer <api_key>``.

    Options (all keyword-only; they are plain attributes and may be changed between sessions):

    - *api_key*: the Bearer key required (401 otherwise); None accepts any non-empty key.
    - *models*: model names accepted in ``?model=`` (400 otherwise).
    - *responder*: decides each reply from a :class:`ResponseContext`; returns text, a
      :class:`Say` or a :class:`CallTool` (or an awaitable of one). Default: a
      :class:`ScriptedResponder` over *script*, one per session.
    - *transcriber*: ``pcm16_24k_bytes -> str`` for each committed user turn.
    - *speed*: audio deltas are sent at this multiple of real time; None = as fast as possible.
    - *lead_ms*: with *speed*, the first this many ms of each response's audio are sent at once
      (a streaming model's head start over playback); the rest is paced.
    - *delta_ms*: (min, max) duration of an audio delta; sizes are random in that range and
      never a multiple of 20 ms.
    - *transcript_delay*: seconds before the user transcription arrives.
    - *handshake_delay*: seconds every upgrade waits (slow connects, for pre-warm benchmarks).
    - *max_message_bytes*: largest client message; larger closes the socket (1009).
    - *session_max_seconds*: the server closes a session this long after it opened (None: never).
    - *truncate_error*: refuse ``conversation.item.truncate`` with an error instead of acking it.
    - *voices*: the voice ids ``session.update`` accepts (an ``invalid_param`` error otherwise);
      None accepts any.
    - *record_events*: keep ``received``/``sent`` per session (turn off for long benchmarks).
    - *audio_trace*: called as ``audio_trace(session, "in", n)`` when an append of *n* pcm16
      bytes is accepted, and ``audio_trace(session, "out", n)`` just before an audio delta of
      *n* bytes is written to the socket (latency benchmarks read the clock in it). None: off.
    - *seed*: makes delta sizes reproducible (None: random).
    - *shape*: ``"full"`` (every field of the reference's tables) or ``"documented"`` (events
      exactly as StepFun's samples show them; see the module docstring).
    - *function_call_events*: in the documented shape, send ``function_call_arguments.delta``
      and ``.done`` (D-GUIDE 函数调用流程); False: the call is only in ``response.done``'s
      output, as D-GUIDE's full example (完整示例) shows it.
    - *models_refused_in_session*: model names whose upgrade is accepted but whose session
      then answers an ``error`` (``model_not_found``) right after ``session.created``.
    """

    def __init__(
        self,
        *,
        api_key: str | None = "test-key",
        models: Iterable[str] = DEFAULT_MODELS,
        responder: Responder | None = None,
        script: Sequence[Reply] = DEFAULT_SCRIPT,
        transcriber: Transcriber = describe_audio,
        speed: float | None = 5.0,
        lead_ms: float = 0.0,
        delta_ms: tuple[int, int] = (40, 130),
        transcript_delay: float = 0.0,
        handshake_delay: float = 0.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        session_max_seconds: float | None = SESSION_MAX_SECONDS,
        truncate_error: bool = False,
        voices: Iterable[str] | None = None,
        record_events: bool = True,
        audio_trace: Callable[[FakeSession, str, int], None] | None = None,
        seed: int | None = 0,
        shape: Literal["full", "documented"] = "full",
        function_call_events: bool = True,
        models_refused_in_session: Iterable[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if speed is not None and speed <= 0:
            raise ValueError("speed must be positive or None")
        if lead_ms < 0:
            raise ValueError("lead_ms must not be negative")
        if not 0 < delta_ms[0] <= delta_ms[1]:
            raise ValueError("delta_ms must be (min, max) with 0 < min <= max")
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}")
        self.api_key = api_key
        self.models = frozenset(models)
        self.responder = responder
        self.script = tuple(script)
        self.transcriber = transcriber
        self.speed = speed
        self.lead_ms = lead_ms
        self.delta_ms = delta_ms
        self.transcript_delay = transcript_delay
        self.handshake_delay = handshake_delay
        self.max_message_bytes = max_message_bytes
        self.session_max_seconds = session_max_seconds
        self.truncate_error = truncate_error
        self.voices = None if voices is None else frozenset(voices)
        self.record_events = record_events
        self.audio_trace = audio_trace
        self.seed = seed
        self.shape = shape
        self.function_call_events = function_call_events
        self.models_refused_in_session = frozenset(models_refused_in_session)
        self.host = host
        self.port = port
        self.sessions: list[FakeSession] = []
        self.handshakes: list[HandshakeRecord] = []
        self._forced_failures: deque[int] = deque()
        self._server: Server | None = None
        self._changed = asyncio.Event()

    # -- life -------------------------------------------------------------------------------

    async def start(self) -> FakeRealtimeServer:
        """Start listening (on an ephemeral port unless *port* was given)."""
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._process_request,
            process_response=self._process_response,
            max_size=self.max_message_bytes,
            open_timeout=None,  # handshake_delay may be long on purpose
            # Client pings are answered (StepFun clients ping every ~20 s, ref §7); the fake does
            # not ping, so a paused test client is never disconnected by it.
            ping_interval=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Close every session (1001, going away) and stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeRealtimeServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:PORT/v1/realtime`` (add ``?model=…`` as with the real service)."""
        return f"ws://{self.host}:{self.port}{PATH}"

    # -- inspection -----------------------------------------------------------------------------

    @property
    def sessions_opened(self) -> int:
        """Sessions ever opened."""
        return len(self.sessions)

    @property
    def sessions_open(self) -> int:
        """Sessions open now (a model session must not outlive its call)."""
        return sum(session.state is not SessionState.CLOSED for session in self.sessions)

    def notify(self) -> None:
        """Wake :meth:`wait_for` callers (called on every event, open and close)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0) -> T:
        """Wait until ``predicate()`` is truthy and return its value.

        It is re-evaluated whenever any session receives or emits an event, opens or closes.
        Raises TimeoutError after *timeout* seconds.
        """
        try:
            async with asyncio.timeout(timeout):
                while not (result := predicate()):
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"fake model: condition not met within {timeout} s") from None
        return result

    # -- faults ---------------------------------------------------------------------------------

    def fail_next_handshakes(self, count: int = 1, status: int = 429) -> None:
        """Refuse the next *count* upgrades with HTTP *status* (e.g. 402, 429, 500, 503)."""
        self._forced_failures.extend([status] * count)

    async def drop_all(self) -> None:
        """Abort every open session's connection, as if the model service crashed."""
        for session in self.sessions:
            if session.state is not SessionState.CLOSED:
                session.drop()
        await self.wait_for(lambda: self.sessions_open == 0)

    # -- handshake (ref §1, §7) ------------------------------------------------------------------

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        if self.handshake_delay:
            await asyncio.sleep(self.handshake_delay)
        status, message = self._check_handshake(request)
        self.handshakes.append(HandshakeRecord(request.path, int(status)))
        if status == http.HTTPStatus.SWITCHING_PROTOCOLS:
            return None
        # ref §7: the documented HTTP errors; the body is JSON as on StepFun's REST API.
        error_type = "invalid_request_error" if status < 500 else "server_error"
        body = json.dumps({"error": {"type": error_type, "code": str(status), "message": message}})
        response = connection.respond(status, body)
        del response.headers["Content-Type"]  # respond() made it text/plain
        response.headers["Content-Type"] = "application/json"
        return response

    def _check_handshake(self, request: Request) -> tuple[int, str]:
        if self._forced_failures:
            status = self._forced_failures.popleft()
            return status, f"forced failure ({http.HTTPStatus(status).phrase})"
        url = urlsplit(request.path)
        if url.path != PATH:
            return 404, f"no such endpoint: {url.path}"
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not key or (self.api_key is not None and key != self.api_key):
            return 401, "invalid API key"
        model = parse_qs(url.query).get("model", [""])[0]
        if model not in self.models:
            return 400, f"model not found or no permission: {model!r}"
        return http.HTTPStatus.SWITCHING_PROTOCOLS, ""

    def _process_response(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> None:
        # ref §1: the real upgrade response carries trace ids that clients should log.
        response.headers["X-Request-Id"] = uuid.uuid4().hex

    async def _handle(self, ws: ServerConnection) -> None:
        model = parse_qs(urlsplit(ws.request.path).query)["model"][0]
        session = FakeSession(self, ws, model, index=len(self.sessions))
        self.sessions.append(session)
        self.notify()
        await session.run()
