"""Property-based bad input for the sans-I/O core: the Twilio parser and the ``Call``.

Hypothesis throws interleaved, out-of-order and malformed sequences of Twilio and model events
at one ``Call`` (on an injected clock that only moves forward) and checks the rules that must
hold whatever the input: nothing raises, the call ends once and then stays silent, every frame
is a real 20 ms (or shorter) μ-law frame, a uniquely named mark follows at least every 200 ms
of audio (plus one message) and names exactly the bytes sent, nothing of a cut reply is sent
after ``clear``, and the transcript and stats stay well-formed.

Budget: the ``ci`` profile (the default, in tests/conftest.py) is bounded and derandomised, so
CI is repeatable and fast; ``HYPOTHESIS_PROFILE=fuzz`` runs many more random examples for a
longer local hunt.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import EXAMPLE_PERSONAS
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from phoneagent.audio import pcm16_to_ulaw
from phoneagent.call import (
    FRAMES_PER_MESSAGE,
    MARK_EVERY_MS,
    Call,
    CallState,
    EndCall,
    HangUpCall,
    SendClear,
    SendMark,
    SendMedia,
    ToModel,
    TransferCall,
    TurnFinished,
)
from phoneagent.personas import load_directory
from phoneagent.realtime.base import (
    AgentTranscriptDelta,
    AgentTranscriptDone,
    AudioDelta,
    CancelResponse,
    ModelError,
    ResponseDone,
    ResponseStarted,
    SessionReady,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    TruncateItem,
    UserTranscript,
)
from phoneagent.twilio.wire.stream import (
    Connected,
    Dtmf,
    MalformedMessage,
    Mark,
    Media,
    Start,
    Stop,
    TwilioEvent,
    parse_message,
)

# 20 ms of 8 kHz μ-law is 160 bytes; the Call sends up to FRAMES_PER_MESSAGE frames at once.
MAX_MESSAGE_BYTES = 160 * FRAMES_PER_MESSAGE
HANDED_ON = (CallState.TRANSFERRING, CallState.HANGING_UP)

# --- the persona and the clock --------------------------------------------------------------

PERSONA = load_directory(EXAMPLE_PERSONAS, environ={}).personas["bright-smile-dental"]
LIMIT_MS = PERSONA.max_call_seconds * 1000


class StepClock:
    """The call's clock: moves only when the test says so, never backwards."""

    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms / 1000


# --- driver instructions: events that need the call's history to be meaningful --------------


@dataclass(frozen=True)
class CallerAudio:
    """A Twilio media frame whose timestamp moves by ``delta_ms`` from the previous frame's
    end: 0 is the normal stream, positive a gap, negative a timestamp going backwards."""

    delta_ms: int
    payload: bytes


@dataclass(frozen=True)
class EchoMark:
    """Twilio echoes one of the marks the call sent (picked by index), in or out of order."""

    index: int


@dataclass(frozen=True)
class Speak:
    """The model answers: a response starts and streams ``deltas`` (maybe finishing), so that
    agent audio is pending when the caller barges in. Each event is fed and checked alone."""

    response_id: str
    item_id: str
    deltas: tuple[bytes, ...]
    done: bool


@dataclass(frozen=True)
class ShellResult:
    """The shell reports how a REST request the call asked for went (``on_<kind>_result``),
    asked for or not: error None is success."""

    kind: str  # "transfer" or "hang_up"
    error: str | None


@dataclass(frozen=True)
class SocketClosed:
    side: str  # "twilio" or "model"


@dataclass(frozen=True)
class ModelReconnected:
    """The shell replaced a model session that dropped (or was renewed)."""


@dataclass(frozen=True)
class Step:
    advance_ms: int  # call time that passes before the event
    event: Any


# --- strategies -----------------------------------------------------------------------------

# Few ids, so that collisions (the same response twice, transcripts for items never heard of)
# are common. Each item id embeds its response id: a real model never moves an item from one
# response to another, and the "nothing of a cut reply after clear" oracle relies on that.
# "r9" is never started: its events are for an unknown response.
response_ids = st.sampled_from(["r1", "r2", "r3", "r9"])
caller_items = st.sampled_from(["u1", "u2", "u3"])


@st.composite
def agent_ids(draw) -> tuple[str, str]:
    response = draw(response_ids)
    return response, f"{response}.{draw(st.sampled_from(['a', 'b']))}"


def tone(ms: int, level: int) -> bytes:
    t = np.arange(ms * 24) / 24000
    return (np.sin(2 * np.pi * 440 * t) * level).astype("<i2").tobytes()


def ulaw_tone(loud: bool) -> bytes:
    t = np.arange(160) / 8000
    pcm = (np.sin(2 * np.pi * 300 * t) * (8000 if loud else 150)).astype("<i2").tobytes()
    return pcm16_to_ulaw(pcm)


# Model audio: arbitrary bytes (odd counts, tiny and large deltas) and plausible speech.
model_pcm = st.one_of(
    st.binary(max_size=2 * 4801),
    st.builds(tone, st.integers(1, 300), st.sampled_from([300, 8000])),
)
# Caller audio: arbitrary bytes, loud speech (drives the false barge-in guard) or line noise.
caller_payload = st.one_of(
    st.binary(max_size=400),
    st.sampled_from([ulaw_tone(True), ulaw_tone(False)]),
    st.integers(1, 20).map(lambda frames: ulaw_tone(True) * frames),  # a burst of speech
)
short_text = st.text(max_size=30)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    # NaN and ±Infinity included: Python's json writes them, and Twilio's parser must cope.
    | st.floats()
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


@st.composite
def audio_delta(draw) -> AudioDelta:
    response, item = draw(agent_ids())
    return AudioDelta(response, item, draw(model_pcm))


@st.composite
def agent_text(draw) -> AgentTranscriptDelta | AgentTranscriptDone:
    response, item = draw(agent_ids())
    kind = draw(st.sampled_from([AgentTranscriptDelta, AgentTranscriptDone]))
    return kind(response, item, draw(short_text))


@st.composite
def speak(draw) -> Speak:
    response, item = draw(agent_ids())
    deltas = draw(st.lists(model_pcm, min_size=1, max_size=8))
    return Speak(response, item, tuple(deltas), draw(st.booleans()))


# The tools the persona declares, with good and bad arguments, and tools that do not exist.
tool_arguments = st.one_of(
    st.builds(
        lambda target: json.dumps({"target": target}),
        st.sampled_from(sorted(PERSONA.transfer)) | json_values,
    ),
    json_values.map(json.dumps),
    st.text(max_size=20),
)
tool_calls = st.builds(
    ToolCall,
    response_ids,
    st.sampled_from(["c1", "c2"]),
    st.sampled_from(["transfer_call", "end_call"]) | short_text,
    tool_arguments,
)

model_events = st.one_of(
    speak(),
    audio_delta(),
    audio_delta(),  # listed twice: audio is most of what a model sends
    agent_text(),
    st.builds(ResponseStarted, response_ids),
    st.builds(ResponseDone, response_ids, st.sampled_from(["completed", "cancelled", "failed"])),
    st.builds(SpeechStarted, caller_items, st.integers(-10, 10**6)),
    st.builds(SpeechStarted, caller_items, st.just(0)),  # twice: barge-in is the hard part
    st.builds(SpeechStopped, caller_items, st.integers(-10, 10**6)),
    st.builds(UserTranscript, caller_items, short_text),
    st.builds(ModelError, short_text, short_text, st.booleans()),
    tool_calls,
    st.builds(SessionReady, short_text),
    st.just(SessionUpdated()),
)

twilio_events = st.one_of(
    st.builds(CallerAudio, st.integers(-500, 3000), caller_payload),
    st.builds(CallerAudio, st.just(0), caller_payload),  # the common case: no gap
    st.builds(Media, st.integers(-(10**6), 10**9), caller_payload),  # any timestamp at all
    # Near the persona's max_call_seconds: the agent is warned, then says goodbye.
    st.builds(Media, st.integers(-40_000, 5_000).map(lambda d: LIMIT_MS + d), caller_payload),
    st.builds(EchoMark, st.integers(0, 10**6)),
    st.builds(EchoMark, st.integers(0, 10**6)),
    st.builds(Mark, st.text(min_size=1, max_size=20)),  # echoes of marks never sent
    st.builds(Dtmf, st.sampled_from(list("0123456789*#"))),  # "0" is a keypad shortcut
    st.builds(Dtmf, st.text(min_size=1, max_size=3)),
    st.builds(ShellResult, st.sampled_from(["transfer", "hang_up"]), st.none() | short_text),
    st.just(ModelReconnected()),
    st.builds(Connected, short_text),
    # A second `start` in the middle of a call.
    st.builds(Start, st.just("MZ2"), st.just("CA2"), st.just("AC2")),
)

endings = st.one_of(
    st.builds(Stop, st.text(max_size=5)),
    st.builds(SocketClosed, st.sampled_from(["twilio", "model"])),
)


@st.composite
def barge_in_scenes(draw) -> list[Step]:
    """The hard part, made common: the agent talks, some of it plays, the caller talks over."""
    pause = st.integers(0, 300)
    scene = [Step(draw(pause), draw(speak()))]
    scene += [
        Step(draw(pause), EchoMark(i)) for i in draw(st.lists(st.integers(0, 10**6), max_size=3))
    ]
    scene.append(Step(draw(pause), SpeechStarted(draw(caller_items), 0)))
    if draw(st.booleans()):  # long enough to pass the false barge-in guard, or not
        scene.append(Step(draw(pause), CallerAudio(0, ulaw_tone(True) * draw(st.integers(1, 20)))))
    return scene


@st.composite
def tool_scenes(draw) -> list[Step]:
    """The model calls a tool, then its response ends (the tool is answered after that)."""
    tool_call = draw(tool_calls)
    done = ResponseDone(tool_call.response_id, draw(st.sampled_from(["completed", "cancelled"])))
    return [Step(draw(st.integers(0, 300)), tool_call), Step(draw(st.integers(0, 300)), done)]


@st.composite
def handoff_scenes(draw) -> list[Step]:
    """The model asks to transfer or hang up (or the call reaches max_call_seconds), the agent
    says the sentence, the caller hears all of it; then Twilio answers the REST request, or
    sends `stop`, or nothing happens yet."""
    pause = st.integers(0, 300)
    if draw(st.booleans()):
        response = draw(response_ids)
        name = draw(st.sampled_from(["transfer_call", "end_call"]))
        arguments = json.dumps({"target": draw(st.sampled_from(sorted(PERSONA.transfer)))})
        ask = [ToolCall(response, "c1", name, arguments), ResponseDone(response, "completed")]
    else:
        # Two frames: the first one past the warning point only warns the model.
        ask = [
            Media(LIMIT_MS + ms, ulaw_tone(False)) for ms in (-25_000, draw(st.integers(0, 999)))
        ]
    scene = [Step(draw(pause), event) for event in ask]
    scene += [
        Step(draw(pause), draw(speak())),
        Step(draw(pause), EchoMark(-1)),  # the last mark sent: everything has played
    ]
    then = st.builds(ShellResult, st.sampled_from(["transfer", "hang_up"]), st.none() | short_text)
    scene += [Step(draw(pause), e) for e in draw(st.lists(then | st.just(Stop("CA")), max_size=2))]
    return scene


@st.composite
def call_scripts(draw) -> tuple[int, list[Step]]:
    """A persona guard setting and a script of steps, maybe with an ending somewhere in it."""
    guard_ms = draw(st.sampled_from([0, 300]))
    single = st.builds(Step, st.integers(0, 300), st.one_of(model_events, twilio_events))
    scenes = single.map(lambda step: [step]) | barge_in_scenes() | tool_scenes() | handoff_scenes()
    chunks = draw(st.lists(scenes, max_size=60))
    steps = [step for chunk in chunks for step in chunk]
    # Most scripts end; the ending is placed anywhere, so events keep coming after it.
    ending = draw(st.none() | st.builds(Step, st.integers(0, 300), endings))
    if ending is not None:
        steps.insert(draw(st.integers(0, len(steps))), ending)
    return guard_ms, steps


# --- the oracle -----------------------------------------------------------------------------


class CallObserver:
    """Feeds one ``Call`` and checks every action list it returns against the invariants."""

    def __init__(self, guard_ms: int) -> None:
        self.clock = StepClock()
        persona = dataclasses.replace(PERSONA, barge_in_min_speech_ms=guard_ms)
        self.call = Call(persona, stream_sid="MZfuzz", call_sid="CAfuzz", clock=self.clock)
        self.marks: list[str] = []  # every mark name sent, in order
        # item id → μ-law bytes of its audio sent (8 per ms; a message may end mid-ms, so the
        # ms sent are the whole bytes' floor, not the sum of each message's)
        self.sent_bytes: Counter[str] = Counter()
        self.unmarked_bytes = 0  # sent since the last mark: the audio of the item being framed
        self.cleared_unmarked = 0  # what the last clear wrote off of that, never marked
        self.cut_responses: set[str] = set()  # responses whose audio must never be sent again
        self.active_response: str | None = None  # mirrors the Call: started and not done
        self.next_timestamp_ms = 0
        self.ended = False
        self.state = self.call.state
        self.was_playing = False  # Twilio had agent audio to play before the event
        self.fed: Any = None  # the event being fed to the call

    def run(self, steps: list[Step]) -> None:
        self.check(self.call.begin())
        for step in steps:
            self.clock.advance(step.advance_ms)
            for actions in self.feed(step.event):
                self.check(actions)
        self.check_final_state()

    def feed(self, event: Any) -> Iterator[list]:
        """Hand one step to the call; yield each action list it returns, to be checked."""
        call = self.call
        self.fed = event
        match event:
            case Speak(response_id, item_id, deltas, done):
                yield from self.feed(ResponseStarted(response_id))
                for pcm in deltas:
                    yield from self.feed(AudioDelta(response_id, item_id, pcm))
                if done:
                    yield from self.feed(ResponseDone(response_id, "completed"))
            case CallerAudio(delta_ms, payload):
                timestamp = max(0, self.next_timestamp_ms + delta_ms)
                self.next_timestamp_ms = timestamp + len(payload) // 8
                yield call.on_twilio(Media(timestamp, payload))
            case EchoMark(index):
                if self.marks:
                    yield call.on_twilio(Mark(self.marks[index % len(self.marks)]))
            case ShellResult("transfer", error):
                yield call.on_transfer_result(error)
            case ShellResult("hang_up", error):
                yield call.on_hang_up_result(error)
            case SocketClosed(side):
                # The shell stops feeding a call that ended (test_nothing_happens_to_a_call_...).
                if not self.ended:
                    yield call.on_twilio_closed() if side == "twilio" else call.on_model_closed()
            case ModelReconnected():
                if not self.ended:  # likewise
                    self.active_response = None  # the new session is generating nothing
                    yield call.on_model_reconnected()
            case ResponseStarted(response_id):
                if not self.ended:
                    self.active_response = response_id
                yield call.on_model(event)
            case ResponseDone(response_id, _):
                if not self.ended and self.active_response == response_id:
                    self.active_response = None
                yield call.on_model(event)
            case _ if isinstance(event, TwilioEvent):
                yield call.on_twilio(event)
            case _:
                yield call.on_model(event)

    def check(self, actions: list) -> None:
        """Check the actions of one call to the Call (``self.state`` is its state before)."""
        assert isinstance(actions, list)
        if self.ended:
            assert actions == [], "a call that ended must not act again"
            assert self.call.ended
            return
        # Once Twilio was asked to transfer or end the call, the agent has had its last word.
        handed_on = self.state in HANDED_ON and self.call.state in HANDED_ON
        for i, action in enumerate(actions):
            match action:
                case SendMedia(payload):
                    assert not handed_on, f"agent audio sent while {self.call.state}"
                    assert 0 < len(payload) <= MAX_MESSAGE_BYTES
                    self.unmarked_bytes += len(payload)
                    assert self.unmarked_bytes <= MARK_EVERY_MS * 8 + MAX_MESSAGE_BYTES, (
                        "a mark at least every 200 ms of audio, plus one message"
                    )
                case SendMark(name):
                    assert name not in self.marks, f"mark name {name} repeats"
                    item_id, _, _ = name.rpartition(":")
                    response_id = item_id.split(".")[0]
                    assert response_id not in self.cut_responses, (
                        f"audio of {item_id}, cut by an earlier clear, was sent after it"
                    )
                    self.sent_bytes[item_id] += self.unmarked_bytes
                    self.unmarked_bytes = 0
                    assert int(name.rpartition(":")[2]) == self.sent_bytes[item_id], (
                        f"mark {name} does not name the bytes of {item_id} sent"
                    )
                    self.marks.append(name)
                case SendClear():
                    event("barge-in")
                    self.cleared_unmarked, self.unmarked_bytes = self.unmarked_bytes, 0
                    # A clear cuts the reply being generated (if any) and every item whose
                    # audio was pending; the TruncateItems that follow name those items.
                    cancelled = any(
                        isinstance(a, ToModel) and isinstance(a.command, CancelResponse)
                        for a in actions
                    )
                    if cancelled:
                        assert self.active_response is not None
                        self.cut_responses.add(self.active_response)
                    self.active_response = None
                case ToModel(TruncateItem(item_id, audio_end_ms)):
                    sent = self.sent_bytes[item_id] + self.cleared_unmarked
                    assert 0 <= audio_end_ms <= sent // 8
                    assert any(isinstance(a, SendClear) for a in actions[:i]), (
                        "a truncate only ever follows a clear"
                    )
                    self.cut_responses.add(item_id.split(".")[0])
                case ToModel(CancelResponse()):
                    if not any(isinstance(a, SendClear) for a in actions[:i]):
                        # No clear: a response that said nothing for too long, given up on
                        # (nothing of it was playing; what was sent of it gets its last mark);
                        # none of its audio may be sent later.
                        assert self.active_response is not None
                        assert not self.was_playing
                        self.cut_responses.add(self.active_response)
                        self.active_response = None
                case TurnFinished(turn):
                    json.dumps(turn)
                case TransferCall() | HangUpCall():
                    event(f"handed on: {type(action).__name__}")
                case EndCall():
                    assert action is actions[-1], "nothing follows the end of a call"
                    assert self.call.ended and self.call.end_reason is action.reason
                    self.ended = True
                    event(f"ended: {action.reason.value}")
        # After all of them: the call's observable state is well-formed.
        self.state = self.call.state
        self.was_playing = self.call._playback.playing
        self.check_final_state()

    def check_final_state(self) -> None:
        transcript = self.call.transcript
        json.dumps(transcript)
        starts = [turn["start_ms"] for turn in transcript]
        assert starts == sorted(starts)
        stats = self.call.stats
        assert stats.discarded_ms >= 0
        json.dumps(stats.as_dict())


# --- the Call -------------------------------------------------------------------------------


@given(call_scripts())
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_any_sequence_of_events_keeps_the_call_consistent(script):
    guard_ms, steps = script
    CallObserver(guard_ms).run(steps)


# --- the Twilio parser ----------------------------------------------------------------------

PAYLOAD = base64.b64encode(b"\xff" * 160).decode()
VALID_MESSAGES: list[dict[str, Any]] = [
    {"event": "connected", "protocol": "Call", "version": "1.0.0"},
    {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": "MZ1",
        "start": {
            "streamSid": "MZ1",
            "accountSid": "AC1",
            "callSid": "CA1",
            "tracks": ["inbound"],
            "customParameters": {"persona": "dental", "token": "t"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    },
    {
        "event": "media",
        "sequenceNumber": "3",
        "streamSid": "MZ1",
        "media": {"track": "inbound", "chunk": "1", "timestamp": "5", "payload": PAYLOAD},
    },
    {"event": "mark", "sequenceNumber": "4", "streamSid": "MZ1", "mark": {"name": "a:20"}},
    {"event": "dtmf", "streamSid": "MZ1", "dtmf": {"track": "inbound_track", "digit": "1"}},
    {"event": "stop", "streamSid": "MZ1", "stop": {"accountSid": "AC1", "callSid": "CA1"}},
]


@st.composite
def mutated_messages(draw) -> dict[str, Any]:
    """A valid Twilio message with one field (at any depth) deleted or replaced by any JSON."""
    message = json.loads(json.dumps(draw(st.sampled_from(VALID_MESSAGES))))
    node = message
    while True:  # walk down a random path of nested objects
        key = draw(st.sampled_from(sorted(node)))
        child = node[key]
        if isinstance(child, dict) and child and draw(st.booleans()):
            node = child
            continue
        if draw(st.booleans()):
            del node[key]
        else:
            node[key] = draw(json_values)
        return message


def parses_or_refuses(text: str | bytes) -> None:
    """The parser's contract: a typed event, or MalformedMessage; nothing else escapes."""
    try:
        event = parse_message(text)
    except MalformedMessage:
        return
    assert isinstance(event, TwilioEvent)


@given(st.text() | st.binary())
def test_parser_refuses_arbitrary_text_and_bytes_cleanly(data):
    parses_or_refuses(data)


@given(mutated_messages())
@example({"event": "media", "media": {"timestamp": float("nan"), "payload": ""}})
@example({"event": "media", "media": {"timestamp": "1e5", "payload": "not base64!"}})
def test_parser_refuses_mutated_messages_cleanly(message):
    parses_or_refuses(json.dumps(message))


# --- bugs the fuzzers found (now fixed), kept as one example each -----------------------------


@pytest.mark.parametrize("timestamp", ["Infinity", "-Infinity", "1e999"])
def test_parser_refuses_an_infinite_timestamp(timestamp):
    parses_or_refuses(f'{{"event": "media", "media": {{"timestamp": {timestamp}, "payload": ""}}}}')


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_parser_refuses_deeply_nested_json(opening):
    parses_or_refuses(opening * 20_000)


@pytest.mark.parametrize("event", ["[]", "{}", '["media"]'])
def test_parser_refuses_an_event_that_is_not_a_string(event):
    parses_or_refuses(f'{{"event": {event}, "streamSid": "MZ1"}}')


def test_a_sub_millisecond_tail_gets_its_own_mark():
    call = CallObserver(guard_ms=0).call
    # 197 ms at 24 kHz, plus the resampler's flushed delay, is 10 frames and a 2-byte tail.
    actions = call.on_model(AudioDelta("r1", "r1.a", tone(197, 300)))
    actions += call.on_model(ResponseDone("r1", "completed"))
    media = [a.payload for a in actions if isinstance(a, SendMedia)]
    assert 0 < len(media[-1]) % 160 < 8  # the flushed tail, under 1 ms, rides in the last message
    names = [a.name for a in actions if isinstance(a, SendMark)]
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize("what", ["twilio_closed", "model_closed", "model_reconnected"])
def test_nothing_happens_to_a_call_after_it_ended(what):
    call = CallObserver(guard_ms=0).call
    call.on_model(AgentTranscriptDone("r1", "r1.a", "Hello, Bright Smile Dental."))
    [ended] = call.on_twilio(Stop("CAfuzz"))
    assert getattr(call, f"on_{what}")() == []
    assert call.end_reason is ended.reason


@pytest.mark.parametrize("target", ["[]", "{}", '["front_desk"]'])
def test_a_transfer_to_a_target_that_is_not_a_string_is_refused(target):
    call = CallObserver(guard_ms=0).call
    call.on_model(ToolCall("r1", "c1", "transfer_call", f'{{"target": {target}}}'))
    actions = call.on_model(ResponseDone("r1", "completed"))
    outputs = [a.command for a in actions if isinstance(a, ToModel)]
    assert any(getattr(o, "output", "").startswith("error") for o in outputs), outputs
    assert not call.ended


@pytest.mark.parametrize("then", ["response_done", "model_reconnected"])
def test_no_audio_is_flushed_once_the_call_is_handed_on(then):
    call = CallObserver(guard_ms=300).call
    call.begin()
    call.on_model(ToolCall("r1", "c1", "end_call", "{}"))
    call.on_model(ResponseDone("r1", "completed"))  # the goodbye is asked for
    call.on_model(ResponseStarted("r2"))
    goodbye = call.on_model(AudioDelta("r2", "r2.a", tone(100, 8000)))
    goodbye += call.on_model(ResponseDone("r2", "completed"))
    call.on_model(ResponseStarted("r3"))  # the model goes on talking after the goodbye
    call.on_model(AudioDelta("r3", "r3.a", tone(50, 8000)))
    last_mark = [a.name for a in goodbye if isinstance(a, SendMark)][-1]
    assert call.on_twilio(Mark(last_mark)) == [HangUpCall()]  # the goodbye was heard
    if then == "response_done":
        actions = call.on_model(ResponseDone("r3", "completed"))
    else:
        actions = call.on_model_reconnected()
    assert [a for a in actions if isinstance(a, SendMedia)] == []
