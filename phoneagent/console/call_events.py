"""A call's transcript as it grows: server-sent events at ``/console/calls/{sid}/events``.

The stream sends, as JSON:

- ``turn`` (the event id is how many turns the page then has, so a browser that reconnects
  sends ``Last-Event-ID`` and gets what it missed): a turn that became final, marked
  ``interrupted`` when the caller talked over the agent;
- ``status`` when the call's state, transfer or barge-in count changes;
- ``note``: something the page should say (turns skipped because the page fell behind);
- ``ended``: how the call ended; then the stream closes (the page stops listening).

A call on this instance is followed through ``state.turn_listeners``: each stream registers a
listener (removed when the stream closes) that copies the call's turns into a bounded queue and
never waits, so no browser can slow a call down; when a page falls that far behind, the oldest
turns are dropped and the page is told. A call on another instance (shared records) is followed
by reading its shared record about once a second. Streams are bounded per console session and
overall, and end when the session does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from phoneagent.call import Call
from phoneagent.console.call_views import (
    call_sid_of,
    end_text,
    state_text,
    transfer_text,
    turn_view,
)
from phoneagent.console.web import PREFIX, page, session_of
from phoneagent.logs import get_logger
from phoneagent.records import CallRecord
from phoneagent.records.record import FINAL_STATUSES
from phoneagent.state import STATE, ServerState

log = get_logger(__name__)

POLL_SECONDS = 1.0  # a call on another instance: its shared record is read this often
STATE_SECONDS = 0.25  # a call here: its state and transfer are looked at this often (no I/O)
KEEPALIVE_SECONDS = 15.0  # a comment line when nothing else was sent: proxies keep the stream
QUEUED_TURNS = 200  # turns waiting for a slow page; past it, the oldest are dropped
STREAMS_PER_SESSION = 8  # a browser holds about six connections to a host anyway
STREAMS = 64  # open streams on this instance, every session together
RETRY_MS = 2000  # how long a browser waits before reconnecting a dropped stream


@dataclass
class _Streams:
    """The open streams, by console session (its token's hash: no token is kept)."""

    by_session: collections.Counter[str] = field(default_factory=collections.Counter)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @contextlib.contextmanager
    def admit(self, session: str) -> Iterator[bool]:
        key = hashlib.sha256(session.encode()).hexdigest()
        if self.by_session[key] >= STREAMS_PER_SESSION or sum(self.by_session.values()) >= STREAMS:
            yield False
            return
        self.by_session[key] += 1
        try:
            yield True
        finally:
            self.by_session[key] -= 1
            if not self.by_session[key]:
                del self.by_session[key]


OPEN_STREAMS = web.AppKey("console_call_streams", _Streams)


def add_routes(app: web.Application) -> None:
    app[OPEN_STREAMS] = _Streams()

    async def stop_streams(app: web.Application) -> None:
        app[OPEN_STREAMS].stopping.set()  # the server stops: streams end, browsers reconnect

    app.on_shutdown.append(stop_streams)

    async def events(request: web.Request) -> web.StreamResponse:
        call_sid = call_sid_of(request)
        if call_sid is None:
            return web.json_response({"error": "no such call"}, status=404)
        return await call_events(request, call_sid)

    app.router.add_get(f"{PREFIX}/calls/{{call_sid}}/events", page(events))


def is_live(state: ServerState, record: CallRecord) -> bool:
    """Whether a call's page should follow it: in progress here, or (shared records) on
    another instance. A record not ended that this instance holds without the call is not: its
    stream has not started, or it ended on an instance that died."""
    if record.call_sid in state.active_calls:
        return True
    return (
        state.calls.shared is not None
        and record.started_at is not None
        and record.ended_at is None
        and record.status not in FINAL_STATUSES
    )


async def call_events(request: web.Request, call_sid: str) -> web.StreamResponse:
    state = request.app[STATE]
    streams = request.app[OPEN_STREAMS]
    session = session_of(request)
    if session is None:  # revoked since page() let the request in
        return web.json_response({"error": "sign in to the console"}, status=401)
    here = call_sid in state.active_calls
    record = state.calls.get(call_sid) if here else await state.calls.fetch(call_sid)
    if record is None:
        return web.json_response({"error": f"no call {call_sid}"}, status=404)
    after = _resume_point(request)
    with streams.admit(session) as admitted:
        if not admitted:
            return web.json_response(
                {"error": "too many live views open: close some"},
                status=429,
                headers={"Retry-After": "10"},
            )
        stream = _EventStream(request, streams.stopping)
        await stream.open()
        try:
            if here:
                await _follow_here(stream, state, call_sid, after)
            else:
                await _follow_record(stream, state, call_sid, after)
        except ConnectionError:  # the page went away mid-write
            pass
        return stream.response


def _resume_point(request: web.Request) -> int:
    """How many turns the page has: ``Last-Event-ID`` when the browser reconnects, else the
    page's own count (``?after=``, the turns it was rendered with)."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    return int(raw) if raw.isdigit() and len(raw) <= 7 else 0


class _EventStream:
    """The response, written as ``text/event-stream``."""

    def __init__(self, request: web.Request, stopping: asyncio.Event) -> None:
        self.request = request
        self.stopping = stopping
        self.response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "X-Accel-Buffering": "no",  # nginx: pass each event on at once
            }
        )
        self._status: dict[str, Any] | None = None
        self._quiet = 0.0

    async def open(self) -> None:
        await self.response.prepare(self.request)
        await self._write(f"retry: {RETRY_MS}\n\n")

    @property
    def over(self) -> bool:
        """The page left, the session ended, or the server is stopping."""
        transport = self.request.transport
        return (
            transport is None
            or transport.is_closing()
            or self.stopping.is_set()
            or session_of(self.request) is None
        )

    async def send(self, event: str, data: dict[str, Any], event_id: int | None = None) -> None:
        # json.dumps escapes line breaks: one data line, whatever the transcript holds.
        head = f"id: {event_id}\n" if event_id is not None else ""
        await self._write(f"{head}event: {event}\ndata: {json.dumps(data)}\n\n")

    async def turn(self, index: int, turn: dict) -> None:
        await self.send("turn", turn_view(index, turn), event_id=index + 1)

    async def status(self, status: dict[str, Any]) -> None:
        if status != self._status:
            self._status = status
            await self.send("status", status)

    async def ended(self, record: CallRecord | None) -> None:
        reason = record.end_reason if record is not None else None
        transfer = transfer_text(record.transfer) if record is not None else ""
        await self.send(
            "ended", {"end_reason": reason or "", "end": end_text(reason), "transfer": transfer}
        )

    async def tick(self, seconds: float) -> None:
        """A poll's interval went by: keep an idle stream open through proxies."""
        self._quiet += seconds
        if self._quiet >= KEEPALIVE_SECONDS:
            await self._write(": keep-alive\n\n")

    async def _write(self, text: str) -> None:
        self._quiet = 0.0
        await self.response.write(text.encode())


class _TurnFeed:
    """The listener of one stream: the followed call's turns, in order, numbered from where
    the call's record stood when it was registered. Called on the call path: never waits,
    never raises."""

    def __init__(self, call_sid: str, first_index: int) -> None:
        self.call_sid = call_sid
        self.next_index = first_index
        self.turns: collections.deque[tuple[int, dict]] = collections.deque(maxlen=QUEUED_TURNS)
        self.dropped = 0
        self.arrived = asyncio.Event()

    def __call__(self, call: Call, turn: dict) -> None:
        if call.call_sid != self.call_sid:
            return
        try:
            if len(self.turns) == self.turns.maxlen:
                self.dropped += 1  # the deque drops the oldest
            self.turns.append((self.next_index, dict(turn)))
            self.next_index += 1
            self.arrived.set()
        except Exception:  # a listener must not break the call
            log.exception("console_turn_feed_failed")

    async def wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.arrived.wait()
        self.arrived.clear()

    def take(self) -> tuple[list[tuple[int, dict]], int]:
        turns, dropped = list(self.turns), self.dropped
        self.turns.clear()
        self.dropped = 0
        return turns, dropped


async def _follow_here(stream: _EventStream, state: ServerState, call_sid: str, after: int) -> None:
    """A call in progress on this instance: its turns as they become final."""
    record = state.calls.get(call_sid)
    if record is None:  # forgotten meanwhile (this instance keeps RECORDS_KEPT)
        await stream.ended(None)
        return
    # Registered and numbered with no await in between: every turn is either in the record
    # already (sent from there) or comes through the feed.
    feed = _TurnFeed(call_sid, first_index=len(record.transcript))
    backlog = list(enumerate(record.transcript))[after:]
    state.turn_listeners.append(feed)
    try:
        sent = after
        for index, turn in backlog:
            await stream.turn(index, turn)
            sent = index + 1
        while not stream.over:
            shell = state.active_calls.get(call_sid)
            if shell is not None:
                await stream.status(_status_here(shell.call, record))
            sent = await _send_feed(stream, feed, sent)
            if shell is None:  # the call ended: its record says how
                await stream.ended(state.calls.get(call_sid))
                return
            await feed.wait(STATE_SECONDS)
            await stream.tick(STATE_SECONDS)
    finally:
        state.turn_listeners.remove(feed)


async def _send_feed(stream: _EventStream, feed: _TurnFeed, sent: int) -> int:
    turns, dropped = feed.take()
    if dropped:
        text = f"{dropped} turn(s) skipped while this page was behind: reload for all of them."
        await stream.send("note", {"text": text})
    for index, turn in turns:
        if index >= sent:
            await stream.turn(index, turn)
            sent = index + 1
    return sent


async def _follow_record(
    stream: _EventStream, state: ServerState, call_sid: str, after: int
) -> None:
    """A call this instance does not run: its record, read about once a second (the shared
    store's with shared records, else this instance's)."""
    sent = after
    while not stream.over:
        record = await state.calls.fetch(call_sid)
        if record is None or not _in_progress(record):
            await stream.ended(record)
            return
        for index, turn in list(enumerate(record.transcript))[sent:]:
            await stream.turn(index, turn)
            sent = index + 1
        await stream.status(_status_of_record(record))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(POLL_SECONDS):
                await stream.stopping.wait()
        await stream.tick(POLL_SECONDS)


def _in_progress(record: CallRecord) -> bool:
    """Not over yet: ended, or finished by Twilio's word before its stream ever started."""
    if record.ended_at is not None:
        return False
    return record.started_at is not None or record.status not in FINAL_STATUSES


def _status_here(call: Call, record: CallRecord) -> dict[str, Any]:
    return {
        "state": state_text(call.state.value),
        "transfer": transfer_text(record.transfer),
        "barge_ins": call.stats.barge_ins,
    }


def _status_of_record(record: CallRecord) -> dict[str, Any]:
    return {
        "state": state_text(record.status),
        "transfer": transfer_text(record.transfer),
        # Counted when the call ends; until then, the turns the caller cut short.
        "barge_ins": sum(1 for turn in record.transcript if turn.get("interrupted")),
    }
