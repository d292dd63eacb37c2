"""The console's Calls through HTTP: live calls, recent calls searched, a call's page, and its
event stream as a real call (scripted Twilio caller, fake model) goes by."""

from __future__ import annotations

import asyncio
import json
import re
import time
from types import SimpleNamespace

import aiohttp
import pytest
from console_kit import PASSWORD

from phoneagent.audio import pcm16_to_ulaw
from phoneagent.console import call_events
from phoneagent.delivery.events import call_ended_event
from phoneagent.records import Answered, StreamEnded, StreamStarted, TurnFinished, TwilioReported
from phoneagent.testing.speech import synthesize

DENTAL = "+14155550100"
LUCA = "+14155550142"
UNKNOWN_SID = "CA" + "e" * 32
SSE = {"Accept": "text/event-stream"}
PAGE = {"Accept": "text/html"}


async def sign_in(http) -> None:
    async with http.post(
        "/console/login", data={"password": PASSWORD, "next": "/console/lines"},
        allow_redirects=False,
    ) as response:  # fmt: skip
        assert response.status == 303


def sid(n: int) -> str:
    return f"CA{n:032x}"


def record_call(state, call_sid, *, caller="+14155550123", persona="bright-smile-dental",
                called=DENTAL, started=None, turns=(), end="caller_hung_up"):  # fmt: skip
    """A call as the call path records it (this instance's view), ended unless ``end`` is
    None."""
    started = time.time() - 60 if started is None else started
    state.calls.note(call_sid, Answered(persona, caller, called))
    state.calls.note(call_sid, StreamStarted(at=started, persona=persona, model_session="sess",
                                             caller=caller, called=called))  # fmt: skip
    for turn in turns:
        state.calls.note(call_sid, TurnFinished(turn))
    if end is not None:
        state.calls.note(call_sid, StreamEnded(at=started + 42, end_reason=end,
                                               transcript=list(turns),
                                               stats={"first_agent_audio_ms": 480,
                                                      "barge_ins": 1, "barge_ins_ignored": 2,
                                                      "barge_in_reaction_ms": [12.0, 30.5],
                                                      "discarded_agent_ms": 900}))  # fmt: skip


def turn(role, text, start_ms=0, interrupted=False):
    return {"role": role, "text": text, "start_ms": start_ms, "end_ms": start_ms + 900,
            "interrupted": interrupted}  # fmt: skip


async def text_of(http, path, status=200):
    async with http.get(path, headers=PAGE, allow_redirects=False) as response:
        body = await response.text()
        assert response.status == status, body
        return body


# --- the door ---------------------------------------------------------------------------------


async def test_without_a_session_calls_pages_redirect_and_their_data_and_stream_are_401(http):
    for path in ("/console/live", "/console/calls", f"/console/calls/{UNKNOWN_SID}"):
        async with http.get(path, headers=PAGE, allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"] == f"/console/login?next={path}"
    for path in ("/console/live/calls.json", f"/console/calls/{UNKNOWN_SID}/events"):
        async with http.get(path, headers=SSE, allow_redirects=False) as response:
            assert response.status == 401
            assert response.content_type == "application/json"


async def test_a_call_sid_that_is_not_one_is_404_before_any_lookup(http, console_stack):
    await sign_in(http)
    for bad in ("CA123", "CA" + "g" * 32, "ca" + "e" * 32, "CA" + "e" * 33, "..%2F..%2Fetc"):
        async with http.get(f"/console/calls/{bad}", headers=PAGE) as response:
            assert response.status == 404
        async with http.get(f"/console/calls/{bad}/events", headers=SSE) as response:
            assert response.status == 404
    assert "No such call" in await text_of(http, f"/console/calls/{UNKNOWN_SID}", status=404)
    async with http.get(f"/console/calls/{UNKNOWN_SID}/events", headers=SSE) as response:
        assert response.status == 404


# --- recent calls and a call's page ---------------------------------------------------------


async def test_recent_calls_are_found_by_number_line_and_date(http, console_stack):
    state = console_stack.state
    day = 86400.0
    record_call(state, sid(1), caller="+14155550123", started=1_767_268_800.0)  # 2026-01-01
    record_call(state, sid(2), caller="+442071234567", started=1_767_268_800.0 + 2 * day,
                persona="trattoria-luca", called=LUCA)  # fmt: skip
    record_call(state, sid(3), caller="+14155550199", end=None)  # in progress, now
    await sign_in(http)

    every = await text_of(http, "/console/calls")
    assert every.index(sid(3)) < every.index(sid(2)) < every.index(sid(1))  # newest first
    assert "3 calls, newest first" in every
    found = await text_of(http, "/console/calls?number=%2B44+20+7123")  # spaced as people type
    assert sid(2) in found and sid(1) not in found and sid(3) not in found
    found = await text_of(http, "/console/calls?persona=bright-smile-dental")
    assert sid(1) in found and sid(3) in found and sid(2) not in found
    found = await text_of(http, "/console/calls?from=2026-01-03&to=2026-01-03")
    assert sid(2) in found and sid(1) not in found and sid(3) not in found
    assert 'value="2026-01-03"' in found  # the form keeps what was searched
    found = await text_of(
        http, "/console/calls?from=2026-01-01&to=2026-01-02&persona=trattoria-luca"
    )
    assert "0 calls" in found


async def test_a_search_with_mistakes_says_which_field_and_finds_nothing(http, console_stack):
    record_call(console_stack.state, sid(1))
    await sign_in(http)
    page = await text_of(http, "/console/calls?number=abc&from=yesterday&to=2026-13-01", 400)
    assert "Type the number&#39;s digits" in page
    assert page.count("Type a date as YYYY-MM-DD.") == 2
    assert 'aria-invalid="true"' in page and 'role="alert"' in page
    assert sid(1) not in page
    page = await text_of(http, "/console/calls?from=2026-02-02&to=2026-02-01", 400)
    assert "The last day is before the first." in page
    page = await text_of(http, "/console/calls?persona=%3Cscript%3E", 400)
    assert "<script>" not in page


async def test_a_calls_page_shows_its_transcript_as_text_and_what_became_of_it(http, console_stack):
    state = console_stack.state
    turns = [
        turn("agent", "Bright Smile Dental, how can I help?"),
        turn("caller", '<script>alert("owned")</script> & <b>bold</b>', 2000),
        turn("agent", "We are open Monday to", 4000, interrupted=True),
    ]
    record_call(state, sid(7), turns=turns, end="transferred")
    state.calls.note(sid(7), TwilioReported({"CallStatus": "completed", "CallDuration": "42",
                                             "Timestamp": "Thu, 01 Jan 2026 00:00:42 +0000",
                                             "path": "/twilio/call-status"}))  # fmt: skip
    from phoneagent.records import TransferNotAnswered, Transferred

    state.calls.note(sid(7), Transferred({"target": "front_desk", "number": "+14155550999"}))
    await sign_in(http)
    page = await text_of(http, f"/console/calls/{sid(7)}")
    assert "<script>alert" not in page and "<b>bold" not in page
    assert (
        "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    )
    transcript = page[page.index('id="transcript"') : page.index('id="transcript-empty"')]
    assert transcript.count('class="turn ') == 3
    assert transcript.count("interrupted: the caller talked over the agent") == 1
    assert 'class="turn agent interrupted"' in transcript
    assert "transferred" in page and "front_desk (+14155550999)" in page
    assert "480 ms" in page  # time to first audio
    assert "median 21.2 ms, longest 30.5 ms" in page
    assert "Barge-ins</dt><dd>1" in page.replace("\n", "")
    assert "completed" in page and "CallDuration 42" in page
    assert "This line has no webhook." in page  # the example personas have none
    assert 'data-live="false"' in page and "call.js" not in page  # over: nothing to follow

    # Nobody answered the transfer: the caller came back, and the page says so.
    state.calls.note(sid(7), TransferNotAnswered("no-answer"))
    page = await text_of(http, f"/console/calls/{sid(7)}")
    assert "front_desk (+14155550999), not answered (no-answer)" in page
    assert "+14155550123" in page  # the dental line does not mask its callers


ARGS = dict(
    persona_id="bright-smile-dental", persona_name="Bright Smile", from_number="+14155550123",
    to_number=DENTAL, started_at=1.0, ended_at=2.0, end_reason="caller_hung_up", transcript=[],
)  # fmt: skip


async def test_a_calls_page_lists_the_delivery_of_its_events(http, console_stack):
    state = console_stack.state
    record_call(state, sid(8))
    event = call_ended_event(**{**ARGS, "call_sid": sid(8)})
    outbox = state.publisher.worker.outbox
    url = "https://crm.example/hooks?token=do-not-show"
    await outbox.enqueue(event, url=url, secret_env="X", now=time.time() + 3600)
    another = call_ended_event(**{**ARGS, "call_sid": sid(9)})
    await outbox.enqueue(another, url=url, secret_env="X", now=time.time() + 3600)
    await sign_in(http)
    page = await text_of(http, f"/console/calls/{sid(8)}")
    deliveries = page[page.index('id="deliveries"') :]
    assert event.id in deliveries and "call.ended" in deliveries and "pending" in deliveries
    assert "https://crm.example:443" in deliveries and "do-not-show" not in page
    assert deliveries.count("<tr>") == 2  # the header and this call's one event


async def test_a_line_that_masks_its_callers_is_masked_everywhere(hooked_console_stack):
    stack = hooked_console_stack
    record_call(stack.state, sid(4), caller="+14155550123")
    record_call(stack.state, sid(5), caller="+14155550177", persona="gone-persona")
    async with aiohttp.ClientSession(
        base_url=stack.base_url, cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as http:
        await sign_in(http)
        listing = await text_of(http, "/console/calls?number=0123")
        assert "+*******0123" in listing and "+14155550123" not in listing
        page = await text_of(http, f"/console/calls/{sid(4)}")
        assert "Call from +*******0123" in page and "+14155550123" not in page
        # A call whose persona is no longer configured: whether it masked is unknown, so it is.
        page = await text_of(http, f"/console/calls/{sid(5)}")
        assert "+*******0177" in page and "+14155550177" not in page


# --- live calls and the event stream --------------------------------------------------------


class EventReader:
    """The server-sent events of a response, as they come; ``next(kind)`` takes the first of
    that kind not taken yet (others wait their turn)."""

    def __init__(self, response) -> None:
        self._events = self._read(response)
        self._waiting: list[dict] = []

    @staticmethod
    async def _read(response):
        fields: dict[str, str] = {}
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if not line:
                if "event" in fields:
                    yield fields | {"json": json.loads(fields["data"])}
                fields = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                fields[key] = value

    async def next(self, kind: str, timeout: float = 20.0) -> dict:
        for event in self._waiting:
            if event["event"] == kind:
                self._waiting.remove(event)
                return event
        async with asyncio.timeout(timeout):
            async for event in self._events:
                if event["event"] == kind:
                    return event
                self._waiting.append(event)
        raise AssertionError(f"the stream ended before a {kind!r} event")

    async def rest(self, timeout: float = 5.0) -> list[dict]:
        """The events left until the stream closes."""
        async with asyncio.timeout(timeout):
            return self._waiting + [event async for event in self._events]


def caller_speech(text: str) -> bytes:
    return pcm16_to_ulaw(synthesize(text, sample_rate=8000))


async def eventually(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_a_live_calls_turns_arrive_as_they_finish_and_the_stream_ends_with_it(
    http, console_stack
):
    state = console_stack.state
    persona = state.persona("bright-smile-dental")
    await sign_in(http)
    async with console_stack.caller(to=DENTAL) as caller:
        await caller.dial()
        await caller.connect()
        caller.start_background_silence()
        await eventually(lambda: caller.call_sid in state.active_calls)
        path = f"/console/calls/{caller.call_sid}/events"

        async with http.get("/console/live/calls.json") as response:
            [live] = (await response.json())["calls"]
        assert (live["call_sid"], live["caller"], live["here"]) == (caller.call_sid, caller.from_,
                                                                     True)  # fmt: skip
        assert live["persona"] == persona.name and live["state"] == "talking"
        assert caller.call_sid in await text_of(http, "/console/live")

        async with http.get(path, headers=SSE) as stream:
            assert stream.status == 200
            assert stream.content_type == "text/event-stream"
            events = EventReader(stream)
            greeting = await events.next("turn")
            assert greeting["id"] == "1"
            assert greeting["json"] | {"at": "0:00"} == {
                "index": 0, "role": "agent", "text": persona.greeting, "at": "0:00",
                "interrupted": False,
            }  # fmt: skip
            status = await events.next("status")
            assert status["json"]["state"] == "talking" and status["json"]["transfer"] == ""

            await caller.wait_until_quiet(300, timeout=20)
            await caller.play(caller_speech("I would like to book a cleaning please."))
            said = await events.next("turn")  # as the model finished hearing it
            assert (said["id"], said["json"]["role"]) == ("2", "caller")
            assert said["json"]["text"].startswith("(caller spoke for")
            answer = await events.next("turn")
            assert (answer["id"], answer["json"]["role"]) == ("3", "agent")
            assert answer["json"]["text"] == "This is the built-in fake model. I heard you."

            # A browser that reconnects says what it has: it gets what it missed, only.
            async with http.get(path, headers=SSE | {"Last-Event-ID": "2"}) as again:
                resumed = await EventReader(again).next("turn")
                assert (resumed["id"], resumed["json"]["role"]) == ("3", "agent")
            # That stream closed with its page: its listener went with it.
            await eventually(lambda: len(state.turn_listeners) == 2, timeout=5)

            await caller.hangup()
            ended = await events.next("ended")
            assert ended["json"] == {"end_reason": "caller_hung_up", "end": "the caller hung up",
                                     "transfer": ""}  # fmt: skip
            left = [e["event"] for e in await events.rest()]  # until the stream closes
            assert set(left) <= {"status"}
    assert len(state.turn_listeners) == 1  # the state's own: nothing of the console's is left
    async with http.get("/console/live/calls.json") as response:
        assert (await response.json())["calls"] == []
    async with http.get(path, headers=SSE) as stream:  # an ended call's stream says so at once
        ended = await EventReader(stream).next("ended")
        assert ended["json"]["end_reason"] == "caller_hung_up"


async def test_a_barge_in_and_a_transfer_are_streamed_as_they_happen(http, console_stack):
    state = console_stack.state
    await sign_in(http)
    async with console_stack.caller(to=DENTAL) as caller:
        await caller.dial()
        await caller.connect()
        caller.start_background_silence()
        await eventually(lambda: caller.call_sid in state.active_calls)
        async with http.get(f"/console/calls/{caller.call_sid}/events", headers=SSE) as stream:
            events = EventReader(stream)
            await caller.wait_until_heard_ms(300, timeout=30)
            await caller.send_dtmf("0")  # the dental line's keypad: transfer to the front desk
            cut = await events.next("turn")  # the greeting, cut where the caller was
            assert cut["json"]["role"] == "agent" and cut["json"]["interrupted"] is True
            statuses = []
            while not statuses or statuses[-1]["barge_ins"] != 1:
                statuses.append((await events.next("status"))["json"])
            announcement = await events.next("turn")
            assert "front desk" in announcement["json"]["text"].lower()
            ended = await events.next("ended")
            assert ended["json"]["end_reason"] == "transferred"
            assert ended["json"]["transfer"] == "front_desk (+14155550111)"
    page = await text_of(http, f"/console/calls/{caller.call_sid}")
    assert "front_desk (+14155550111)" in page and "[keypad: 0]" in page
    assert "interrupted: the caller talked over the agent" in page


async def test_event_streams_are_bounded_per_session(http, console_stack, monkeypatch):
    monkeypatch.setattr(call_events, "STREAMS_PER_SESSION", 1)
    state = console_stack.state
    record_call(state, sid(6), end=None)  # not ended, not running here: followed by polling
    await sign_in(http)
    path = f"/console/calls/{sid(6)}/events"
    async with http.get(path, headers=SSE) as first:
        assert first.status == 200
        async with http.get(path, headers=SSE) as second:
            assert second.status == 429
            assert "Retry-After" in second.headers
        first.close()
    # The first stream notices its page is gone at its next poll (1 s): asked until then, not
    # after a fixed 1.5 s, which a busy machine's stalls could outlast.
    async with asyncio.timeout(5):
        while True:
            async with http.get(path, headers=SSE) as third:
                if third.status == 200:
                    break
                assert third.status == 429
            await asyncio.sleep(0.1)


def test_a_slow_page_drops_the_oldest_turns_and_never_holds_the_call_up(monkeypatch):
    monkeypatch.setattr(call_events, "QUEUED_TURNS", 3)
    feed = call_events._TurnFeed("CA1", first_index=5)
    call, other = SimpleNamespace(call_sid="CA1"), SimpleNamespace(call_sid="CA2")
    for n in range(5):
        feed(call, turn("caller", f"turn {n}"))
    feed(other, turn("caller", "another call's"))
    turns, dropped = feed.take()
    assert dropped == 2
    assert [(index, t["text"]) for index, t in turns] == [(7, "turn 2"), (8, "turn 3"),
                                                          (9, "turn 4")]  # fmt: skip
    assert feed.take() == ([], 0)


@pytest.mark.parametrize("header", ["", "abc", "-1", "99999999", "3"])
def test_the_resume_point_is_a_small_count_or_nothing(header):
    request = SimpleNamespace(headers={"Last-Event-ID": header} if header else {}, query={})
    assert call_events._resume_point(request) == (3 if header == "3" else 0)


async def test_a_live_call_on_another_instance_is_followed_through_the_shared_record(
    http, console_stack, monkeypatch
):
    """With shared records, a call this instance does not run is read from the shared store
    about once a second: its new turns, its transfer, then its end."""
    from phoneagent.records import Transferred
    from phoneagent.records.memory import MemoryCallRecords

    shared = MemoryCallRecords()  # stands for the database; the other instance writes there
    state = console_stack.state
    monkeypatch.setattr(state.calls, "shared", shared)
    monkeypatch.setattr(call_events, "POLL_SECONDS", 0.05)
    now = time.time()

    async def elsewhere(change):
        await shared.write(sid(11), change, at=time.time())

    await elsewhere(Answered("bright-smile-dental", "+14155550123", DENTAL))
    await elsewhere(StreamStarted(at=now, persona="bright-smile-dental", model_session="s"))
    await elsewhere(TurnFinished(turn("agent", "Hello")))
    await sign_in(http)
    async with http.get("/console/live/calls.json") as response:
        [live] = (await response.json())["calls"]
    assert (live["call_sid"], live["here"], live["state"]) == (sid(11), False, "in progress")
    page = await text_of(http, f"/console/calls/{sid(11)}")
    assert 'data-live="true"' in page and "on another instance" in page
    async with http.get(f"/console/calls/{sid(11)}/events?after=1", headers=SSE) as stream:
        events = EventReader(stream)
        assert (await events.next("status"))["json"]["state"] == "in progress"
        await elsewhere(TurnFinished(turn("caller", "Hi", 1000)))
        said = await events.next("turn")
        assert (said["id"], said["json"]["text"]) == ("2", "Hi")
        await elsewhere(Transferred({"target": "front_desk", "number": "+14155550999"}))
        status = await events.next("status")
        assert status["json"]["transfer"] == "front_desk (+14155550999)"
        await elsewhere(StreamEnded(at=now + 5, end_reason="transferred", transcript=[],
                                    stats={}))  # fmt: skip
        assert (await events.next("ended"))["json"]["end_reason"] == "transferred"


async def test_while_the_database_is_away_the_lists_show_this_instances_calls_and_say_so(
    http, console_stack, monkeypatch
):
    from phoneagent.delivery.outbox import OutboxError
    from phoneagent.records.memory import MemoryCallRecords

    class Away(MemoryCallRecords):
        async def live(self, *args, **kwargs):
            raise OutboxError("the database postgresql://u:***@db/x: ConnectionRefusedError")

        search = live

    state = console_stack.state
    record_call(state, sid(12), end=None)
    monkeypatch.setattr(state.calls, "shared", Away())
    await sign_in(http)
    async with http.get("/console/live/calls.json") as response:
        data = await response.json()
    assert [c["call_sid"] for c in data["calls"]] == [sid(12)]
    assert "cannot be read" in data["problem"] and "***" in data["problem"]
    page = await text_of(http, "/console/calls")
    assert sid(12) in page and "this instance&#39;s calls only" in page


def test_the_page_script_sets_outside_text_as_text_only():
    from importlib.resources import files

    static = files("phoneagent.console") / "static"
    for name in ("call.js", "live.js"):
        script = (static / name).read_text()
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", script)


async def test_a_transcript_with_half_an_emoji_still_shows_its_call(http, console_stack):
    # A model's text split mid-emoji across two deltas leaves lone surrogates: not encodable as
    # UTF-8, they made the call's page (and GET /calls/SID) a 500.
    state = console_stack.state
    halves = [turn("agent", "Smile \ud83d"), turn("caller", "\ude00 ok", 2000)]
    record_call(state, sid(77), turns=halves)
    await sign_in(http)
    page = await text_of(http, f"/console/calls/{sid(77)}")
    assert "Smile \ufffd" in page and "\ufffd ok" in page


async def test_a_calls_page_shows_its_direction_variables_and_metadata_as_text(http, console_stack):
    state = console_stack.state
    record_call(state, sid(12))
    context = Answered("bright-smile-dental", "+1", "+2", "inbound",
                       {"caller_name": "<i>Dana</i>", "appointment": "Thursday"},
                       {"crm": "</code><script>x()</script>"})  # fmt: skip
    state.calls.note(sid(12), context)  # as the webhook writes it
    await sign_in(http)
    page = await text_of(http, f"/console/calls/{sid(12)}")
    assert 'id="call-direction">inbound<' in page
    assert "<code>appointment</code> Thursday; <code>caller_name</code> &lt;i&gt;Dana" in page
    assert "<script>x()" not in page and "<i>Dana" not in page
    assert 'id="call-metadata"><code>{' in page
