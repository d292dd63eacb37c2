"""Property-based bad input at the media-stream endpoint, over real sockets on loopback.

One server (``LocalStack``, fake model) takes every example. Each example is one call whose
Twilio side misbehaves: garbage text and binary frames, JSON that is not a Twilio message,
mutated Twilio messages, messages out of order (media and `stop` before `start`, a second
`start`, media after `stop`) and frames over the 64 KiB cap. Whatever was sent:

- the bad call continues (a later `stop` is still understood: the call ends as hung up), or it
  ends cleanly (the server closes the socket and records why);
- no model session outlives its call, and no server task is left behind;
- the server stays up: `/healthz` answers and a fresh call hears the greeting.

Real sockets are slow next to the pure ``Call`` fuzzing in test_fuzz_call.py, so the number of
examples here is small (15 under the default ``ci`` profile).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass

import aiohttp
import pytest
from conftest import EXAMPLE_PERSONAS
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

# The message strategies live with the parser fuzzing (the Hypothesis profiles: conftest.py).
from test_fuzz_call import PAYLOAD, json_values, mutated_messages

from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.stack import LocalStack
from phoneagent.twilio.routes.media_stream import MAX_STREAM_MESSAGE_BYTES
from phoneagent.twilio.wire.stream import MalformedMessage, Start, Stop, parse_message

DENTAL = "+14155550100"
SOCKET_EXAMPLES = {"fuzz": 150}.get(os.environ.get("HYPOTHESIS_PROFILE", "ci"), 15)
# Pre-warmed sessions of streams refused before `start` are closed after this long.
PREWARM_TTL = 0.3
WAIT = 5.0  # seconds: a failure guard only, never a measured duration


# --- what a misbehaving Twilio sends ----------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One WebSocket frame to send as is. ``ends``: what the server must make of it. None:
    skip it, the call goes on; "stop": the caller hung up (once started); "start": a `start`
    (before the real one it is taken as the start, and refused: its token is not valid);
    "too_big": over the 64 KiB cap, the server closes the socket."""

    data: str | bytes
    ends: str | None = None

    def __repr__(self) -> str:  # frames over the cap would swamp Hypothesis's report
        if len(self.data) <= 80:
            return f"Frame({self.data!r}, ends={self.ends!r})"
        return f"Frame({self.data[:20]!r} + {len(self.data) - 20} more, ends={self.ends!r})"


def frame(data: str | bytes) -> Frame:
    """A frame, told what the server will make of it by the parser itself."""
    if isinstance(data, bytes):
        return Frame(data)  # Twilio never sends binary frames: skipped
    try:
        event = parse_message(data)
    except MalformedMessage:
        return Frame(data)
    ends = {Stop: "stop", Start: "start"}.get(type(event))
    return Frame(data, ends)


def message(event: str, **body) -> str:
    return json.dumps({"event": event, "streamSid": "MZfuzz", **body})


def media(timestamp, payload=PAYLOAD) -> str:
    return message("media", media={"track": "inbound", "timestamp": timestamp, "payload": payload})


STOP = message("stop", stop={"callSid": "CAfuzz"})
# Another `start`, without a token: the stream's own comes first, or this one is refused.
SECOND_START = message("start", start={"streamSid": "MZ2", "callSid": "CA2"})


def frames_of(data: st.SearchStrategy) -> st.SearchStrategy[Frame]:
    return data.map(frame)


junk = frames_of(
    st.one_of(
        st.text(max_size=200),
        st.binary(max_size=200),
        json_values.map(json.dumps),  # JSON, but not a Twilio message
        mutated_messages().map(json.dumps),  # a Twilio message with one field wrong
    )
)
out_of_order = frames_of(
    st.one_of(
        st.builds(media, st.integers(-(10**9), 10**12) | st.text(max_size=8)),
        st.text(min_size=1, max_size=20).map(lambda name: message("mark", mark={"name": name})),
        st.sampled_from("0123456789*#").map(lambda d: message("dtmf", dtmf={"digit": d})),
        st.just(message("connected", protocol="Call", version="1.0.0")),
        st.just(SECOND_START),
        st.just(STOP),
    )
)
too_big = st.sampled_from(["x", b"x"]).map(
    lambda unit: Frame(unit * (MAX_STREAM_MESSAGE_BYTES + 1), "too_big")
)


@dataclass(frozen=True)
class BadStream:
    before_start: list[Frame]  # after `connected`, before `start`
    during: list[Frame]  # once the greeting plays


@st.composite
def bad_streams(draw) -> BadStream:
    frames = junk | out_of_order
    before = draw(st.lists(frames, max_size=4))
    during = draw(st.lists(frames, max_size=8))
    if draw(st.sampled_from([False, False, False, True])):  # now and then a frame over the cap
        where = draw(st.sampled_from([before, during]))
        where.insert(draw(st.integers(0, len(where))), draw(too_big))
    return BadStream(before, during)


def first_ending(frames: list[Frame], *, started: bool) -> str | None:
    """What ends the stream first, if anything: before `start` a `stop` is skipped like any
    message that is not `start`; after it, a `start` is skipped like any other."""
    for f in frames:
        if f.ends == "too_big" or f.ends == ("stop" if started else "start"):
            return f.ends
    return None


# --- the server -------------------------------------------------------------------------------


@pytest.fixture
async def model():
    return FakeRealtimeServer(speed=None, script=["Sure, what day works for you?"])


@pytest.fixture
async def stack(model):
    async with LocalStack(EXAMPLE_PERSONAS, model=model, prewarm_ttl=PREWARM_TTL) as stack:
        yield stack


async def send_all(caller, frames: list[Frame]) -> None:
    for frame in frames:
        # Once the server has closed the socket (as it must after `stop` or a frame over the
        # cap), later sends may fail or vanish: that is the server's right, not a failure.
        if caller.closed:
            return
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):
            await caller.send_raw(frame.data)


async def assert_server_serves_a_fresh_call(stack) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{stack.base_url}/healthz") as response:
        assert response.status == 200
    async with stack.caller(to=DENTAL, speed=0) as caller:
        answer = await caller.dial()
        assert answer.ok, answer.problems
        await caller.connect()
        await caller.wait_for_event("media", timeout=WAIT)  # the greeting
        await caller.hangup()
    assert (await ended_record(stack, caller.call_sid)).end_reason == "caller_hung_up"


async def ended_record(stack, call_sid: str):
    """The call's record once the server has finished with the call (just after the socket
    closed, the server may still be writing it)."""
    for _ in range(int(WAIT / 0.02)):
        record = stack.state.calls.get(call_sid)
        if record is not None and (record.ended_at or record.started_at is None):
            return record
        await asyncio.sleep(0.02)
    return stack.state.calls.get(call_sid)


# The bare waits a long-lived service makes on each turn of its loop (the webhook delivery
# worker's `sleep(delay)` or `wake.wait()`): new tasks every few seconds, not per call, so not
# a leak. Every task a call starts runs a coroutine of its own (pumps, handlers, sockets).
IDLE_WAITS = {asyncio.sleep.__code__, asyncio.Event.wait.__code__}


def is_idle_wait(task: asyncio.Task) -> bool:
    return getattr(task.get_coro(), "cr_code", None) in IDLE_WAITS


async def wait_until_nothing_is_left(stack, model, baseline: set[asyncio.Task]) -> None:
    """No call, no model session and no task the calls started is still around."""
    await model.wait_for(lambda: model.sessions_open == 0, WAIT)
    leftover: list[asyncio.Task] = []
    for _ in range(int(WAIT / 0.02)):
        leftover = [t for t in asyncio.all_tasks() if t not in baseline and not is_idle_wait(t)]
        leftover = [t for t in leftover if t is not asyncio.current_task()]
        if not leftover and not stack.state.active_calls and not stack.state.prewarmer.waiting:
            break
        await asyncio.sleep(0.02)
    assert stack.state.active_calls == {}
    assert stack.state.prewarmer.waiting == 0
    assert leftover == []


# --- the property -----------------------------------------------------------------------------


@given(script=bad_streams())
@example(script=BadStream([frame(media("0")), frame(STOP)], []))  # media and stop before start
@example(script=BadStream([], [frame(SECOND_START), frame(media("-40"))]))  # two starts
@example(script=BadStream([], [frame(STOP), frame(media("20"))]))  # media after stop
@example(script=BadStream([], [Frame("x" * (MAX_STREAM_MESSAGE_BYTES + 1), "too_big")]))
@example(script=BadStream([Frame(b"x" * (MAX_STREAM_MESSAGE_BYTES + 1), "too_big")], []))
@example(script=BadStream([frame("not json")], [frame(b"\x00\xff"), frame("[]")]))
@settings(
    max_examples=SOCKET_EXAMPLES,
    # One server on purpose: it must survive every example, so they all share the fixtures.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
async def test_bad_frames_never_take_the_server_down_or_leak(stack, model, script):
    baseline = set(asyncio.all_tasks())
    async with stack.caller(to=DENTAL, speed=0) as caller:
        await caller.dial()
        await caller.connect(send_start=False)
        await send_all(caller, script.before_start)
        ending = first_ending(script.before_start, started=False)
        event(f"refused before start: {ending}" if ending else "started")
        if ending is None:
            await caller.send_start()
            await caller.wait_for_event("media", timeout=WAIT)  # the greeting: the call is up
            await send_all(caller, script.during)
            ending = first_ending(script.during, started=True)
            event(f"ended by: {ending}")

        if ending is None:
            # Nothing sent should have ended the call: it is still served, and Twilio is still
            # understood, since the `stop` of this hang-up ends it as hung up.
            assert not caller.closed, caller.describe()
            await caller.hangup()
        else:
            await caller.wait_closed(timeout=WAIT)
            assert caller.closed_by_server, caller.describe()

    await wait_until_nothing_is_left(stack, model, baseline)
    record = await ended_record(stack, caller.call_sid)
    if record.started_at is None:  # refused before `start`: only the webhook's record is left
        assert ending in ("start", "too_big")
    else:
        expected = {None: "caller_hung_up", "stop": "caller_hung_up"}
        assert record.end_reason == expected.get(ending, "twilio_disconnected")
    await assert_server_serves_a_fresh_call(stack)
    await wait_until_nothing_is_left(stack, model, baseline)


# --- bugs the fuzzers found (now fixed), kept as one example each -----------------------------


@pytest.mark.parametrize(
    "frame",
    [
        '{"event": [], "streamSid": "MZfuzz"}',
        "[" * 20_000,
        '{"event": "media", "media": {"timestamp": Infinity, "payload": ""}}',
    ],
)
async def test_a_frame_the_parser_chokes_on_is_skipped(stack, model, frame):
    async with stack.caller(to=DENTAL, speed=0) as caller:
        await caller.dial()
        await caller.connect()
        await caller.wait_for_event("media", timeout=WAIT)
        await caller.send_raw(frame)
        # Frames are read in order: if the bad one was skipped, this `stop` is understood.
        await caller.hangup()
    await model.wait_for(lambda: model.sessions_open == 0, WAIT)
    assert (await ended_record(stack, caller.call_sid)).end_reason == "caller_hung_up"
