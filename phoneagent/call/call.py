"""One phone call: the machines of the call composed, and what every event means. No I/O.

The ``Call`` takes events — Twilio Media Streams messages, realtime-model events, ticks, what
became of the shell's requests (a transfer, a hang-up, a new model session) — and returns the
actions the shell must perform. It owns no rule of its own beyond composing small machines,
each with its states and transitions in one table:

- ``Playback``: agent audio framed into messages and marks; what the caller has heard.
- ``ModelResponse``: idle / generating / cancelling; commands deferred to its end; tool calls.
- ``Announcement``: the sentence before a handoff, then the handoff (transfer or hang-up).
- ``BusinessToolCalls``: the persona's own tools: calls in flight, the filler, the limits.
- watchers (``TimeLimit``, ``Silence``, ``Nudge``, ``Keypad``), driven by ``Tick``.
- ``ModelLink``: renewal and reconnection of the model session.

``EVENTS`` below names what each Twilio and model event means in each state of the call; an
event a state does not list is logged once and dropped.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from phoneagent.audio import (
    ULAW_BYTES_PER_MS,
    ULAW_SILENCE,
    CallerToModel,
    pcm16_ms,
    pcm16_rms,
)
from phoneagent.call import prompts
from phoneagent.call.actions import (
    Action,
    AskBusinessTool,
    EndCall,
    EndReason,
    HangUpCall,
    RenewModelSession,
    SendClear,
    ToModel,
    ToolCallFinished,
    TransferCall,
    TurnFinished,
)
from phoneagent.call.announcement import Announcement, HandoffState
from phoneagent.call.machine import Unexpected
from phoneagent.call.model_link import LinkState, ModelLink
from phoneagent.call.playback import AgentItem, BargeInCandidate, CallStats, Playback
from phoneagent.call.prompts import instructions_for, replay, say_verbatim, with_guidance
from phoneagent.call.response import ModelResponse
from phoneagent.call.tool_calls import (
    TIMEOUT,
    BusinessToolCalls,
    PendingToolCall,
    ToolAnswer,
    error_output,
)
from phoneagent.call.transcript import Transcript, Turn, cut_turn
from phoneagent.call.watchers import (
    Cadence,
    Keypad,
    Nudge,
    Silence,
    SilenceState,
    Tick,
    TimeLimit,
)
from phoneagent.handoff import (
    Handoff,
    HangUp,
    Transfer,
    handoff_from_keypad,
    handoff_from_tool,
    sentence_for,
)
from phoneagent.logs import get_logger
from phoneagent.personas import BusinessTool, Persona
from phoneagent.realtime.base import (
    AddTextItem,
    AgentTranscriptDelta,
    AgentTranscriptDone,
    AppendAudio,
    AudioDelta,
    CreateResponse,
    ItemAdded,
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
    UserTranscript,
)
from phoneagent.twilio.wire.stream import Dtmf, Mark, Media, Stop, TwilioEvent

log = get_logger(__name__)

# Inbound timestamp gaps up to this long are filled with silence so the model's VAD still sees
# the caller's turn end; Twilio omits silent audio on some calls (twilio reference, section 2).
MAX_GAP_FILL_MS = 2000


class CallState(enum.Enum):
    ACTIVE = "active"  # caller and agent are talking
    ANNOUNCING = "announcing"  # the agent says the transfer sentence or goodbye; then hand off
    TRANSFERRING = "transferring"  # Twilio was asked to dial a person: its `stop` is expected
    HANGING_UP = "hanging_up"  # Twilio was asked to end the call: its `stop` is expected
    ENDED = "ended"  # both sockets are to be closed; nothing more is sent


# The call's state is the handoff's, until it ends.
STATE_OF_HANDOFF = {
    HandoffState.NONE: CallState.ACTIVE,
    HandoffState.ANNOUNCING: CallState.ANNOUNCING,
    HandoffState.SAID: CallState.ANNOUNCING,
    HandoffState.TRANSFERRING: CallState.TRANSFERRING,
    HandoffState.HANGING_UP: CallState.HANGING_UP,
}

# What Twilio's `stop` means in each state: only in ACTIVE and ANNOUNCING did the caller hang up.
STOP_MEANS = {
    CallState.TRANSFERRING: EndReason.TRANSFERRED,
    CallState.HANGING_UP: EndReason.AGENT_HUNG_UP,
}

_LIVE = (CallState.ACTIVE, CallState.ANNOUNCING, CallState.TRANSFERRING, CallState.HANGING_UP)
_TALKING = (CallState.ACTIVE, CallState.ANNOUNCING)
_HANDING_ON = (CallState.TRANSFERRING, CallState.HANGING_UP)

# What each event means, by state: (event type, the states it means something in, handler).
# Not listed (every event once the call has ENDED, a second `start`, …): logged once, dropped.
EVENT_ROWS: tuple[tuple[type, tuple[CallState, ...], str], ...] = (
    (Media, _LIVE, "_on_caller_audio"),
    (Mark, _LIVE, "_on_mark"),
    (Stop, _LIVE, "_on_stop"),
    (Dtmf, _TALKING, "_on_keypad"),
    (Dtmf, _HANDING_ON, "_ignore"),  # the caller presses keys while being handed on
    (AudioDelta, _TALKING, "_on_agent_audio"),
    (AudioDelta, _HANDING_ON, "_ignore"),  # the agent has had its last word
    (AgentTranscriptDelta, _LIVE, "_on_agent_text"),
    (AgentTranscriptDone, _LIVE, "_on_agent_text_done"),
    (ItemAdded, _LIVE, "_on_item_added"),
    (ResponseStarted, _LIVE, "_on_response_started"),
    (ToolCall, _LIVE, "_on_tool_call"),
    (ResponseDone, _LIVE, "_on_response_done"),
    (SpeechStarted, _LIVE, "_on_speech_started"),
    (SpeechStopped, _LIVE, "_on_speech_stopped"),
    (UserTranscript, _LIVE, "_on_user_transcript"),
    (ModelError, _LIVE, "_on_model_error"),
    (SessionReady, _LIVE, "_ignore"),  # the shell configured the session before
    (SessionUpdated, _LIVE, "_ignore"),
)
EVENTS: dict[tuple[CallState, type], str] = {
    (state, event_type): handler for event_type, states, handler in EVENT_ROWS for state in states
}


class CallerAudio:
    """Caller frames to model audio: gaps in Twilio's timestamps filled with silence, then
    8 → 24 kHz. Its position is the stream clock."""

    def __init__(self, model_rate: int) -> None:
        self._to_model = CallerToModel(model_rate)
        self.next_ms: int | None = None  # where the next frame is due

    def receive(self, media: Media) -> bytes:
        audio = media.payload
        expected = self.next_ms
        if expected is not None and media.timestamp_ms > expected:
            gap_ms = min(media.timestamp_ms - expected, MAX_GAP_FILL_MS)
            audio = bytes([ULAW_SILENCE]) * (gap_ms * ULAW_BYTES_PER_MS) + audio
        self.next_ms = media.timestamp_ms + len(media.payload) // ULAW_BYTES_PER_MS
        return audio

    def to_model(self, ulaw: bytes) -> bytes:
        return self._to_model.process(ulaw)


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
    # What the agent says first, word for word, instead of the persona's greeting: a call the
    # persona placed opens with its outbound greeting.
    greeting: str = ""
    end_reason: EndReason | None = None
    # The pcm16 rates of the model session's audio, in and out (the dialect says them).
    model_input_rate: int = 24000
    model_output_rate: int = 24000

    def __post_init__(self) -> None:
        self._started_at = self.clock()
        self.stats = CallStats()
        self._unexpected = Unexpected()
        self._transcript = Transcript()
        self._caller = CallerAudio(self.model_input_rate)
        self._barge_in: BargeInCandidate | None = None
        self._playback = Playback(self.clock, self._unexpected, self.model_output_rate)
        instructions = instructions_for(self.persona)
        self._response = ModelResponse(instructions, self._unexpected)
        self._handoff = Announcement(self._unexpected)
        self._watchers = Watchers(self.persona, self._unexpected)
        self._link = ModelLink(self._started_at, self._unexpected)
        self._tools = BusinessToolCalls.of(self.persona.tools)

    @property
    def state(self) -> CallState:
        if self.end_reason is not None:
            return CallState.ENDED
        return STATE_OF_HANDOFF[self._handoff.state]

    @property
    def ended(self) -> bool:
        return self.end_reason is not None

    @property
    def clears(self) -> int:
        """How many times agent playback was cleared (barge-ins): agent audio the Call framed
        before a clear was written off by it and must not reach the caller after it."""
        return self._playback.clears

    @property
    def turns(self) -> list[Turn]:
        return self._transcript.turns

    @property
    def transcript(self) -> list[dict]:
        """Turns in the order they started, each with the text the other side heard."""
        return self._transcript.as_dicts()

    # --- entry points ---------------------------------------------------------------------

    def begin(self) -> list[Action]:
        """The model session is configured and the stream has started: greet the caller (or,
        back from a transfer nobody answered, remind the model of the call and say so)."""
        actions: list[Action] = [ToModel(item) for item in replay(self.history)]
        if self.opening:
            return actions + self._respond(with_guidance(self.persona, self.opening))
        greeting = self.greeting or self.persona.greeting
        return actions + self._respond(say_verbatim(self.persona, greeting))

    def on_twilio(self, event: TwilioEvent) -> list[Action]:
        return self._link.outbound(self._dispatch(event))

    def on_model(self, event: ModelEvent) -> list[Action]:
        if not self.ended:
            if isinstance(event, (SpeechStarted, SpeechStopped, ResponseStarted, ResponseDone)):
                self._watchers.silence.line_active()  # the silence timeout restarts
            if isinstance(event, AudioDelta):
                self._response.spoke(self._stream_ms())
        return self._link.outbound(self._dispatch(event))

    def on_tick(self, tick: Tick) -> list[Action]:
        """Time passed: the watchers decide whether that means something."""
        if self.ended:
            return []
        return self._link.outbound(self._watch(tick))

    def on_transfer_result(self, error: str | None) -> list[Action]:
        """Twilio took the transfer (None), or refused it: then the agent tells the caller."""
        if self.state is not CallState.TRANSFERRING or error is None:
            return []
        log.warning("transfer_failed", error=error)
        self._handoff.transfer_failed()
        return self._link.outbound(
            self._when_idle(
                [
                    ToModel(AddTextItem("system", prompts.transfer_failed_note(error))),
                    *self._respond(with_guidance(self.persona, prompts.TRANSFER_FAILED_TELL)),
                ]
            )
        )

    def on_hang_up_result(self, error: str | None) -> list[Action]:
        """Twilio ended the call, or could not: either way the stream is over. Closing it ends
        the call too (nothing follows `</Connect>` in our TwiML), so no `stop` is awaited."""
        if self.state is not CallState.HANGING_UP:
            return []
        if error is not None:
            log.warning("hang_up_failed", error=error)
        return self._end(self._handoff.hang_up_reason)

    def on_tool_answer(self, call_id: str, answer: ToolAnswer) -> list[Action]:
        """The business answered a persona tool call (or the request failed): the model gets
        the answer, and answers the caller with it."""
        pending = self._tools.answered(call_id)
        if self.ended or pending is None:
            return []  # the call is over, or the answer came after the call gave up on it
        return self._link.outbound(self._give_tool_answer(pending, answer))

    def on_clear_sent(self, reaction_ms: float) -> None:
        """The shell sent a barge-in's `clear` this long after the event that caused it."""
        self.stats.barge_in_reaction_ms.append(reaction_ms)

    # --- the model session: renewal, drops, reconnection ----------------------------------

    def on_model_dropped(self) -> list[Action]:
        """The model's socket closed under the call: reopen it (RECONNECT_DELAYS)."""
        if self.ended:
            return []
        return self._link.dropped()

    def on_model_reconnect_failed(self, reason: str) -> list[Action]:
        if self.ended:
            return []
        actions = self._link.reconnect_failed()
        if actions:
            return actions
        log.error("model_lost", call_sid=self.call_sid, reason=reason)
        # Closing the stream makes Twilio ask `<Connect action>` what to do next: the apology
        # and the fallback target are answered there (twilio routes).
        return self._end(EndReason.MODEL_DISCONNECTED)

    def on_model_renewal_failed(self, reason: str) -> list[Action]:
        """The old session goes on; the renewal is tried again later (a drop is a reconnect)."""
        log.warning("model_renewal_failed", reason=reason)
        self._link.renewal_failed(self.clock())
        return []

    def on_model_reconnected(self) -> list[Action]:
        """A new model session replaces the one that dropped (or was renewed): it knows nothing
        of this call yet, so it hears the conversation so far, then picks up where it was."""
        if self.ended:
            return []
        held = self._link.switched(self.clock())
        self._transcript.speaking = None  # the old session's speech_stopped will never come
        self._tools.session += 1  # tool calls in flight belong to the old session
        actions = self._flush_item()  # what the old session generated still plays
        was_answering = self._response.new_session()
        actions += [ToModel(item) for item in replay(self.transcript)]
        actions += held
        if self._handoff.new_session():
            assert self._handoff.handoff is not None
            sentence = sentence_for(self.persona, self._handoff.handoff)
            actions += self._respond(say_verbatim(self.persona, sentence))
        elif was_answering:
            actions += self._respond(with_guidance(self.persona, prompts.FINISH_CUT_ANSWER))
        for pending, output in self._tools.take_held():  # answers that came while it was away
            actions += self._tell_tool_answer(pending, output)
        return actions

    def on_model_closed(self) -> list[Action]:
        """The model session is gone and cannot be reopened."""
        if self.ended:
            return []
        return self._end(EndReason.MODEL_DISCONNECTED)

    def on_twilio_closed(self) -> list[Action]:
        if self.ended:
            return []
        if self.state in STOP_MEANS:  # Twilio may close without `stop` after our REST update
            return self._end(self._stop_means())
        return self._end(EndReason.TWILIO_DISCONNECTED)

    def on_drain(self) -> list[Action]:
        """The instance is stopping and its drain time is nearly up: the agent finishes what it
        is saying, says the persona's goodbye, and hangs up (within the handoff deadline)."""
        if self.state is not CallState.ACTIVE:
            return []  # already handing the call on, or over
        log.info("call_drained")
        return self._link.outbound(self._announce(HangUp(shutdown=True)))

    def on_shutdown(self) -> list[Action]:
        """The drain time is up: the call ends now (Twilio then asks `<Connect action>`, which
        another instance answers with the apology and the fallback)."""
        if self.ended:
            return []
        return self._end(EndReason.SERVER_SHUTDOWN)

    # --- what events mean -----------------------------------------------------------------

    def _dispatch(self, event: TwilioEvent | ModelEvent) -> list[Action]:
        handler = EVENTS.get((self.state, type(event)))
        if handler is None:
            self._unexpected.note("Call", self.state, type(event).__name__)
            return []
        return getattr(self, handler)(event)

    def _ignore(self, event: object) -> list[Action]:
        return []

    def _on_stop(self, event: Stop) -> list[Action]:
        return self._end(self._stop_means())

    def _stop_means(self) -> EndReason:
        if self.state is CallState.HANGING_UP:
            return self._handoff.hang_up_reason
        return STOP_MEANS.get(self.state, EndReason.CALLER_HUNG_UP)

    def _on_agent_text(self, event: AgentTranscriptDelta) -> list[Action]:
        item = self._agent_item(self._response_of(event.response_id, event.item_id), event.item_id)
        if item is not None and not item.turn.interrupted:
            item.turn.text += event.text
        return []

    def _on_agent_text_done(self, event: AgentTranscriptDone) -> list[Action]:
        item = self._agent_item(self._response_of(event.response_id, event.item_id), event.item_id)
        if item is not None and not item.turn.interrupted:
            item.turn.text = event.text
            return [TurnFinished(item.turn.as_dict())]
        return []

    def _on_item_added(self, event: ItemAdded) -> list[Action]:
        self._response.item_added(event.response_id, event.item_id)
        return []

    def _on_response_started(self, event: ResponseStarted) -> list[Action]:
        self._response.started(event.response_id, self._stream_ms())
        self._watchers.nudge.answered()
        self._handoff.response_started(event.response_id)
        return []

    def _on_tool_call(self, event: ToolCall) -> list[Action]:
        self._response.tools.note(self._response_of(event.response_id, None), event)
        return []

    def _on_speech_stopped(self, event: SpeechStopped) -> list[Action]:
        turn = self._caller_turn(event.item_id)
        turn.end_ms = self._now_ms()
        self._watchers.nudge.turn_ended(self.clock())
        if self._transcript.speaking == event.item_id:
            self._transcript.speaking = None
        if self._barge_in is not None and self._barge_in.caller_item_id == event.item_id:
            log.info("barge_in_ignored", loud_ms=self._barge_in.loud_ms)
            self.stats.barge_ins_ignored += 1
            self._barge_in = None
            self._watchers.nudge.no_answer_wanted()  # "mhm" asks for no answer
        return []

    def _on_user_transcript(self, event: UserTranscript) -> list[Action]:
        turn = self._caller_turn(event.item_id)
        turn.text = event.text.strip()
        return [TurnFinished(turn.as_dict())]

    def _on_model_error(self, event: ModelError) -> list[Action]:
        if event.benign:
            log.debug("model_error_ignored", code=event.code, message=event.message)
        else:
            log.warning("model_error", code=event.code, message=event.message)
        return []

    # --- caller → model -------------------------------------------------------------------

    def _on_caller_audio(self, media: Media) -> list[Action]:
        audio = self._caller.receive(media)
        ms, now = media.timestamp_ms, self.clock()
        actions = self._watch(Tick(ms, now)) if self._watchers.cadence.due(ms, now) else []
        if not audio:
            return actions
        pcm = self._caller.to_model(audio)
        # The caller's audio always reaches the model, interruption or not.
        actions.append(ToModel(AppendAudio(pcm)))
        if self._barge_in is not None:
            return self._weigh_barge_in(pcm) + actions  # an interruption goes out first
        return actions

    # --- watchers -------------------------------------------------------------------------

    def _watch(self, tick: Tick) -> list[Action]:
        ms = tick.stream_ms
        actions: list[Action] = []
        if ms is not None:
            actions += self._watch_time_limit(ms)
            actions += self._watch_stalls(ms)
        actions += self._watch_model(tick.now)
        actions += self._watch_tools(tick.now)
        if ms is not None:
            actions += self._watch_silence(ms)
            if (digits := self._watchers.keypad.on_tick(ms)) is not None:
                actions += self._pass_digits_to_model(digits)
        return actions

    def _watch_time_limit(self, ms: int) -> list[Action]:
        match self._watchers.time_limit.on_tick(ms, self.state is CallState.ACTIVE):
            case "warn":
                seconds = self._watchers.time_limit.seconds_left(ms)
                return [ToModel(AddTextItem("system", prompts.time_limit_note(seconds)))]
            case "reached":
                log.info("time_limit_reached", max_call_seconds=self.persona.max_call_seconds)
                return self._announce(HangUp(time_limit=True))  # after the current answer
        return []

    def _watch_stalls(self, ms: int) -> list[Action]:
        """A mute or stuck model must not hold the call: a stalled response is given up on
        (silence prompts and limits then go on), and a handoff whose sentence has not been
        said in time happens without it."""
        actions: list[Action] = []
        playing = self._playback.sounding
        if self._response.stalled(ms, playing):
            log.warning("model_response_stalled", silent_ms=ms - self._response.alive_ms)
            actions += self._give_up_response()
            actions += self._response.release(even_if_busy=True)
        if self._handoff.overdue(ms, playing):
            waited_ms = self._handoff.give_up_sentence(ms)
            log.warning("handoff_sentence_not_said", waited_ms=waited_ms)
            actions += self._give_up_response()
            actions += self._response.drop_deferred()  # the sentence is no longer asked for
            actions += self._hand_off_if_heard()
        return actions

    def _give_up_response(self) -> list[Action]:
        """Cancel the response in progress without waiting for it; what the framer still holds
        of it is dropped with it (it must not be sent when the next item starts), and what was
        sent of it gets its last mark."""
        given_up = self._response.active
        current = self._playback.current
        actions: list[Action] = []
        if given_up is not None and current is not None and current.response_id == given_up:
            actions += self._playback.flush(send=False)
        return actions + self._response.give_up()

    def _watch_model(self, now: float) -> list[Action]:
        """Keep the model session alive and answering: nudge it when a caller's turn got no
        answer, and renew it before StepFun's 30-minute end at a quiet moment."""
        if self._watchers.nudge.on_tick(now, self._response.idle):
            return [ToModel(CreateResponse())]
        quiet = (
            self._response.idle
            and not self._playback.sounding
            and self._barge_in is None
            and not self._watchers.nudge.waiting
            and not self._tools.pending  # a new session could not take their answers
            and self.state is CallState.ACTIVE
        )
        if self._link.renewal_due(now, quiet):
            return [RenewModelSession()]
        return []

    def _watch_silence(self, ms: int) -> list[Action]:
        occupied = (
            self._agent_speaking
            or self._barge_in is not None
            or not self._response.idle
            or self._watchers.nudge.waiting
            or bool(self._tools.pending)  # the caller waits for the business's answer
            or self.state is not CallState.ACTIVE
        )
        match self._watchers.silence.on_tick(ms, occupied):
            case SilenceState.ASKED:
                return self._respond(with_guidance(self.persona, prompts.STILL_THERE))
            case SilenceState.GOODBYE:
                return self._announce(HangUp())
        return []

    # --- model → caller -------------------------------------------------------------------

    def _response_of(self, response_id: str | None, item_id: str | None) -> str:
        played = self._playback.items.get(item_id) if item_id is not None else None
        return self._response.response_of(
            response_id, item_id, played.response_id if played is not None else None
        )

    def _agent_item(self, response_id: str, item_id: str) -> AgentItem | None:
        """The playback record of an item, created on first sight; None if it was discarded."""
        if self._response.discarded(response_id):
            return None
        item = self._playback.items.get(item_id)
        if item is None:
            turn = self._transcript.agent_turn(item_id, self._now_ms())
            item = self._playback.items[item_id] = AgentItem(item_id, response_id, turn)
        return item

    def _on_agent_audio(self, delta: AudioDelta) -> list[Action]:
        response_id = self._response_of(delta.response_id, delta.item_id)
        item = self._agent_item(response_id, delta.item_id)
        if item is None:
            return []  # a late delta of a response the caller interrupted
        actions = self._playback.audio(item, delta.pcm)
        self._note_first_audio(actions)
        return actions

    def _flush_item(self) -> list[Action]:
        actions = self._playback.flush(send=self.state not in STOP_MEANS)
        self._note_first_audio(actions)
        return actions

    def _on_mark(self, mark: Mark) -> list[Action]:
        item = self._playback.echo(mark.name)
        if item is None:
            return []  # an echo of a mark written off by `clear`: it proves nothing was played
        item.turn.end_ms = self._now_ms()
        return self._hand_off_if_heard()

    def _on_response_done(self, event: ResponseDone) -> list[Action]:
        response_id = self._response.done_of(event.response_id, event.tool_calls)
        for tool_call in event.tool_calls:  # those function_call_arguments.done did not bring
            self._response.tools.note(response_id, tool_call)
        actions = self._response.done(response_id)
        current = self._playback.current
        if (
            not self._response.discarded(response_id)
            and current is not None
            and current.response_id == response_id
        ):
            actions += self._flush_item()
        # The documented tool flow: output and the next response only after response.done.
        actions += self._answer_tool_calls(response_id)
        self._handoff.response_done(response_id)
        actions += self._hand_off_if_heard()
        return actions + self._response.release()

    # --- handing the call on: tools, keypad, transfer, hang-up -----------------------------

    def _when_idle(self, actions: list[Action]) -> list[Action]:
        return self._response.when_idle(actions)

    def _respond(self, instructions: str) -> list[Action]:
        return self._response.guide.respond(instructions)

    def _answer_tool_calls(self, response_id: str) -> list[Action]:
        actions: list[Action] = []
        asked = refused = 0  # calls of this response sent to the business, and refused
        for tool_call in self._response.tools.of(response_id):
            output = ToModel(ToolOutput(tool_call.call_id, prompts.TOOL_INTERRUPTED))
            if self._response.discarded(response_id) or self.state is not CallState.ACTIVE:
                actions.append(output)  # the caller's new turn gets the model's next answer
                continue
            if (tool := self._tools.tools.get(tool_call.name)) is not None:
                ask = self._ask_business(tool_call.call_id, tool, tool_call.arguments, asked)
                if isinstance(ask[0], AskBusinessTool):
                    asked += 1
                else:
                    refused += 1
                actions += ask
                continue
            request = handoff_from_tool(self.persona, tool_call.name, tool_call.arguments)
            if isinstance(request, str):
                log.warning("tool_call_refused", tool=tool_call.name, error=request)
                actions.append(
                    ToModel(ToolOutput(tool_call.call_id, prompts.tool_refused(request)))
                )
                self._tools.count_refusal()  # a transfer to nowhere loops as well
                refused += 1
                continue
            log.info("tool_call", tool=tool_call.name, arguments=tool_call.arguments)
            actions.append(ToModel(ToolOutput(tool_call.call_id, prompts.TOOL_ACCEPTED)))
            actions += self._announce(request)
        if (
            refused
            and self._tools.answers_refusals
            and not self._tools.waiting_in(self._tools.session)
        ):
            # The model answers the refusal now; with calls in flight, with their answers. Past
            # MAX_REFUSALS_PER_CALL, not: a model that keeps calling wrong would loop on its
            # own (refusal, response, call, refusal…); it speaks again when the caller does.
            actions.append(ToModel(CreateResponse()))
        return actions

    # --- the persona's own tools: the business answers ------------------------------------

    def _ask_business(
        self, call_id: str, tool: BusinessTool, arguments: str, asked: int
    ) -> list[Action]:
        """Ask the business, or refuse the call to the model (its arguments, the limits). The
        arguments' values are never logged: they are what the caller said (names, dates of
        birth, numbers); their names are."""
        sent = self._tools.ask(call_id, tool, arguments, self.clock(), asked)
        if isinstance(sent, dict):
            log.info("business_tool_asked", tool=tool.name, arguments=sorted(sent))
            return [AskBusinessTool(call_id, tool, sent)]
        outcome, reason = sent
        log.warning("business_tool_refused", tool=tool.name, outcome=outcome, reason=reason)
        return [
            ToModel(ToolOutput(call_id, error_output(reason))),
            self._tool_finished(tool.name, outcome, None),
        ]

    def _give_tool_answer(self, pending: PendingToolCall, answer: ToolAnswer) -> list[Action]:
        """The answer to the model, once it is idle (after the filler, if it is being said),
        then a response, unless other calls are still in flight (their answers bring it) or
        the call is being handed on. A barge-in meanwhile changes nothing: the model still needs
        the answer, and says it after what the caller asked in between."""
        name = pending.tool.name
        level = log.info if answer.outcome == "ok" else log.warning
        level("business_tool_answered", tool=name, outcome=answer.outcome,
              duration_ms=answer.duration_ms, status=answer.status)  # fmt: skip
        finished = self._tool_finished(name, answer.outcome, answer.duration_ms)
        if self._link.state is LinkState.RECONNECTING:
            # Nothing reaches the model now: the session that comes next is told.
            self._tools.held.append((pending, answer.output))
            return [finished]
        return [finished, *self._tell_tool_answer(pending, answer.output)]

    def _tell_tool_answer(self, pending: PendingToolCall, output: str) -> list[Action]:
        if pending.session == self._tools.session:
            tell: list[Action] = [ToModel(ToolOutput(pending.call_id, output))]
        else:  # a new model session never saw the call: its call_id means nothing there
            note = prompts.tool_answer_note(pending.tool.name, output)
            tell = [ToModel(AddTextItem("system", note))]
        if self.state is CallState.ACTIVE and not self._tools.waiting_in(self._tools.session):
            tell.append(ToModel(CreateResponse()))
        return self._response.after_asked(tell)

    def _tool_finished(self, tool: str, outcome: str, duration_ms: int | None) -> ToolCallFinished:
        self.stats.tool_calls.append({"tool": tool, "outcome": outcome, "duration_ms": duration_ms})
        return ToolCallFinished(tool, outcome, duration_ms)

    def _watch_tools(self, now: float) -> list[Action]:
        """Calls the shell never answered are given up on; a slow answer gets the filler, said
        the way every fixed sentence is (say_verbatim: the model's own voice, one response like
        any other), when the line is quiet: not over the agent, nor over a caller's turn."""
        actions: list[Action] = []
        for pending in self._tools.overdue(now):
            waited_ms = round((now - pending.asked_at) * 1000)
            answer = ToolAnswer(error_output("no answer in time"), TIMEOUT, waited_ms)
            actions += self._give_tool_answer(pending, answer)
        quiet = (
            self.state is CallState.ACTIVE
            and self._response.idle
            and not self._response.guide.waiting
            and not self._playback.sounding
            and self._barge_in is None
            and self._transcript.speaking is None  # "one moment" over the caller's words: no
            and not self._watchers.nudge.waiting
        )
        if quiet and (tool := self._tools.filler_due(now)) is not None:
            log.info("business_tool_filler", tool=tool.name)
            actions += self._respond(say_verbatim(self.persona, tool.filler))
        return actions

    def _announce(self, handoff: Handoff) -> list[Action]:
        """Say the handoff's sentence; the handoff happens once the caller has heard it."""
        self._handoff.announce(handoff, self._stream_ms())
        sentence = sentence_for(self.persona, handoff)
        return self._when_idle(self._respond(say_verbatim(self.persona, sentence)))

    def _hand_off_if_heard(self) -> list[Action]:
        handoff = self._handoff.heard(self._playback.plays(self._handoff.response))
        if isinstance(handoff, Transfer):
            log.info("transferring", target=handoff.target.name)
            return [TransferCall(handoff.target, handoff.reason)]
        if isinstance(handoff, HangUp):
            log.info("hanging_up", time_limit=handoff.time_limit, shutdown=handoff.shutdown)
            return [HangUpCall()]
        return []

    def _on_keypad(self, event: Dtmf) -> list[Action]:
        digit = event.digit
        handoff = handoff_from_keypad(self.persona, digit)
        if handoff is not None and self.state is CallState.ACTIVE:
            log.info("keypad_shortcut", digit=digit)
            actions = self._interrupt_agent() if self._agent_speaking else []
            self._transcript.keypad_turn(digit, self._now_ms())
            return actions + self._announce(handoff)
        self._watchers.keypad.typed(digit, self._stream_ms())
        return []

    def _pass_digits_to_model(self, digits: str) -> list[Action]:
        self._transcript.keypad_turn(digits, self._now_ms())
        note = ToModel(AddTextItem("user", prompts.keypad_note(digits)))
        return [note, *self._when_idle([ToModel(CreateResponse())])]

    # --- barge-in -------------------------------------------------------------------------

    @property
    def _agent_speaking(self) -> bool:
        """Agent audio is being generated, or sent and not yet heard."""
        return self._playback.sounding or self._response.active is not None

    def _on_speech_started(self, event: SpeechStarted) -> list[Action]:
        self._caller_turn(event.item_id)
        self._transcript.speaking = event.item_id
        self._watchers.silence.caller_spoke()  # the caller is there
        if not self._agent_speaking or self.state in STOP_MEANS:
            return []
        if self.persona.barge_in_min_speech_ms == 0:
            return self._interrupt_agent()
        self._barge_in = BargeInCandidate(event.item_id)
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
            candidate.loud_ms += pcm16_ms(len(pcm), self.model_input_rate)
        if candidate.loud_ms < self.persona.barge_in_min_speech_ms:
            return []
        self._barge_in = None
        return self._interrupt_agent()

    def _interrupt_agent(self) -> list[Action]:
        """The caller talks over the agent: stop playback now, and make the model and the
        transcript believe only what the caller heard."""
        actions: list[Action] = [SendClear(), *self._response.cancel()]
        for item, heard_ms in self._playback.clear():
            self._response.discard(item.response_id)
            actions.append(ToModel(TruncateItem(item.item_id, heard_ms)))
            self.stats.discarded_ms += item.sent_ms - heard_ms
            cut_turn(item.turn, heard_ms, item.sent_ms)
            actions.append(TurnFinished(item.turn.as_dict()))
        self._barge_in = None
        self.stats.barge_ins += 1
        if self._handoff.announcing:
            what = self._handoff.cancel()
            log.info("handoff_cancelled_by_caller", handoff=what)
            actions.append(ToModel(AddTextItem("system", prompts.handoff_cancelled_note(what))))
        return actions

    # --- helpers --------------------------------------------------------------------------

    def _caller_turn(self, item_id: str) -> Turn:
        return self._transcript.caller_turn(item_id, self._now_ms())

    def _end(self, reason: EndReason) -> list[Action]:
        self.end_reason = reason
        return [EndCall(reason)]

    def _note_first_audio(self, actions: list[Action]) -> None:
        if actions and self.stats.first_audio_ms is None:
            self.stats.first_audio_ms = round((self.clock() - self._started_at) * 1000)

    def _now_ms(self) -> int:
        return int((self.clock() - self._started_at) * 1000)

    def _stream_ms(self) -> int:
        return self._caller.next_ms or 0


class Watchers:
    """The rules that fire because time passed (see ``watchers``), one machine each."""

    def __init__(self, persona: Persona, unexpected: Unexpected) -> None:
        self.time_limit = TimeLimit(persona.max_call_seconds, unexpected)
        self.silence = Silence(persona.silence_timeout_seconds, unexpected)
        self.nudge = Nudge(unexpected)
        self.keypad = Keypad(unexpected)
        self.cadence = Cadence()
