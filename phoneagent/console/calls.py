"""Calls: those in progress (Live calls), recent ones found by number, persona and date (Recent
calls), and one call's page: its transcript (growing while the call is live, see
``call_events``), how it ended, its transfer, its stats, Twilio's status events and the delivery
of its webhook events.

Calls of every instance when the records are shared (PostgreSQL), else this instance's; while
the database is away, this instance's, and the page says so. Everything shown comes from outside
(numbers, transcripts): the templates escape it, and scripts only ever set ``textContent``.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, date, datetime
from typing import Any

from aiohttp import web

from phoneagent.console import call_events
from phoneagent.console.call_views import (
    barge_ins,
    call_sid_of,
    delivery,
    stats_lines,
    summary,
    turn_view,
    twilio_event,
)
from phoneagent.console.web import PREFIX, add_section, page, render
from phoneagent.delivery.outbox import OutboxError
from phoneagent.logs import get_logger
from phoneagent.state import STATE, ServerState

log = get_logger(__name__)

LIVE_LIMIT = 200  # calls listed under Live calls (a server takes PHONEAGENT_MAX_CALLS each)
SEARCH_LIMIT = 50  # calls a search shows; a narrower search finds older ones
EVENTS_SHOWN = 20  # webhook events listed on a call's page (a call makes three at most)
# What a number search accepts: digits, a leading +, and the spacing people type them with.
NUMBER_SPACING = re.compile(r"[\s().-]")
NUMBER = re.compile(r"\+?[0-9]{1,15}")
PERSONA_ID = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def add_routes(app: web.Application) -> None:
    add_section(app, "/live", "Live calls")
    add_section(app, "/calls", "Recent calls")
    app.router.add_get(f"{PREFIX}/live", page(live_page))
    app.router.add_get(f"{PREFIX}/live/calls.json", page(live_data))
    app.router.add_get(f"{PREFIX}/calls", page(recent_page))
    app.router.add_get(f"{PREFIX}/calls/{{call_sid}}", page(call_page))
    call_events.add_routes(app)


# --- Live calls ------------------------------------------------------------------------------


async def live_calls(state: ServerState) -> list[dict[str, Any]]:
    """This instance's calls (from its own view: always current), then the other instances'
    (from the shared store), latest started first."""
    now = time.time()
    rows: dict[str, dict[str, Any]] = {}
    for call_sid, shell in list(state.active_calls.items()):
        record = state.calls.get(call_sid)
        if record is not None:
            rows[call_sid] = summary(state, record, shell, now)
    for record in await state.calls.live(LIVE_LIMIT):
        if record.call_sid not in rows:
            rows[record.call_sid] = summary(state, record, None, now)
    return sorted(rows.values(), key=lambda r: r["started_at"] or 0.0, reverse=True)


async def live_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    calls = await live_calls(state)
    return render(request, "live.html", calls=calls, problem=state.calls.read_problem,
                  now=time.time())  # fmt: skip


async def live_data(request: web.Request) -> web.Response:
    """Live calls for the page's script, which refreshes the list with it."""
    state = request.app[STATE]
    calls = await live_calls(state)
    return web.json_response(
        {"now": time.time(), "calls": calls, "problem": state.calls.read_problem},
        headers={"Cache-Control": "no-store"},
    )


# --- Recent calls ----------------------------------------------------------------------------


class SearchForm:
    """The search's fields as typed, what they mean, and what is wrong with them."""

    def __init__(self, query: Any) -> None:
        self.number = str(query.get("number", "")).strip()
        self.persona = str(query.get("persona", "")).strip()
        self.since_day = str(query.get("from", "")).strip()
        self.until_day = str(query.get("to", "")).strip()
        self.errors: dict[str, str] = {}
        self.digits = NUMBER_SPACING.sub("", self.number)
        if self.number and not NUMBER.fullmatch(self.digits):
            self.errors["number"] = "Type the number's digits, e.g. +14155550123 or 0123."
        if self.persona and not PERSONA_ID.fullmatch(self.persona):
            self.errors["persona"] = "Choose a line from the list."
        self.since = self._day("from", self.since_day)
        until = self._day("to", self.until_day)
        self.until = until + 86400 if until is not None else None  # the whole day
        if self.since is not None and self.until is not None and self.since >= self.until:
            self.errors["to"] = "The last day is before the first."

    def _day(self, field: str, text: str) -> float | None:
        if not text:
            return None
        try:
            day = date.fromisoformat(text)
        except ValueError:
            self.errors[field] = "Type a date as YYYY-MM-DD."
            return None
        return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()

    @property
    def filters(self) -> dict[str, Any]:
        return {
            "number": self.digits or None,
            "persona": self.persona or None,
            "since": self.since,
            "until": self.until,
        }


async def recent_page(request: web.Request) -> web.Response:
    state = request.app[STATE]
    form = SearchForm(request.query)
    calls: list[dict[str, Any]] = []
    if not form.errors:
        now = time.time()
        found = await state.calls.search(**form.filters, limit=SEARCH_LIMIT)
        calls = [summary(state, r, state.active_calls.get(r.call_sid), now) for r in found]
    personas = sorted(state.personas.current.personas.values(), key=lambda p: p.name.lower())
    return render(
        request,
        "calls.html",
        status=400 if form.errors else 200,
        form=form,
        personas=personas,
        calls=calls,
        limit=SEARCH_LIMIT,
        problem=state.calls.read_problem,
        today=datetime.now(UTC).date().isoformat(),
    )


# --- a call's page ---------------------------------------------------------------------------


async def call_page(request: web.Request) -> web.Response:
    call_sid = call_sid_of(request)
    if call_sid is None:
        return _no_such_call(request)
    state = request.app[STATE]
    shell = state.active_calls.get(call_sid)
    # A call in progress here: this instance's view is the current one (and the numbering of
    # turns its event stream continues); else what every instance sees.
    record = state.calls.get(call_sid) if shell is not None else None
    if record is None:
        record = await state.calls.fetch(call_sid)
    if record is None:
        return _no_such_call(request)
    persona = state.persona(record.persona)
    now = time.time()
    deliveries, deliveries_problem = await _deliveries(state, call_sid)
    return render(
        request,
        "call.html",
        call=summary(state, record, shell, now),
        record=record,
        live=call_events.is_live(state, record),
        now=now,
        transcript=[turn_view(i, t) for i, t in enumerate(record.transcript)],
        barge_ins=barge_ins(record, shell),
        stats=stats_lines(record.stats),
        twilio_events=[twilio_event(e) for e in record.twilio_events],
        deliveries=deliveries,
        deliveries_problem=deliveries_problem,
        webhook=persona is not None and persona.webhook is not None,
        shared=state.calls.shared is not None,
    )


def _no_such_call(request: web.Request) -> web.Response:
    return render(request, "call_not_found.html", status=404)


async def _deliveries(state: ServerState, call_sid: str) -> tuple[list[dict[str, Any]], str | None]:
    """The call's webhook events and where their delivery stands (the receiver's origin only:
    a webhook URL may carry a token)."""
    if state.publisher is None:
        return [], None
    try:
        items = await state.publisher.worker.outbox.for_call(call_sid, limit=EVENTS_SHOWN)
    except OutboxError as exc:
        log.warning("console_deliveries_unread", call_sid=call_sid, error=str(exc))
        return [], f"the outbox cannot be read now ({exc})"
    return [delivery(item) for item in items], None
