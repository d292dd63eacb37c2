"""The PostgreSQL outbox as several instances share it, its migration, its start-up errors, and
the wiring (``PHONEAGENT_DATABASE_URL`` → ``build_app``, ``phoneagent events``, ``serve``).

The interface itself is tested against both backends in test_delivery_outbox.py and
test_delivery_worker.py; these are what only a shared database has."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections import Counter

import asyncpg
import pytest
from conftest import EXAMPLE_PERSONAS, PROJECT_ROOT, VALID_ENV
from delivery_helpers import ENV, SECRET_ENV, T0, FakeClock, ended_event

from phoneagent.config import load_settings
from phoneagent.delivery import pg_outbox
from phoneagent.delivery.cli import add_events_commands
from phoneagent.delivery.outbox import OutboxError, destination_of
from phoneagent.delivery.pg_outbox import SCHEMA_VERSION, PostgresOutbox
from phoneagent.delivery.policy import RetryPolicy
from phoneagent.delivery.stores import open_outbox
from phoneagent.delivery.worker import DeliveryWorker
from phoneagent.testing.webhook_sink import WebhookSink

URL = "https://a.example/hooks"
GUARD = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def two_instances(pg_database):
    """Two outboxes on one database, as two instances have (each its own pool)."""
    a = await PostgresOutbox.open(pg_database, owner="instance-a")
    b = await PostgresOutbox.open(pg_database, owner="instance-b")
    yield a, b
    await a.close()
    await b.close()


async def test_concurrent_claims_from_two_instances_never_take_the_same_event(two_instances):
    a, b = two_instances
    events = [ended_event(i) for i in range(200)]
    for event in events:
        await a.enqueue(event, url=URL, secret_env=SECRET_ENV, now=T0)

    async def claim_all(box):
        got = []
        while batch := await box.claim_due(now=T0, limit=7, lease=60):
            got += batch
            await asyncio.sleep(0)  # the others' turn
        return got

    claimed = await asyncio.gather(*(claim_all(box) for box in (a, b, a, b)))
    ids = [item.id for batch in claimed for item in batch]
    assert Counter(ids).most_common(1)[0][1] == 1  # no event claimed twice under one lease
    assert sorted(ids) == sorted(e.id for e in events)  # and every event claimed
    # Both instances took part (not every claimer need: on a loaded machine one may be late).
    assert (claimed[0] or claimed[2]) and (claimed[1] or claimed[3])


async def test_an_expired_lease_is_taken_over_by_the_other_instance(two_instances):
    a, b = two_instances
    event = ended_event()
    await a.enqueue(event, url=URL, secret_env=SECRET_ENV, now=T0)
    [held] = await a.claim_due(now=T0, limit=10, lease=30)  # then instance a is SIGKILLed
    assert await b.claim_due(now=T0 + 29, limit=10, lease=30) == []  # a's lease still runs
    assert await b.next_due_at() == T0 + 30
    [taken] = await b.claim_due(now=T0 + 30, limit=10, lease=30)
    assert taken.id == event.id and taken.claim != held.claim
    assert await b.mark_delivered(event.id, taken.claim, now=T0 + 31, status=204)
    # a was only slow, not dead: its late answer does not overwrite b's.
    assert not await a.mark_retry(event.id, held.claim, now=T0 + 32, at=T0 + 99, status=503,
                                  error="late")  # fmt: skip
    item = await b.get(event.id)
    assert (item.status, item.attempts, item.last_status) == ("delivered", 1, 204)


async def test_two_workers_on_one_database_deliver_each_event_once(two_instances):
    fast = dict(policy=RetryPolicy([0.02] * 8, jitter=0.0), timeout=2.0, lease=5.0,
                poll_interval=0.02, environ=ENV)  # fmt: skip
    workers = [DeliveryWorker(box, **fast) for box in two_instances]
    async with WebhookSink([200]) as sink:
        events = [ended_event(i) for i in range(80)]
        for i, event in enumerate(events):  # submitted on both instances
            await workers[i % 2].submit(event, url=sink.url("/"), secret_env=SECRET_ENV)
        runs = [asyncio.create_task(w.run()) for w in workers]
        try:
            await sink.wait_for(80, timeout=GUARD)
            for worker in workers:
                assert await worker.flush(GUARD)
        finally:
            for worker in workers:
                await worker.stop()
            await asyncio.gather(*runs)
    ids = Counter(r.headers["webhook-id"] for r in sink.received)
    assert set(ids) == {e.id for e in events} and max(ids.values()) == 1
    assert (await two_instances[0].counts())["delivered"] == 80


# --- one receiver's limit, and its Retry-After, across instances -----------------------------

SLOW_URL, FAST_URL = "https://slow.example/hooks", "https://fast.example/hooks"
SLOW, FAST = destination_of(SLOW_URL), destination_of(FAST_URL)


class CountingSink(WebhookSink):
    """A sink that counts the requests it is answering, and the most it ever had at once."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.open = self.peak = 0

    async def _handle(self, request):
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            return await super()._handle(request)
        finally:
            self.open -= 1


async def enqueue_all(box, url: str, numbers, now: float) -> list[str]:
    events = [ended_event(n) for n in numbers]
    for event in events:
        await box.enqueue(event, url=url, secret_env=SECRET_ENV, now=now)
    return [e.id for e in events]


async def in_flight(box, destination: str) -> int:
    pending = await box.list(status="pending", limit=1000)
    return sum(1 for i in pending if i.claim and i.destination == destination)


async def test_two_workers_keep_a_slow_receiver_to_its_limit_in_total_and_serve_the_others(
    two_instances,
):
    options = dict(policy=RetryPolicy([0.02] * 8, jitter=0.0), timeout=10.0, lease=20.0,
                   poll_interval=0.02, environ=ENV, concurrency=8, per_destination=3)  # fmt: skip
    workers = [DeliveryWorker(box, **options) for box in two_instances]
    async with CountingSink([200], delay=0.4) as slow, CountingSink([200]) as fast:
        slow_events = [ended_event(i) for i in range(15)]
        fast_events = [ended_event(100 + i) for i in range(10)]
        # The slow receiver's backlog is first in line, submitted on both instances.
        for i, event in enumerate(slow_events):
            await workers[i % 2].submit(event, url=slow.url("/"), secret_env=SECRET_ENV)
        for i, event in enumerate(fast_events):
            await workers[i % 2].submit(event, url=fast.url("/"), secret_env=SECRET_ENV)
        runs = [asyncio.create_task(w.run()) for w in workers]
        try:
            await fast.wait_for(10, timeout=GUARD)
            # Served while the slow receiver's backlog waits (15 at 3 at once take 2 s).
            assert len(slow.received) < len(slow_events)
            await slow.wait_for(15, timeout=GUARD)
            for worker in workers:
                assert await worker.flush(GUARD)
        finally:
            for worker in workers:
                await worker.stop()
            await asyncio.gather(*runs)
    # Two instances with 8 slots each, and the receiver never had more than its 3 at once.
    assert slow.peak == 3
    for sink, events in ((slow, slow_events), (fast, fast_events)):
        ids = Counter(r.headers["webhook-id"] for r in sink.received)
        assert set(ids) == {e.id for e in events} and max(ids.values()) == 1


async def test_a_receiver_full_on_other_instances_does_not_hide_the_others(two_instances):
    a, b = two_instances
    await enqueue_all(a, SLOW_URL, range(40), now=T0)  # first in line, far past one claim's look
    await enqueue_all(b, FAST_URL, range(100, 105), now=T0 + 1)
    # The slow receiver's two places are taken, one on each instance.
    [x] = await a.claim_due(now=T0 + 2, limit=1, lease=60, default_room=2)
    [y] = await b.claim_due(now=T0 + 2, limit=1, lease=60, default_room=2)
    assert x.destination == y.destination == SLOW
    got = await a.claim_due(now=T0 + 2, limit=2, lease=60, room={SLOW: 1}, default_room=2)
    assert [i.destination for i in got] == [FAST, FAST]
    for item in got:
        assert await a.mark_delivered(item.id, item.claim, now=T0 + 3, status=204)
    # One place comes free: one more of the slow receiver's, and the rest to the other.
    assert await b.release(y.id, y.claim, now=T0 + 3)
    got = await b.claim_due(now=T0 + 3, limit=4, lease=60, default_room=2)
    assert [i.destination for i in got] == [SLOW, FAST, FAST]  # each to its limit of 2
    assert await in_flight(a, SLOW) == await in_flight(a, FAST) == 2


async def test_an_instance_kept_from_a_full_receiver_polls_rather_than_spins(two_instances):
    a, b = two_instances
    now = time.time()
    await enqueue_all(a, SLOW_URL, range(10), now=now)
    assert len(await a.claim_due(now=now, limit=4, lease=60, default_room=4)) == 4  # all 4 on a

    class Counted:
        def __init__(self, inner):
            self.inner, self.claims = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        async def claim_due(self, **kwargs):
            self.claims += 1
            return await self.inner.claim_due(**kwargs)

    outbox = Counted(b)
    worker = DeliveryWorker(outbox, poll_interval=0.25, environ=ENV)
    run = asyncio.create_task(worker.run())
    await asyncio.sleep(1.0)
    await worker.stop()
    await run
    # Six events are due and none may be sent: b looks again at each poll (4 in 1 s), not in a
    # loop (every 50 ms: 20), each round waiting for the claim lock.
    assert 2 <= outbox.claims <= 7


SLOW_CLAIMS = """
CREATE FUNCTION test_slow_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$;
CREATE TRIGGER test_slow_update BEFORE UPDATE ON phoneagent_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION test_slow_update();
"""


async def test_instances_claiming_at_once_take_the_last_place_once(two_instances, pg_database):
    a, b = two_instances
    await enqueue_all(a, SLOW_URL, range(100), now=T0)  # more than one claim locks
    await a.claim_due(now=T0, limit=1, lease=60, default_room=2)  # one place left
    # Each claim now takes 0.3 s to write, so the claims overlap: a claim that counted the
    # places in flight before the others committed would take the last place too.
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute(SLOW_CLAIMS)
    finally:
        await conn.close()
    claims = [
        a.claim_due(now=T0 + 1, limit=5, lease=60, room={SLOW: 1}, default_room=2),
        b.claim_due(now=T0 + 1, limit=5, lease=60, default_room=2),
        b.claim_due(now=T0 + 1, limit=5, lease=60, default_room=2),
    ]
    got = await asyncio.gather(*claims)
    assert sum(len(batch) for batch in got) == 1
    assert await in_flight(a, SLOW) == 2


async def test_a_frozen_claim_does_not_hold_up_the_other_instances(two_instances, monkeypatch):
    a, b = two_instances
    await enqueue_all(a, SLOW_URL, range(2), now=T0)
    monkeypatch.setattr(pg_outbox, "CLAIM_IDLE_TIMEOUT_MS", 500)
    frozen = asyncio.Event()
    fetch = asyncpg.Connection.fetch

    async def fetch_then_freeze(conn, sql, *args, **kwargs):
        rows = await fetch(conn, sql, *args, **kwargs)
        if "GROUP BY destination" in sql and not frozen.is_set():  # a, holding the claim lock
            frozen.set()
            await asyncio.sleep(GUARD)  # as if its process were stopped mid-claim
        return rows

    monkeypatch.setattr(asyncpg.Connection, "fetch", fetch_then_freeze)
    stuck = asyncio.create_task(a.claim_due(now=T0, limit=1, lease=60, default_room=2))
    await frozen.wait()
    async with asyncio.timeout(GUARD / 3):  # the server ends a's transaction after 0.5 s
        [item] = await b.claim_due(now=T0, limit=1, lease=60, default_room=2)
    assert item.destination == SLOW
    stuck.cancel()
    with pytest.raises((asyncio.CancelledError, OutboxError)):
        await stuck


async def test_retry_after_asked_of_one_instance_holds_on_the_other_for_that_event(
    two_instances,
):
    a, b = two_instances
    clock = FakeClock()
    policy = RetryPolicy([5.0] * 3, jitter=0.0)
    async with WebhookSink([(503, 120), 200]) as sink:
        worker_a = DeliveryWorker(a, policy=policy, clock=clock, environ=ENV)
        worker_b = DeliveryWorker(b, policy=policy, clock=clock, environ=ENV)
        [first] = await enqueue_all(a, sink.url("/"), [0], now=T0)
        [item] = await a.claim_due(now=T0, limit=4, lease=60, default_room=4)
        assert (await worker_a.deliver(item)).at == T0 + 120
        # Instance b, idle, does not try the event before the receiver's time...
        assert await b.next_due_at() == T0 + 120
        assert await b.claim_due(now=T0 + 119, limit=4, lease=60, default_room=4) == []
        # ...which is that event's: the receiver's other events go out on their own times.
        [second] = await enqueue_all(b, sink.url("/"), [1], now=T0 + 1)
        [other] = await b.claim_due(now=T0 + 1, limit=4, lease=60, default_room=4)
        assert other.id == second
        assert (await worker_b.deliver(other)).action == "delivered"
        clock.now = T0 + 120
        [again] = await b.claim_due(now=T0 + 120, limit=4, lease=60, default_room=4)
        assert again.id == first
        assert (await worker_b.deliver(again)).action == "delivered"
        for worker in (worker_a, worker_b):
            await worker.close()
    assert [r.headers["webhook-id"] for r in sink.received] == [first, second, first]


async def test_two_running_workers_wait_out_a_retry_after(two_instances):
    fast = dict(policy=RetryPolicy([0.02] * 8, jitter=0.0), timeout=2.0, lease=5.0,
                poll_interval=0.02, environ=ENV)  # fmt: skip
    workers = [DeliveryWorker(box, **fast) for box in two_instances]
    async with WebhookSink([(503, 1), 200]) as sink:
        event = ended_event()
        await workers[0].submit(event, url=sink.url("/"), secret_env=SECRET_ENV)
        runs = [asyncio.create_task(w.run()) for w in workers]
        try:
            first, second = await sink.wait_for(2, timeout=GUARD)
        finally:
            for worker in workers:
                await worker.stop()
            await asyncio.gather(*runs)
    # Both instances poll every 20 ms and the schedule says 20 ms: the receiver asked for 1 s.
    assert second.at - first.at >= 0.95


async def test_open_calls_are_each_instances_own(two_instances):
    a, b = two_instances
    await a.open_call("CA1", {"persona_id": "p"})
    await b.open_call("CA2", {"persona_id": "q"})
    # At start-up an instance ends the calls its last run left open; the other's are alive.
    assert [sid for sid, _, _ in await a.open_calls()] == ["CA1"]
    assert [sid for sid, _, _ in await b.open_calls()] == ["CA2"]
    await a.open_call("CA2", {"persona_id": "q"})  # the call came back to a after a transfer
    assert [sid for sid, _, _ in await a.open_calls()] == ["CA1", "CA2"]
    assert await b.open_calls() == []


async def test_concurrent_start_ups_migrate_once(pg_database):
    boxes = await asyncio.gather(*(PostgresOutbox.open(pg_database) for _ in range(6)))
    for box in boxes:
        await box.close()
    conn = await asyncpg.connect(pg_database)
    try:
        applied = await conn.fetch("SELECT component, version FROM phoneagent_migrations")
        version = await conn.fetchval(
            "SELECT version FROM phoneagent_schema WHERE component = 'outbox'"
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in applied] == [("outbox", v) for v in range(1, SCHEMA_VERSION + 1)]
    assert version == SCHEMA_VERSION


async def test_a_database_from_a_newer_version_is_refused(pg_database):
    await (await PostgresOutbox.open(pg_database)).close()
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute("UPDATE phoneagent_schema SET version = 99")
    finally:
        await conn.close()
    with pytest.raises(OutboxError, match="newer phoneagent"):
        await PostgresOutbox.open(pg_database)


async def test_a_database_that_is_down_is_a_clear_error_without_the_password():
    url = f"postgresql://phoneagent:hunter2secret@127.0.0.1:{free_port()}/calls"
    with pytest.raises(OutboxError) as excinfo:
        await open_outbox("unused", url)
    message = str(excinfo.value)
    assert "cannot connect to the database" in message
    assert "postgresql://phoneagent:***@127.0.0.1" in message and "/calls" in message
    assert "hunter2secret" not in message
    assert "PHONEAGENT_DATABASE_URL" in message


async def test_a_closed_or_unreachable_database_is_an_outbox_error(pg_database, postgres_url):
    box = await PostgresOutbox.open(pg_database)
    await box.enqueue(ended_event(), url=URL, secret_env=SECRET_ENV, now=T0)
    # The database goes away under a running instance: errors the worker survives.
    conn = await asyncpg.connect(postgres_url)
    try:
        name = pg_database.rsplit("/", 1)[1]
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        with pytest.raises(OutboxError, match="the database postgresql://"):
            await box.counts()
        await conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    finally:
        await conn.close()
    assert (await box.counts())["pending"] == 1  # back: nothing lost
    await box.close()


# --- wiring ---------------------------------------------------------------------------------


async def test_build_app_opens_the_database_when_the_url_is_set(pg_database, tmp_path, monkeypatch):
    from phoneagent import server
    from phoneagent.personas import PersonaRegistry

    env = VALID_ENV | {"PHONEAGENT_DATABASE_URL": pg_database, "PHONEAGENT_DATA_DIR": str(tmp_path)}
    given = {}
    monkeypatch.setattr(server, "create_app", lambda *a, outbox, **o: given.update(outbox=outbox))
    await server.build_app(load_settings(env), PersonaRegistry(EXAMPLE_PERSONAS))
    assert isinstance(given["outbox"], PostgresOutbox)
    await given["outbox"].close()
    assert not (tmp_path / "outbox.sqlite3").exists()  # no SQLite file beside it


def run_events(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="phoneagent")
    add_events_commands(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return args.handler(args)


def test_events_list_and_redeliver_use_the_database(pg_database, monkeypatch, capsys):
    async def seed():
        box = await PostgresOutbox.open(pg_database)
        event = ended_event(7)
        await box.enqueue(event, url=URL, secret_env=SECRET_ENV, now=T0)
        [item] = await box.claim_due(now=T0, limit=1, lease=30)
        await box.mark_dead(event.id, item.claim, now=T0 + 1, status=410, error="gone")
        await box.close()
        return event.id

    event_id = asyncio.run(seed())
    monkeypatch.setenv("PHONEAGENT_DATABASE_URL", pg_database)
    assert run_events("events", "list") == 0
    out = capsys.readouterr().out
    assert event_id in out and out.splitlines()[-1] == "1 events: 0 pending, 1 failed, 0 delivered"
    assert run_events("events", "redeliver", "--all-failed") == 0
    assert f"queued {event_id}" in capsys.readouterr().out
    assert run_events("events", "redeliver", "evt_nope") == 1
    assert "no event evt_nope in postgresql://" in capsys.readouterr().err


def test_serve_with_the_database_down_exits_2_naming_the_url_without_password(tmp_path):
    url = f"postgresql://phoneagent:hunter2secret@127.0.0.1:{free_port()}/calls"
    env = {k: v for k, v in os.environ.items() if k not in VALID_ENV} | VALID_ENV | {
        "PHONEAGENT_DATABASE_URL": url,
        "PHONEAGENT_DATA_DIR": str(tmp_path),
        "PORT": str(free_port()),
        "PHONEAGENT_METRICS_PORT": str(free_port()),
    }  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "phoneagent.cli", "serve", "--host", "127.0.0.1"],
        capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "webhook outbox error: cannot connect to the database" in result.stderr
    assert "postgresql://phoneagent:***@127.0.0.1" in result.stderr
    assert "hunter2secret" not in result.stderr + result.stdout


def test_ci_is_told_apart_so_an_unusable_postgresql_fails_there():
    from phoneagent.testing.postgres_cluster import in_ci

    assert in_ci({"CI": "true"}) and in_ci({"CI": "1"})
    assert not in_ci({}) and not in_ci({"CI": "false"}) and not in_ci({"CI": ""})
