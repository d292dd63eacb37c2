"""The event spool (delivery/spool.py) between the publisher and the outbox: an outage holds
events in order, and an event the outbox refuses for good is given up, logged and counted, so
it never holds the events after it."""

from __future__ import annotations

import structlog
from delivery_helpers import SECRET_ENV, ended_event

from phoneagent.delivery.outbox import OutboxError, OutboxRefused
from phoneagent.delivery.spool import EventSpool

URL = "https://a.example/hooks"


class Outbox:
    """Commits as the worker's ``submit`` does; refuses for good the events in ``refuse``,
    and everything while ``away``."""

    def __init__(self, refuse: set[str]) -> None:
        self.refuse, self.away, self.committed = refuse, False, []

    async def commit(self, event, url, secret_env) -> None:
        if self.away:
            raise OutboxError("the database postgresql://u:***@db/x: ConnectionRefusedError")
        if event.id in self.refuse:
            kind = "CharacterNotInRepertoireError (SQLSTATE 22P05)"
            raise OutboxRefused(f"the database …: {kind}: …", reason=kind)
        self.committed.append(event.id)


async def no_wait(_: float) -> None:
    return None


async def test_an_event_refused_for_good_is_given_up_and_the_next_ones_committed():
    first, refused, last = ended_event(1), ended_event(2), ended_event(3)
    outbox, lost = Outbox({refused.id}), []
    spool = EventSpool(outbox.commit, sleep=no_wait, on_lost=lost.append)
    with structlog.testing.capture_logs() as logs:
        for event in (first, refused, last):
            await spool.submit(event, url=URL, secret_env=SECRET_ENV)
    assert outbox.committed == [first.id, last.id]
    assert spool.held == 0 and spool.problem is None and lost == ["refused"]
    [logged] = [e for e in logs if e["event"] == "webhook_event_lost"]
    assert logged["event_id"] == refused.id and logged["reason"] == "refused"
    assert "22P05" in logged["error"]


async def test_after_an_outage_a_held_event_refused_for_good_does_not_hold_the_rest():
    events = [ended_event(n) for n in range(4)]
    outbox, lost = Outbox({events[1].id}), []
    spool = EventSpool(outbox.commit, sleep=no_wait, on_lost=lost.append)
    outbox.away = True
    for event in events:
        await spool.submit(event, url=URL, secret_env=SECRET_ENV)
    assert spool.held == 4 and "refuses writes" in spool.problem
    outbox.away = False
    await spool._retrier  # the next retry drains, in order
    assert outbox.committed == [events[0].id, events[2].id, events[3].id]
    assert spool.held == 0 and spool.problem is None and lost == ["refused"]
