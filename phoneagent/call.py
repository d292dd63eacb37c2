"""One phone call's state machine. No I/O.

The ``Call`` takes events — Twilio Media Streams messages, realtime-model events, socket
closures — and returns the actions the shell must perform: send to Twilio, send to the model,
end the call. Every rule of the conversation lives here as a transition, so each is testable
without a socket: playback tracking from marks, barge-in, stale-delta dropping, teardown.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from phoneagent.audio import (
    ULAW_BYTES_PER_MS,
    ULAW_SILENCE,
    CallerToModel,
    ModelToCaller,
    pcm16_ms,
    pcm16_rms,
)
from phoneagent.conversation import replay, say_verbatim, session_config, with_guidance
from phoneagent.handoff import (
    Handoff,
    HangUp,
    Transfer,
    handoff_from_keypad,
    handoff_from_tool,
    sentence_for,
)
from phoneagent.logs import get_logger
from phoneagent.personas import Persona, TransferTarget
from phoneagent.playback import AgentItem, BargeInCandidate, CallStats
from phoneagent.realtime.base import (
    AddTextItem,
    AgentTranscriptDelta,
    AgentTranscriptDone,
    AppendAudio,
    AudioDelta,
    CancelResponse,
    CreateResponse,
    ItemAdded,
    ModelCommand,
    ModelError,
    ModelEvent,
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
from phoneagent.transcript import Turn, cut_turn, transcript_of
from phoneagent.twilio.wire.stream import Dtmf, Mark, Media, Stop, TwilioEvent

log = get_logger(__name__)

# Inbound timestamp gaps up to this long are filled with silence so the model's VAD still sees
# the caller's turn end; Twilio omits silent audio on some calls (twilio reference, section 2).
MAX_GAP_FILL_MS = 2000
# Agent audio goes to Twilio in messages of up to this many 20 ms frames (whatever one model
# delta made, up to 200 ms): a mark per message bounds how far a barge-in must reach back.
FRAMES_PER_MESSAGE = 10
# Keypad digits typed within this much audio of each other reach the model as one entry.
DTMF_GAP_MS = 1200
# Before max_call_seconds runs out, the model is told to wrap up this long in advance.
TIME_LIMIT_WARNING_MS = 30_000
# StepFun ends a session at 30 minutes (reference section 7): a call renews its session before
# that, at a quiet moment.
SESSION_RENEW_SECONDS = 25 * 60
# The caller finished a turn and the model has not started answering this long after: nudge it
# (a VAD turn end has been seen to produce no response, reference section 5).
NUDGE_SECONDS = 2.0
# Limits hold whatever the model does. A response that has sent no audio for this long (stream
# time) is given up on: the model is treated as idle again.
RESPONSE_STALL_MS = 10_000
# The sentence before a handoff (goodbye, transfer announcement) not said this long after it was
# asked for, and not playing: the call is handed on without it.
HANDOFF_SENTENCE_DEADLINE_MS = 8_000


class CallState(enum.Enum):
    ACTIVE = "active"  # caller and agent are talking
    ANNOUNCING = "announcing"  # the agent says the transfer sentence or goodbye; then hand off
    TRANSFERRING = "transferring"  # Twilio was asked to dial a person: its `stop` is expected
    HANGING_UP = "hanging_up"  # Twilio was asked to end the call: its `stop` is expected
    ENDED = "ended"  # both sockets are to be closed; nothing more is sent


class EndReason(enum.Enum):
    CALLER_HUNG_UP = "caller_hung_up"  # Twilio sent `stop`
    AGENT_HUNG_UP = "agent_hung_up"  # the agent said goodbye and ended the call
    TRANSFERRED = "transferred"  # the call went to a person; the stream ended with it
    TWILIO_DISCONNECTED = "twilio_disconnected"  # the media socket closed without `stop`
    MODEL_DISCONNECTED = "model_disconnected"  # the model socket closed under us
    TIME_LIMIT = "time_limit"  # the persona's max_call_seconds ran out; the agent said goodbye
    SERVER_SHUTDOWN = "server_shutdown"  # the instance was stopping (drain time up)
    ERROR = "error"


# What Twilio's `stop` means in each state: only in ACTIVE and ANNOUNCING did the caller hang up.
STOP_MEANS = {
    CallState.TRANSFERRING: EndReason.TRANSFERRED,
    CallState.HANGING_UP: EndReason.AGENT_HUNG_UP,
}


# --- actions the shell performs -----------------------------------------------------------


@dataclass(frozen=True)
class SendMedia:
    payload: bytes  # μ-law 8 kHz: 20 ms frames, up to FRAMES_PER_MESSAGE of them


@dataclass(frozen=True)
class SendMark:
    name: str


@dataclass(frozen=True)
class SendClear:
    pass


@dataclass(frozen=True)
class ToModel:
    command: ModelCommand


@dataclass(frozen=True)
class EndCall:
    reason: EndReason


@dataclass(frozen=True)
class TurnFinished:
    """A turn's text is final (for live transcripts); its end time may still move."""

    turn: dict


@dataclass(frozen=True)
class TransferCall:
    """Ask Twilio to dial ``target`` for this caller; answer with ``Call.on_transfer_result``."""

    target: TransferTarget


@dataclass(frozen=True)
class HangUpCall:
    """Ask Twilio to end the call; answer with ``Call.on_hang_up_result``."""


@dataclass(frozen=True)
class RenewModelSession:
    """Open a new model session and switch to it; answer with ``Call.on_model_reconnected``."""


Action = (
    SendMedia
    | SendMark
    | SendClear
    | ToModel
    | EndCall
    | TurnFinished
    | TransferCall
    | HangUpCall
    | RenewModelSession
)


@dataclass
class Call:
    persona: Persona
    stream_sid: str
    call_sid: str
    clock: Callable[[], float] = time.monotonic
    # A call coming back to the agent (a transfer nobody answered): what was said before, and
    # what the agent should say first instead of the greeting.
    history: tuple[dict, ...] = ()
    opening: str | None = None
    state: CallState = CallState.ACTIVE
    end_reason: EndReason | None = None
    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stats = CallStats(started_at=self.clock())
        self._to_model = CallerToModel()
        self._to_caller = ModelToCaller()
        self._items: dict[str, AgentItem] = {}
        self._caller_turns: dict[str, Turn] = {}
        # Marks sent and not yet echoed, oldest first: name → (item, its ms at the mark, when sent).
        self._pending_marks: OrderedDict[str, tuple[AgentItem, int, float]] = OrderedDict()
        self._last_echo_at: float | None = None
        self._active_response: str | None = None
        # For events without a response_id (StepFun's documented samples): the response each
        # announced item is of, and the latest response started (see _response_of).
        self._item_responses: dict[str, str] = {}
        self._latest_response: str | None = None
        self._seen_tool_calls: set[str] = set()  # call ids, from either place they are listed
        self._discarded_responses: set[str] = set()
        self._current_item: AgentItem | None = None  # the item whose audio is being framed
        self._barge_in: BargeInCandidate | None = None
        self._next_media_ms: int | None = None
        # Handing the call on (ANNOUNCING): what to do once the sentence has been heard.
        self._handoff: Handoff | None = None
        self._handoff_response: str | None = None  # the response saying the sentence
        self._handoff_said = False  # that response is done: all its audio was sent
        self._tool_calls: dict[str, list[ToolCall]] = {}  # by response, handled at its end
        self._after_response: list[Action] = []  # model commands that must wait for it to end
        self._cancelling: set[str] = set()  # cancelled responses whose response.done is due
        self._digits = ""  # keypad digits not yet passed to the model
        self._response_alive_ms = 0  # stream time the active response last started or spoke
        self._announced_at_ms = 0  # stream time the handoff's sentence was asked for
        self._digits_at_ms = 0
        self._hang_up_reason = EndReason.AGENT_HUNG_UP
        self._time_limit_warned = False
        self._session_started = self.clock()
        self._renewing = False
        # Stream time the line went quiet (None: something just happened; the next frame says
        # when). Twilio's timestamps are the clock, so the timeout is deterministic.
        self._quiet_since_ms: int | None = None
        self._silence_prompts = 0  # times the caller was asked if they are still there
        self._awaiting_answer_since: float | None = None  # the caller's turn ended then
        # A response with instructions of its own (a scripted sentence, a nudge) changes the
        # session's instructions; once it is done they go back to the persona's.
        self._instructions = session_config(self.persona).instructions
        self._guided_pending = False  # such a response was asked for and has not started
        self._guided_response: str | None = None  # it started: restore when it is done

    # --- entry points ---------------------------------------------------------------------

    def begin(self) -> list[Action]:
        """The model session is configured and the stream has started: greet the caller (or,
        back from a transfer nobody answered, remind the model of the call and say so)."""
        actions: list[Action] = [ToModel(item) for item in replay(self.history)]
        if self.opening:
            return actions + self._respond(with_guidance(self.persona, self.opening))
        return actions + self._respond(say_verbatim(self.persona, self.persona.greeting))

    def on_transfer_result(self, error: str | None) -> list[Action]:
        """Twilio took the transfer (None), or refused it: then the agent tells the caller."""
        if self.state is not CallState.TRANSFERRING or error is None:
            return []
        log.warning("transfer_failed", error=error)
        self.state = CallState.ACTIVE
        note = f"(The transfer did not go through: {error}. The caller is still with you.)"
        tell = (
            "Tell the caller, briefly and kindly, that you could not connect them right now, "
            "and offer to take a message or help another way."
        )
        return self._when_idle(
            [
                ToModel(AddTextItem("system", note)),
                *self._respond(with_guidance(self.persona, tell)),
            ]
        )

    def on_hang_up_result(self, error: str | None) -> list[Action]:
        """Twilio ended the call, or could not: either way the stream is over. Closing it ends
        the call too (nothing follows `</Connect>` in our TwiML), so no `stop` is awaited."""
        if self.state is not CallState.HANGING_UP:
            return []
        if error is not None:
            log.warning("hang_up_failed", error=error)
        return self._end(self._hang_up_reason)

    def on_twilio(self, event: TwilioEvent) -> list[Action]:
        if self.state is CallState.ENDED:
            return []
        match event:
            case Media():
                return self._on_caller_audio(event)
            case Mark(name):
                return self._on_mark(name)
            case Stop():
                return self._end(self._stop_means())
            case Dtmf(digit):
                return self._on_keypad(digit)
        return []

    def on_model(self, event: ModelEvent) -> list[Action]:
        if self.state is CallState.ENDED:
            return []
        if isinstance(event, (SpeechStarted, SpeechStopped, ResponseStarted, ResponseDone)):
            self._quiet_since_ms = None  # the line is not silent: the silence timeout restarts
        if isinstance(event, (ResponseStarted, AudioDelta)):
            self._response_alive_ms = self._next_media_ms or 0
        match event:
            case AudioDelta():
                return self._on_agent_audio(event)
            case AgentTranscriptDelta(response_id, item_id, text):
                item = self._agent_item(self._response_of(response_id, item_id), item_id)
                if item is not None and not item.turn.interrupted:
                    item.turn.text += text
            case AgentTranscriptDone(response_id, item_id, text):
                item = self._agent_item(self._response_of(response_id, item_id), item_id)
                if item is not None and not item.turn.interrupted:
                    item.turn.text = text
                    return [TurnFinished(item.turn.as_dict())]
            case ItemAdded(response_id, item_id):
                self._item_responses[item_id] = response_id
            case ResponseStarted(response_id):
                self._active_response = self._latest_response = response_id
                if self._guided_pending:
                    self._guided_pending, self._guided_response = False, response_id
                self._awaiting_answer_since = None
                if self.state is CallState.ANNOUNCING and self._handoff_response is None:
                    self._handoff_response = response_id
            case ToolCall(response_id):
                self._note_tool_call(self._response_of(response_id, None), event)
            case ResponseDone(response_id, status, tool_calls):
                response_id = self._response_of(response_id, None)
                for tool_call in tool_calls:  # those function_call_arguments.done did not bring
                    self._note_tool_call(response_id, tool_call)
                return self._on_response_done(response_id, status)
            case SpeechStarted(item_id):
                return self._on_speech_started(item_id)
            case SpeechStopped(item_id):
                turn = self._caller_turn(item_id)
                turn.end_ms = self._now_ms()
                self._awaiting_answer_since = self.clock()
                if self._barge_in is not None and self._barge_in.caller_item_id == item_id:
                    log.info("barge_in_ignored", loud_ms=self._barge_in.loud_ms)
                    self.stats.barge_ins_ignored += 1
                    self._barge_in = None
                    self._awaiting_answer_since = None  # "mhm" asks for no answer
            case UserTranscript(item_id, text):
                turn = self._caller_turn(item_id)
                turn.text = text.strip()
                return [TurnFinished(turn.as_dict())]
            case ModelError(code, message, benign):
                if benign:
                    log.debug("model_error_ignored", code=code, message=message)
                else:
                    log.warning("model_error", code=code, message=message)
        return []

    def on_model_reconnected(self) -> list[Action]:
        """A new model session replaces the one that dropped (or was renewed): it knows nothing
        of this call yet, so it hears the conversation so far, then picks up where it was."""
        if self.state is CallState.ENDED:
            return []
        was_answering = self._active_response is not None
        actions = self._flush_item()  # what the old session generated still plays
        self._active_response, self._cancelling = None, set()
        self._tool_calls.clear()
        self._after_response = []
        # The new session was configured with the persona's own instructions.
        self._guided_pending, self._guided_response = False, None
        self._session_started, self._renewing = self.clock(), False
        actions += [ToModel(item) for item in replay(self.transcript)]
        if self.state is CallState.ANNOUNCING and not self._handoff_said:
            assert self._handoff is not None
            self._handoff_response = None
            sentence = sentence_for(self.persona, self._handoff)
            actions += self._respond(say_verbatim(self.persona, sentence))
        elif was_answering:
            cut = "Your last answer was cut off by a technical problem: finish it briefly."
            actions += self._respond(with_guidance(self.persona, cut))
        return actions

    def on_twilio_closed(self) -> list[Action]:
        if self.state is CallState.ENDED:
            return []
        if self.state in STOP_MEANS:  # Twilio may close without `stop` after our REST update
            return self._end(self._stop_means())
        return self._end(EndReason.TWILIO_DISCONNECTED)

    def _stop_means(self) -> EndReason:
        if self.state is CallState.HANGING_UP:
            return self._hang_up_reason
        return STOP_MEANS.get(self.state, EndReason.CALLER_HUNG_UP)

    def on_drain(self) -> list[Action]:
        """The instance is stopping and its drain time is nearly up: the agent finishes what it
        is saying, says the persona's goodbye, and hangs up (within the handoff deadline)."""
        if self.state is not CallState.ACTIVE:
            return []  # already handing the call on, or over
        log.info("call_drained")
        return self._announce(HangUp(shutdown=True))

    def on_shutdown(self) -> list[Action]:
        """The drain time is up: the call ends now (Twilio then asks `<Connect action>`, which
        another instance answers with the apology and the fallback)."""
        if self.state is CallState.ENDED:
            return []
        return self._end(EndReason.SERVER_SHUTDOWN)

    def on_model_closed(self) -> list[Action]:
        if self.state is CallState.ENDED:
            return []
        return self._end(EndReason.MODEL_DISCONNECTED)

    @property
    def ended(self) -> bool:
        return self.state is CallState.ENDED

    @property
    def transcript(self) -> list[dict]:
        """Turns in the order they started, each with the text the other side heard."""
        return transcript_of(self.turns)

    # --- caller → model -------------------------------------------------------------------

    def _on_caller_audio(self, media: Media) -> list[Action]:
        audio = media.payload
        expected = self._next_media_ms
        if expected is not None and media.timestamp_ms > expected:
            gap_ms = min(media.timestamp_ms - expected, MAX_GAP_FILL_MS)
            audio = bytes([ULAW_SILENCE]) * (gap_ms * ULAW_BYTES_PER_MS) + audio
        self._next_media_ms = media.timestamp_ms + len(media.payload) // ULAW_BYTES_PER_MS
        actions: list[Action] = self._watch_time_limit(media.timestamp_ms)
        actions += self._watch_stalls(media.timestamp_ms)
        actions += self._watch_model()
        actions += self._watch_silence(media.timestamp_ms)
        if self._digits and media.timestamp_ms - self._digits_at_ms >= DTMF_GAP_MS:
            actions += self._pass_digits_to_model()
        if not audio:
            return actions
        pcm = self._to_model.process(audio)
        # The caller's audio always reaches the model, interruption or not.
        actions.append(ToModel(AppendAudio(pcm)))
        if self._barge_in is not None:
            return self._weigh_barge_in(pcm) + actions  # an interruption goes out first
        return actions

    # --- model → caller -------------------------------------------------------------------

    def _response_of(self, response_id: str | None, item_id: str | None) -> str:
        """The response an event is of. StepFun's documented samples leave response_id out of
        audio and transcript deltas, function-call events and a tool call's response.done, so
        an event without one is of its item's response if the item is known (seen before, or
        announced by response.output_item.added), else of the response in progress, else of
        the latest one started (a late event of a cancelled response is then dropped with it).

        This lives here, not in the dialect: the dialect is pure and shared by every session,
        while the Call already tracks the response in progress and the items it played."""
        if response_id:
            return response_id
        if item_id is not None:
            if (item := self._items.get(item_id)) is not None:
                return item.response_id
            if (known := self._item_responses.get(item_id)) is not None:
                return known
        if self._active_response is not None:
            return self._active_response
        if len(self._cancelling) == 1:
            return next(iter(self._cancelling))
        return self._latest_response or ""

    def _note_tool_call(self, response_id: str, tool_call: ToolCall) -> None:
        """Keep a tool call for its response's end, once: it may be listed both by
        function_call_arguments.done and in response.done's output (D-GUIDE 自定义 Tool Call)."""
        if tool_call.call_id in self._seen_tool_calls:
            return
        self._seen_tool_calls.add(tool_call.call_id)
        self._tool_calls.setdefault(response_id, []).append(tool_call)

    def _agent_item(self, response_id: str, item_id: str) -> AgentItem | None:
        """The playback record of an item, created on first sight; None if it was discarded."""
        if response_id in self._discarded_responses:
            return None
        item = self._items.get(item_id)
        if item is None:
            now = self._now_ms()
            turn = Turn(role="agent", item_id=item_id, start_ms=now, end_ms=now)
            self.turns.append(turn)
            item = self._items[item_id] = AgentItem(item_id, response_id, turn)
        return item

    def _on_agent_audio(self, delta: AudioDelta) -> list[Action]:
        if self.state in STOP_MEANS:
            return []  # the call is being handed on: the agent has had its last word
        response_id = self._response_of(delta.response_id, delta.item_id)
        item = self._agent_item(response_id, delta.item_id)
        if item is None:
            return []  # a late delta of a response the caller interrupted
        if self._current_item is not item:
            # A new item starts: whatever the previous one left in the framer belongs to it.
            actions = self._flush_item()
            self._current_item = item
        else:
            actions = []
        actions += self._frames_to_twilio(item, self._to_caller.process(delta.pcm))
        return actions

    def _flush_item(self) -> list[Action]:
        item, self._current_item = self._current_item, None
        if item is None:
            return []
        frames = self._to_caller.flush()
        if self.state in STOP_MEANS:
            return []  # the call is being handed on: the agent has had its last word
        return self._frames_to_twilio(item, frames)

    def _frames_to_twilio(self, item: AgentItem, frames: list[bytes]) -> list[Action]:
        """The frames a model delta made, as few `media` messages as the chunk limit allows,
        each followed by its mark. Messages, not transcoding, are most of the server's work
        (bench/load.py), and Twilio plays any size; how much was heard stays exact because it
        runs on in real time from each mark echo (``_heard_now``)."""
        actions: list[Action] = []
        for start in range(0, len(frames), FRAMES_PER_MESSAGE):
            chunk = b"".join(frames[start : start + FRAMES_PER_MESSAGE])
            item.sent_bytes += len(chunk)
            # Unique (every chunk adds bytes; a short tail may add no whole ms), and it says
            # whose audio it follows: Twilio echoes every pending mark after `clear`, and those
            # echoes must not count as played.
            name = f"{item.item_id}:{item.sent_bytes}"
            self._pending_marks[name] = (item, item.sent_ms, self.clock())
            actions += (SendMedia(chunk), SendMark(name))
        if actions and self.stats.first_audio_at is None:
            self.stats.first_audio_at = self.clock()
        return actions

    def _on_mark(self, name: str) -> list[Action]:
        if name not in self._pending_marks:
            return []  # an echo of a mark written off by `clear`: it proves nothing was played
        # Twilio plays in order, so every mark sent before this one has played too.
        while self._pending_marks:
            done, (item, played_ms, _) = self._pending_marks.popitem(last=False)
            item.played_ms = played_ms
            if done == name:
                break
        item.turn.end_ms = self._now_ms()
        self._last_echo_at = self.clock()
        return self._hand_off_if_heard()

    def _on_response_done(self, response_id: str, status: str) -> list[Action]:
        if self._active_response == response_id:
            self._active_response = None
        self._cancelling.discard(response_id)
        actions: list[Action] = []
        if response_id == self._guided_response:
            # Back to the persona's own instructions before anything else asks for a response.
            self._guided_response = None
            actions.append(ToModel(UpdateInstructions(self._instructions)))
        if response_id not in self._discarded_responses and (
            self._current_item is not None and self._current_item.response_id == response_id
        ):
            actions += self._flush_item()
        # The documented tool flow: output and the next response only after response.done.
        actions += self._answer_tool_calls(response_id)
        if self.state is CallState.ANNOUNCING and response_id == self._handoff_response:
            self._handoff_said = True
            actions += self._hand_off_if_heard()
        if self._model_idle and self._after_response:
            actions += self._after_response
            self._after_response = []
        return actions

    # --- handing the call on: tools, keypad, transfer, hang-up -----------------------------

    @property
    def _model_idle(self) -> bool:
        """No response is being generated or cancelled: the model takes a new response.create."""
        return self._active_response is None and not self._cancelling

    def _when_idle(self, actions: list[Action]) -> list[Action]:
        """Send now if the model is idle, else once its response is done (sending
        response.create during one is an error: "ongoing response already exists")."""
        if self._model_idle:
            return actions
        self._after_response += actions
        return []

    def _answer_tool_calls(self, response_id: str) -> list[Action]:
        actions: list[Action] = []
        for tool_call in self._tool_calls.pop(response_id, []):
            output = ToModel(ToolOutput(tool_call.call_id, "not done: the caller interrupted"))
            if response_id in self._discarded_responses or self.state is not CallState.ACTIVE:
                actions.append(output)  # the caller's new turn gets the model's next answer
                continue
            request = handoff_from_tool(self.persona, tool_call.name, tool_call.arguments)
            if isinstance(request, str):
                log.warning("tool_call_refused", tool=tool_call.name, error=request)
                actions.append(ToModel(ToolOutput(tool_call.call_id, f"error: {request}")))
                actions.append(ToModel(CreateResponse()))
                continue
            log.info("tool_call", tool=tool_call.name, arguments=tool_call.arguments)
            done = "ok: the agent says the sentence for you, then the call is handed on"
            actions.append(ToModel(ToolOutput(tool_call.call_id, done)))
            actions += self._announce(request)
        return actions

    def _announce(self, handoff: Handoff) -> list[Action]:
        """Say the handoff's sentence; the handoff happens once the caller has heard it."""
        self.state = CallState.ANNOUNCING
        self._announced_at_ms = self._next_media_ms or 0
        self._handoff, self._handoff_response, self._handoff_said = handoff, None, False
        sentence = sentence_for(self.persona, handoff)
        return self._when_idle(self._respond(say_verbatim(self.persona, sentence)))

    def _respond(self, instructions: str) -> list[Action]:
        """A response with instructions of its own, the way StepFun documents (D-GUIDE
        开发技巧/实现开场白): they become the session's instructions, then response.create
        (carrying them too, as the guide's sample does); StepFun documents no per-response
        instructions. The persona's come back when that response is done (_on_response_done)."""
        self._guided_pending = True
        return [
            ToModel(UpdateInstructions(instructions)),
            ToModel(CreateResponse(instructions=instructions)),
        ]

    def _hand_off_if_heard(self) -> list[Action]:
        if self.state is not CallState.ANNOUNCING or not self._handoff_said:
            return []
        response = self._handoff_response
        if any(item.response_id == response for item, _, _ in self._pending_marks.values()):
            return []  # Twilio is still playing the sentence
        handoff, self._handoff = self._handoff, None
        if isinstance(handoff, Transfer):
            self.state = CallState.TRANSFERRING
            log.info("transferring", target=handoff.target.name)
            return [TransferCall(handoff.target)]
        self.state = CallState.HANGING_UP
        if handoff.time_limit:
            self._hang_up_reason = EndReason.TIME_LIMIT
        elif handoff.shutdown:
            self._hang_up_reason = EndReason.SERVER_SHUTDOWN
        log.info("hanging_up", time_limit=handoff.time_limit, shutdown=handoff.shutdown)
        return [HangUpCall()]

    def _cancel_handoff(self) -> list[Action]:
        """The caller talked over the transfer sentence or the goodbye: it does not happen."""
        what = "transfer" if isinstance(self._handoff, Transfer) else "hang-up"
        log.info("handoff_cancelled_by_caller", handoff=what)
        self.state, self._handoff = CallState.ACTIVE, None
        note = f"(The caller interrupted you, so the {what} did not happen. Listen to them.)"
        return [ToModel(AddTextItem("system", note))]

    def _watch_model(self) -> list[Action]:
        """Keep the model session alive and answering: renew it before StepFun's 30-minute end
        at a quiet moment, and nudge it when a caller's turn got no answer."""
        now = self.clock()
        since = self._awaiting_answer_since
        if since is not None and now - since >= NUDGE_SECONDS and self._model_idle:
            self._awaiting_answer_since = None
            log.info("model_nudged", waited_s=round(now - since, 1))
            return [ToModel(CreateResponse())]
        quiet = (
            self._model_idle
            and not self._pending_marks
            and self._barge_in is None
            and since is None
            and self.state is CallState.ACTIVE
        )
        if quiet and not self._renewing and now - self._session_started >= SESSION_RENEW_SECONDS:
            self._renewing = True
            return [RenewModelSession()]
        return []

    def _watch_stalls(self, call_ms: int) -> list[Action]:
        """A mute or stuck model must not hold the call: a response that says nothing for
        RESPONSE_STALL_MS is given up on (silence prompts and limits then go on), and a handoff
        whose sentence has not been said in HANDOFF_SENTENCE_DEADLINE_MS happens without it."""
        actions: list[Action] = []
        stalled = self._active_response
        if (
            stalled is not None
            and not self._pending_marks
            and call_ms - self._response_alive_ms >= RESPONSE_STALL_MS
        ):
            log.warning("model_response_stalled", silent_ms=call_ms - self._response_alive_ms)
            # Not counted as cancelling: a stuck session may never answer the cancel either.
            self._discarded_responses.add(stalled)
            self._active_response = None
            actions.append(ToModel(CancelResponse()))
            if self._after_response:
                actions += self._after_response
                self._after_response = []
        if (
            self.state is CallState.ANNOUNCING
            and not self._handoff_said
            and call_ms - self._announced_at_ms >= HANDOFF_SENTENCE_DEADLINE_MS
            and not self._pending_marks
        ):
            log.warning("handoff_sentence_not_said", waited_ms=call_ms - self._announced_at_ms)
            if self._active_response is not None:
                self._discarded_responses.add(self._active_response)
                self._active_response = None
                actions.append(ToModel(CancelResponse()))
            self._after_response = []  # the sentence is no longer asked for
            self._handoff_response, self._handoff_said = None, True
            actions += self._hand_off_if_heard()
        return actions

    def _watch_silence(self, call_ms: int) -> list[Action]:
        """A silent line: ask whether the caller is still there; later, say goodbye."""
        timeout_ms = self.persona.silence_timeout_seconds * 1000
        busy = self._agent_speaking or self._barge_in is not None or not self._model_idle
        waiting = self._awaiting_answer_since is not None or self.state is not CallState.ACTIVE
        if busy or waiting or self._quiet_since_ms is None:
            self._quiet_since_ms = call_ms
            return []
        if not timeout_ms or call_ms - self._quiet_since_ms < timeout_ms:
            return []
        self._quiet_since_ms = call_ms
        self._silence_prompts += 1
        log.info("caller_silent", prompts=self._silence_prompts)
        if self._silence_prompts == 1:
            ask = "The caller has been silent for a while: ask, briefly, if they are still there."
            return self._respond(with_guidance(self.persona, ask))
        return self._announce(HangUp())

    def _watch_time_limit(self, call_ms: int) -> list[Action]:
        """max_call_seconds, on the stream's own clock (Twilio's media timestamps): warn the
        model half a minute ahead, then say goodbye and hang up."""
        limit_ms = self.persona.max_call_seconds * 1000
        if not self._time_limit_warned and call_ms >= limit_ms - TIME_LIMIT_WARNING_MS:
            self._time_limit_warned = True
            seconds = max(0, (limit_ms - call_ms) // 1000)
            note = f"(The call must end in {seconds} seconds: wrap up politely and briefly.)"
            return [ToModel(AddTextItem("system", note))]
        if call_ms < limit_ms or self.state is not CallState.ACTIVE:
            return []
        log.info("time_limit_reached", max_call_seconds=self.persona.max_call_seconds)
        return self._announce(HangUp(time_limit=True))  # after the agent's current answer

    def _on_keypad(self, digit: str) -> list[Action]:
        handoff = handoff_from_keypad(self.persona, digit)
        if handoff is not None and self.state is CallState.ACTIVE:
            log.info("keypad_shortcut", digit=digit)
            actions = self._interrupt_agent() if self._agent_speaking else []
            self._keypad_turn(digit)
            return actions + self._announce(handoff)
        if self.state in (CallState.ACTIVE, CallState.ANNOUNCING):
            self._digits += digit
            self._digits_at_ms = self._next_media_ms or 0
        return []

    def _pass_digits_to_model(self) -> list[Action]:
        digits, self._digits = self._digits, ""
        self._keypad_turn(digits)
        note = ToModel(AddTextItem("user", f"(I pressed {digits} on my phone's keypad.)"))
        return [note, *self._when_idle([ToModel(CreateResponse())])]

    def _keypad_turn(self, digits: str) -> None:
        turn = self._caller_turn(f"keypad-{len(self._caller_turns)}")
        turn.text = f"[keypad: {digits}]"

    # --- barge-in -------------------------------------------------------------------------

    @property
    def _agent_speaking(self) -> bool:
        """Agent audio is being generated, or sent and not yet heard."""
        return bool(self._pending_marks) or self._active_response is not None

    def _on_speech_started(self, item_id: str) -> list[Action]:
        self._caller_turn(item_id)
        self._silence_prompts = 0  # the caller is there
        if not self._agent_speaking or self.state in STOP_MEANS:
            return []
        if self.persona.barge_in_min_speech_ms == 0:
            return self._interrupt_agent()
        self._barge_in = BargeInCandidate(item_id)
        return []

    def _weigh_barge_in(self, pcm: bytes) -> list[Action]:
        """False barge-in guard: interrupt only once the caller has spoken long enough. Phone
        lines have no echo cancellation, and "mhm" or a cough should not cut the agent off."""
        candidate = self._barge_in
        assert candidate is not None
        if not self._agent_speaking:  # the agent finished on its own: nothing to interrupt
            self._barge_in = None
            return []
        if pcm16_rms(pcm) > self.persona.vad_threshold:
            candidate.loud_ms += pcm16_ms(len(pcm))
        if candidate.loud_ms < self.persona.barge_in_min_speech_ms:
            return []
        self._barge_in = None
        return self._interrupt_agent()

    def _heard_now(self) -> dict[str, int]:
        """How much of the item now playing the caller has heard at this instant.

        A mark echo says the audio before it finished playing; Twilio plays on at real time, so
        the caller is ``now - echo`` further in (or, if the line was idle, ``now - sent``).
        Network transit of the echo and of our `clear` is not known, so this errs on the side
        of "heard less". Capped at what was sent.
        """
        if not self._pending_marks:
            return {}
        item, _, first_sent_at = next(iter(self._pending_marks.values()))
        playing_since = max(self._last_echo_at or first_sent_at, first_sent_at)
        elapsed_ms = max(0, round((self.clock() - playing_since) * 1000))
        return {item.item_id: min(item.sent_ms, item.played_ms + elapsed_ms)}

    def _interrupt_agent(self) -> list[Action]:
        """The caller talks over the agent: stop playback now, and make the model and the
        transcript believe only what the caller heard."""
        actions: list[Action] = [SendClear()]
        if self._active_response is not None:
            actions.append(ToModel(CancelResponse()))
            self._discarded_responses.add(self._active_response)
            self._cancelling.add(self._active_response)
            self._active_response = None
        heard_now = self._heard_now()
        cut_items = {item.item_id: item for item, _, _ in self._pending_marks.values()}
        if self._current_item is not None:
            cut_items[self._current_item.item_id] = self._current_item
        for item in cut_items.values():
            self._discarded_responses.add(item.response_id)
            heard_ms = heard_now.get(item.item_id, min(item.played_ms, item.sent_ms))
            actions.append(ToModel(TruncateItem(item.item_id, heard_ms)))
            self.stats.discarded_ms += item.sent_ms - heard_ms
            cut_turn(item.turn, heard_ms, item.sent_ms)
            actions.append(TurnFinished(item.turn.as_dict()))
        self._pending_marks.clear()  # their echoes, sent at once after `clear`, are not played
        self._barge_in = None
        self._current_item = None
        self._to_caller.reset()  # the cut reply's filter state must not leak into the next
        self.stats.barge_ins += 1
        if self.state is CallState.ANNOUNCING:
            actions += self._cancel_handoff()
        return actions

    # --- helpers --------------------------------------------------------------------------

    def _caller_turn(self, item_id: str) -> Turn:
        turn = self._caller_turns.get(item_id)
        if turn is None:
            now = self._now_ms()
            turn = self._caller_turns[item_id] = Turn("caller", item_id, now, now)
            self.turns.append(turn)
        return turn

    def _end(self, reason: EndReason) -> list[Action]:
        self.state = CallState.ENDED
        self.end_reason = reason
        return [EndCall(reason)]

    def _now_ms(self) -> int:
        return int((self.clock() - self.stats.started_at) * 1000)
