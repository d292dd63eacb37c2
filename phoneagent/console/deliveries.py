"""Deliveries: the webhook events still pending and the dead letters, per receiver, with a
"Redeliver" button for each dead letter (what ``phoneagent events redeliver ID`` does).

It reads the outbox through its interface (``delivery/outbox.py``), so it shows the same with
either store: this instance's SQLite file, or the PostgreSQL database every instance shares
(then it shows, and redelivers, every instance's events). Delivered events are only counted:
the receivers have them.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlencode

from aiohttp import web

from phoneagent.console.web import PREFIX, action, add_section, page, render
from phoneagent.delivery.outbox import (
    Outbox,
    OutboxError,
    OutboxItem,
    SQLiteOutbox,
    display_url,
)
from phoneagent.delivery.status import DeliveryStatus
from phoneagent.logs import get_logger
from phoneagent.state import STATE

log = get_logger(__name__)

#: Events listed per status, newest first: enough to act on, bounded so the page stays fast
#: after a long outage (``phoneagent events redeliver --all-failed`` handles thousands).
SHOWN = 200
_EVENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def add_routes(app: web.Application) -> None:
    add_section(app, "/deliveries", "Deliveries")
    app.router.add_get(f"{PREFIX}/deliveries", page(deliveries_page))
    app.router.add_post(f"{PREFIX}/deliveries/redeliver", action(redeliver))


@dataclass(frozen=True)
class EventRow:
    id: str
    type: str
    call_sid: str
    url: str
    attempts: int
    last: str  # the last answer or error, "" before the first attempt
    when: str  # pending: the next attempt; failed: when it was given up
    when_iso: str


@dataclass
class Receiver:
    destination: str  # scheme://host:port: the outbox's unit of per-receiver fairness
    pending: list[EventRow] = field(default_factory=list)
    failed: list[EventRow] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        """The webhook URLs at this receiver (lines may post to different paths of one host)."""
        return sorted({row.url for row in self.failed + self.pending})


async def deliveries_page(request: web.Request) -> web.Response:
    outbox = _outbox(request)
    if outbox is None:
        return render(request, "deliveries.html", outbox=None, notice=None, problem=None)
    try:
        notice = await _notice(request, outbox)
        counts = await outbox.counts()
        pending = await outbox.list(status=DeliveryStatus.PENDING, limit=SHOWN)
        failed = await outbox.list(status=DeliveryStatus.FAILED, limit=SHOWN)
    except OutboxError as exc:  # the database is away, the file damaged: say so, not a 500
        log.warning("console_outbox_unavailable", error=str(exc))
        return render(request, "deliveries.html", status=503, outbox=_where(outbox),
                      notice=None, problem=str(exc))  # fmt: skip
    now = time.time()
    return render(
        request,
        "deliveries.html",
        outbox=_where(outbox),
        notice=notice,
        problem=None,
        counts=counts,
        shown=SHOWN,
        receivers=_receivers(pending, failed, now),
    )


async def redeliver(request: web.Request) -> web.StreamResponse:
    """Queue one event again with a fresh schedule, due now; back to the page, which says what
    became of it (Post/Redirect/Get: reloading the page does not send it once more)."""
    item_id = str((await request.post()).get("id", ""))
    if not _EVENT_ID.fullmatch(item_id):
        raise web.HTTPBadRequest(text="refused: not an event id")
    outbox = _outbox(request)
    if outbox is None:
        raise web.HTTPConflict(text="webhook delivery is off on this instance")
    try:
        item = await outbox.redeliver(item_id, now=time.time())
    except OutboxError as exc:
        log.warning("console_outbox_unavailable", error=str(exc))
        return render(request, "deliveries.html", status=503, outbox=_where(outbox),
                      notice=None, problem=str(exc))  # fmt: skip
    outcome = "queued" if item is not None else "missing"
    log.info("console_redelivered", event_id=item_id, outcome=outcome)
    raise web.HTTPSeeOther(f"{PREFIX}/deliveries?{urlencode({outcome: item_id})}")


def _outbox(request: web.Request) -> Outbox | None:
    publisher = request.app[STATE].publisher
    return publisher.worker.outbox if publisher is not None else None


def _where(outbox: Outbox) -> str:
    if isinstance(outbox, SQLiteOutbox):
        return f"this instance's outbox, {outbox.path}"
    # PostgresOutbox.url is already without its password.
    return f"the database every instance shares, {getattr(outbox, 'url', '')}"


async def _notice(request: web.Request, outbox: Outbox) -> str | None:
    """What the last "Redeliver" did, from the redirect's query."""
    queued, missing = request.query.get("queued", ""), request.query.get("missing", "")
    if _EVENT_ID.fullmatch(missing):
        return f"No event {missing} in the outbox (purged, or never there)."
    if not _EVENT_ID.fullmatch(queued):
        return None
    item = await outbox.get(queued)
    if item is None:
        return f"No event {queued} in the outbox (purged, or never there)."
    return (
        f"{item.id} ({item.type}) is queued again for {display_url(item.url)}: the worker "
        f"sends it within a second. Now: {item.status}."
    )


def _receivers(pending: list[OutboxItem], failed: list[OutboxItem], now: float) -> list[Receiver]:
    """The listed events by receiver; the receivers with the most dead letters first."""
    by_destination: dict[str, Receiver] = {}
    for item in pending:
        receiver = by_destination.setdefault(item.destination, Receiver(item.destination))
        if item.claim:
            when, at = "being sent now", item.next_attempt_at
        else:
            when, at = _time(item.next_attempt_at, now), item.next_attempt_at
        receiver.pending.append(_row(item, when, at))
    for item in failed:
        receiver = by_destination.setdefault(item.destination, Receiver(item.destination))
        at = item.last_attempt_at or item.created_at
        receiver.failed.append(_row(item, _time(at, now), at))
    return sorted(
        by_destination.values(), key=lambda r: (-len(r.failed), -len(r.pending), r.destination)
    )


def _row(item: OutboxItem, when: str, at: float) -> EventRow:
    last = item.last_error or (f"HTTP {item.last_status}" if item.last_status else "")
    return EventRow(
        id=item.id,
        type=item.type,
        call_sid=_call_sid(item.body),
        url=display_url(item.url),
        attempts=item.attempts,
        last=last,
        when=when,
        when_iso=datetime.fromtimestamp(at, UTC).isoformat(),
    )


def _call_sid(body: bytes) -> str:
    """The call an event is about (``data.call_sid`` of schema 1), "" if it names none."""
    try:
        data = json.loads(body).get("data", {})
        return str(data.get("call_sid", "")) if isinstance(data, dict) else ""
    except (ValueError, AttributeError):
        return ""


def _time(at: float, now: float) -> str:
    """``2025-01-31 12:00:05 UTC (in 4 min)``: exact, and how far from now."""
    stamp = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    delta = at - now
    span = abs(delta)
    if span < 1:
        return f"{stamp} (now)"
    if span < 90:
        amount = f"{span:.0f} s"
    elif span < 90 * 60:
        amount = f"{span / 60:.0f} min"
    elif span < 36 * 3600:
        amount = f"{span / 3600:.0f} h"
    else:
        amount = f"{span / 86400:.0f} days"
    return f"{stamp} (in {amount})" if delta > 0 else f"{stamp} ({amount} ago)"
