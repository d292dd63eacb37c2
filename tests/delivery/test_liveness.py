"""Instances sharing a PostgreSQL database: heartbeats, and the adoption of the calls of the runs
that went silent (``liveness.py``, ``PostgresOutbox.adopt_lost_calls``). Against the tests'
PostgreSQL server; staleness is made by ageing a heartbeat in the table (the database's clock
decides, as in production), so nothing here waits a minute.

A real server killed mid-call and adopted by another is in test_lost_calls_shared.py."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import asyncpg
import pytest
from delivery_helpers import ENV, SECRET_ENV, T0

from phoneagent.delivery import liveness as liveness_module
from phoneagent.delivery.liveness import SETTLE_BEATS, InstanceLiveness
from phoneagent.delivery.outbox import OutboxError
from phoneagent.delivery.pg_outbox import PostgresOutbox
from phoneagent.delivery.publisher import CallEventPublisher, lost_call_event_id
from phoneagent.delivery.worker import DeliveryWorker

URL = "https://crm.example/hooks"
STALE = 60.0


def call_record(n: int, **overrides) -> dict:
    """An open call as the publisher records it (the persona wants call.ended)."""
    return {
        "call_sid": f"CA{n:032x}", "persona_id": "bright-smile-dental",
        "persona_name": "Bright Smile Dental front desk", "from_number": "+14155550123",
        "to_number": "+14155550100", "mask_caller": False, "url": URL, "secret_env": SECRET_ENV,
        "wants_ended": True, "started_at": T0 + n, "from": "+14155550123", "to": "+14155550100",
    } | overrides  # fmt: skip


async def sql(url: str, statement: str, *args):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(statement, *args)
    finally:
        await conn.close()


async def age_heartbeat(url: str, box: PostgresOutbox, seconds: float = 2 * STALE) -> None:
    """As if ``box``'s run had stopped beating ``seconds`` ago (killed, or cut off)."""
    await sql(
        url,
        "UPDATE phoneagent_instances SET last_seen = now() - make_interval(secs => $2) "
        "WHERE run_id = $1",
        box.run_id,
        seconds,
    )


async def ended_events(url: str) -> list[dict]:
    rows = await sql(url, "SELECT body FROM phoneagent_outbox WHERE type = 'call.ended'")
    return [json.loads(bytes(r[0])) for r in rows]


async def open_call_sids(url: str) -> list[str]:
    return [r[0] for r in await sql(url, "SELECT call_sid FROM phoneagent_open_calls")]


@pytest.fixture
async def instances(pg_database):
    """``instances(name)``: one more instance on the database (its outbox, publisher and
    liveness; nothing runs in the background). Everything is closed at the end."""
    made: list[InstanceLiveness] = []

    async def instance(name: str) -> InstanceLiveness:
        box = await PostgresOutbox.open(pg_database, owner=name)
        publisher = CallEventPublisher(DeliveryWorker(box, environ=ENV))
        made.append(InstanceLiveness(box, publisher, stale_seconds=STALE))
        return made[-1]

    yield instance
    for one in made:
        await one.publisher.spool.close()
        await one.publisher.worker.close()
        await one.outbox.close()


async def settled(one: InstanceLiveness) -> InstanceLiveness:
    """Beaten enough times in a row to adopt."""
    for _ in range(SETTLE_BEATS):
        await one.outbox.heartbeat()
        one._beats_in_a_row += 1
    return one


async def test_a_dead_instances_calls_are_adopted_and_ended_as_server_lost(instances, pg_database):
    dead, alive = await instances("voice-7f9c-dead"), await settled(await instances("voice-b"))
    await dead.start()
    await dead.outbox.open_call("CA1", call_record(1))
    await dead.outbox.add_turn("CA1", {"role": "agent", "text": "Hello", "start_ms": 0,
                                       "end_ms": 1500})  # fmt: skip
    await dead.outbox.open_call("CA2", call_record(2, wants_ended=False))
    await dead.stop()  # cancels the beat; the row goes, as after a clean stop
    await sql(pg_database, "INSERT INTO phoneagent_instances (run_id, owner) VALUES ($1, $2)",
              dead.outbox.run_id, dead.outbox.owner)  # fmt: skip
    assert await alive.adopt() == 0  # its heartbeat is fresh: alive
    await age_heartbeat(pg_database, dead.outbox)  # killed, a minute ago and more

    assert await alive.adopt() == 2
    [event] = await ended_events(pg_database)
    assert event["id"] == lost_call_event_id("CA1", T0 + 1)
    data = event["data"]
    assert (data["call_sid"], data["end_reason"]) == ("CA1", "server_lost")
    assert [t["text"] for t in data["transcript"]] == ["Hello"]
    assert await open_call_sids(pg_database) == []  # both closed (CA2 wanted no event)
    # The dead run is forgotten, and nothing is adopted twice.
    assert await sql(pg_database, "SELECT 1 FROM phoneagent_instances WHERE run_id = $1",
                     dead.outbox.run_id) == []  # fmt: skip
    assert await alive.adopt() == 0


async def test_a_live_instances_calls_are_never_adopted_even_under_the_same_name(
    instances, pg_database
):
    a = await settled(await instances("voice-a"))
    twin = await settled(await instances("voice-a"))  # a second process on the same host
    other = await settled(await instances("voice-b"))
    await a.outbox.open_call("CA1", call_record(1))
    await twin.outbox.open_call("CA2", call_record(2))
    for _ in range(3):
        for one in (a, twin, other):
            await one.tick()
    assert sorted(await open_call_sids(pg_database)) == ["CA1", "CA2"]
    assert await ended_events(pg_database) == []
    # Each sees the other under its name, beating since it started: said in the log.
    assert await a.outbox.heartbeat() == 1 and await twin.outbox.heartbeat() == 1
    assert await other.outbox.heartbeat() == 0


async def test_a_run_that_stopped_cleanly_leaves_its_unended_calls_to_the_others_at_once(
    instances, pg_database
):
    stopping, other = await instances("voice-a"), await settled(await instances("voice-b"))
    await stopping.start()
    await stopping.outbox.open_call("CA1", call_record(1))  # its end could not be committed
    await stopping.stop()
    assert await other.adopt() == 1  # no heartbeat row: no need to wait for it to age
    assert [e["data"]["call_sid"] for e in await ended_events(pg_database)] == ["CA1"]


async def test_two_instances_adopting_at_once_end_each_lost_call_once(instances, pg_database):
    dead = await instances("voice-dead")
    await dead.outbox.heartbeat()
    for n in range(60):
        await dead.outbox.open_call(f"CA{n}", call_record(n))
    await age_heartbeat(pg_database, dead.outbox)
    adopters = [await settled(await instances(f"voice-{i}")) for i in range(4)]

    ended = await asyncio.gather(*(one.adopt() for one in adopters for _ in range(3)))

    assert sum(ended) == 60
    events = await ended_events(pg_database)
    assert Counter(e["data"]["call_sid"] for e in events) == {f"CA{n}": 1 for n in range(60)}
    assert await open_call_sids(pg_database) == []


async def test_an_adopter_that_dies_before_ending_the_calls_leaves_them_to_the_next(
    instances, pg_database
):
    dead, adopter, next_one = [await instances(f"voice-{n}") for n in "abc"]
    await dead.outbox.heartbeat()
    await dead.outbox.open_call("CA1", call_record(1))
    await age_heartbeat(pg_database, dead.outbox)
    await adopter.outbox.heartbeat()
    [taken] = await adopter.outbox.adopt_lost_calls(stale_after=STALE)  # then SIGKILL
    assert taken.owner == "voice-a"
    await settled(next_one)
    assert await next_one.adopt() == 0  # the adopter is alive: the call is its own now
    await age_heartbeat(pg_database, adopter.outbox)
    assert await next_one.adopt() == 1
    [event] = await ended_events(pg_database)
    assert event["data"]["call_sid"] == "CA1"


async def test_a_lost_call_reported_twice_is_one_event(instances, pg_database):
    # An adopter whose commit waited in memory while the database was away, and the instance
    # that adopted the call from it meanwhile: the same event id, kept once.
    one, two = await instances("voice-a"), await instances("voice-b")
    await one.outbox.open_call("CA1", call_record(1))
    for publisher in (one.publisher, two.publisher):
        await publisher.end_lost_call("CA1", call_record(1), [], now=T0 + 9)
    assert len(await ended_events(pg_database)) == 1


async def test_an_instance_adopts_only_after_beating_in_a_row(instances, pg_database, monkeypatch):
    # After the database was away, every heartbeat is old: the live instances must beat again
    # before anyone judges them, so an instance back in touch waits a few beats.
    dead = await instances("voice-dead")
    await dead.outbox.heartbeat()
    await dead.outbox.open_call("CA1", call_record(1))
    await age_heartbeat(pg_database, dead.outbox)
    adopter = await instances("voice-b")
    for _ in range(SETTLE_BEATS - 1):
        assert await adopter.tick() == 0
    real = adopter.outbox.heartbeat

    async def refused() -> int:
        raise OutboxError("the database postgresql://…: ConnectionRefusedError")

    monkeypatch.setattr(adopter.outbox, "heartbeat", refused)
    assert await adopter.tick() == 0
    monkeypatch.setattr(adopter.outbox, "heartbeat", real)
    for _ in range(SETTLE_BEATS - 1):
        assert await adopter.tick() == 0  # counting again from the failure
    assert await adopter.tick() == 1


async def test_calls_recorded_before_heartbeats_existed_are_adopted_safely(instances, pg_database):
    # A database migrated under an older release's open calls (no run): its own name's at the
    # first adoption (a restart, as that release did), anyone's once older than any call.
    owner, other = (
        await settled(await instances("voice-a")),
        await settled(await instances("voice-b")),
    )
    for n, name in ((1, "voice-a"), (2, "voice-old"), (3, "voice-old")):
        await sql(pg_database, "INSERT INTO phoneagent_open_calls (call_sid, owner, call) "
                  "VALUES ($1, $2, $3)", f"CA{n}", name, json.dumps(call_record(n)))  # fmt: skip
    await sql(pg_database, "UPDATE phoneagent_open_calls SET opened_at = now() - interval "
              "'5 hours' WHERE call_sid = 'CA3'")  # fmt: skip
    assert await other.adopt() == 1  # CA3 only: CA1's owner may be alive on the old release
    assert await owner.adopt() == 1  # CA1: its own, at its first adoption
    assert sorted(await open_call_sids(pg_database)) == ["CA2"]


async def test_the_timings_default_to_the_modules_constants(instances, monkeypatch):
    monkeypatch.setattr(liveness_module, "HEARTBEAT_SECONDS", 0.2)
    one = await instances("voice-a")
    fresh = InstanceLiveness(one.outbox, one.publisher)
    assert (fresh.heartbeat_seconds, fresh.stale_seconds) == (0.2, liveness_module.STALE_SECONDS)
