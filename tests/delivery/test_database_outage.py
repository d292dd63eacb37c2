"""The shared database goes away under a running `phoneagent serve` and comes back: the instance
turns unready naming the problem (never the password), calls go on, their events wait in memory,
and once the database is back the instance is ready again and every event is delivered.

A real server process on a PostgreSQL server of the test's own, stopped and started again
(``stoppable_postgres``), with the test kit's Twilio caller, fake model and webhook receiver."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter

from server_process import GUARD, ServerProcess, personas_with_webhook

from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.webhook_sink import WebhookSink

PASSWORD = "hunter2-db-secret"  # trust authentication ignores it; it must never be shown


async def readiness(server: ServerProcess, status: int) -> dict:
    """``/readyz`` once it answers ``status``."""
    async with asyncio.timeout(GUARD):
        while True:
            code, body = await server.get_json("/readyz")
            if code == status:
                return body
            await asyncio.sleep(0.1)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))


async def call(server: ServerProcess, *, hang_up: bool = True):
    """A call that reaches the agent (its first audio); hung up unless told otherwise."""
    caller = server.caller()
    await caller.__aenter__()
    await caller.dial()
    await caller.connect()
    await caller.wait_for_event("media", timeout=GUARD)
    if hang_up:
        await caller.hangup()
        await caller.__aexit__(None, None, None)
    return caller


async def test_a_database_outage_makes_the_instance_unready_and_loses_no_event(
    stoppable_postgres, tmp_path
):
    cluster = stoppable_postgres
    url = cluster.url.replace("postgres@", f"postgres:{PASSWORD}@")
    async with WebhookSink() as sink, FakeRealtimeServer(api_key="stepfun-api-key-value") as model:
        personas = personas_with_webhook(tmp_path / "personas", sink.url("/hooks"))
        server = ServerProcess(
            personas=personas, data_dir=tmp_path / "data", model_url=model.url,
            log_path=tmp_path / "server.log", env={"PHONEAGENT_DATABASE_URL": url},
        )  # fmt: skip
        await server.start()
        try:
            await readiness(server, 200)
            before = await call(server, hang_up=False)  # in progress when the database goes
            await sink.wait_for(1, timeout=GUARD)  # its call.started, delivered

            cluster.stop()
            down = await readiness(server, 503)
            # The outbox says so, and the call records (written once the call has writes).
            shown = f"the database postgresql://postgres:***@127.0.0.1:{cluster.port}/postgres"
            assert any(shown in problem for problem in down["problems"])
            assert PASSWORD not in str(down)
            # Calls go on: the one in progress ends, a new one is answered and ends.
            await before.hangup()
            await before.__aexit__(None, None, None)
            during = await call(server)
            # Its call.ended is held by a task the server starts as the stream closes, not
            # before the caller's hang-up returns: wait for the third event to be held.
            async with asyncio.timeout(GUARD):
                held = await server.metrics()
                while metric(held, "phoneagent_webhook_events_spooled") < 3:
                    await asyncio.sleep(0.05)
                    held = await server.metrics()
            status, body = await server.get_json("/readyz")
            assert status == 503 and PASSWORD not in str(body)

            cluster.start()
            await readiness(server, 200)
            await sink.wait_for(4, timeout=GUARD)
            # The call records held meanwhile are written too (each call's queue retries on
            # its own backoff, up to 5 s apart).
            async with asyncio.timeout(GUARD):
                while metric(after := await server.metrics(), "phoneagent_call_records_pending"):
                    await asyncio.sleep(0.2)
            code = await server.stop()
        finally:
            await server.stop()
    log = (tmp_path / "server.log").read_text()
    assert code == 0
    assert PASSWORD not in log
    # The ended call and the whole call during the outage waited in memory (the metrics said
    # so, and the instance was unready), then reached the receiver: each event once.
    assert metric(held, "phoneagent_webhook_events_spooled") == 3
    assert metric(held, "phoneagent_outbox_ok") == 0
    assert metric(after, "phoneagent_webhook_events_spooled") == 0
    assert metric(after, "phoneagent_outbox_ok") == 1
    assert metric(after, "phoneagent_call_records_unshared_total") == 0  # none given up
    events = [(r.json["type"], r.json["data"]["call_sid"]) for r in sink.received]
    assert Counter(events) == {
        ("call.started", before.call_sid): 1,
        ("call.ended", before.call_sid): 1,
        ("call.started", during.call_sid): 1,
        ("call.ended", during.call_sid): 1,
    }
    assert len({r.headers["webhook-id"] for r in sink.received}) == 4
    assert '"event": "webhook_event_lost"' not in log
    ended = {r.json["data"]["call_sid"]: r.json["data"] for r in sink.received[1:]
             if r.json["type"] == "call.ended"}  # fmt: skip
    assert ended[before.call_sid]["end_reason"] == "caller_hung_up"
    assert ended[during.call_sid]["end_reason"] == "caller_hung_up"


async def test_a_database_that_stops_answering_makes_the_instance_unready_not_calls_wait(
    stoppable_postgres, tmp_path
):
    # A database host that vanished (or a network partition) refuses nothing: connections
    # and queries just hang. The instance must say so within seconds, and calls must not wait
    # for the database's timeouts (Twilio gives up on a webhook after 15 s).
    cluster = stoppable_postgres
    async with WebhookSink() as sink, FakeRealtimeServer(api_key="stepfun-api-key-value") as model:
        personas = personas_with_webhook(tmp_path / "personas", sink.url("/hooks"))
        server = ServerProcess(
            personas=personas, data_dir=tmp_path / "data", model_url=model.url,
            log_path=tmp_path / "server.log", env={"PHONEAGENT_DATABASE_URL": cluster.url},
        )  # fmt: skip
        await server.start()
        try:
            await readiness(server, 200)
            cluster.pause()
            try:
                down = await readiness(server, 503)
                assert any("has not answered for" in p for p in down["problems"]), down
                loop = asyncio.get_running_loop()
                began = loop.time()
                during = await call(server)
                answered_in = loop.time() - began
            finally:
                cluster.resume()
            await readiness(server, 200)
            await sink.wait_for(2, timeout=GUARD)
            code = await server.stop()
        finally:
            await server.stop()
    assert code == 0
    # Dialled, answered, streamed and heard the agent: the database's share is a few seconds
    # at most (one round trip's budget), not its connect and command timeouts.
    assert answered_in < 5.0, answered_in
    # Both events were held, then committed together: delivered concurrently, in either order
    # (README, Delivery and retries), each once.
    events = [(r.json["type"], r.json["data"]["call_sid"]) for r in sink.received]
    assert Counter(events) == {
        ("call.started", during.call_sid): 1,
        ("call.ended", during.call_sid): 1,
    }


async def test_the_replay_guard_gives_a_silent_database_one_short_round_trip(
    stoppable_postgres, monkeypatch
):
    # Before the outbox reports the database silent (5 s), a webhook's round trip has its own
    # budget; after one fails, the next requests use memory at once, and the database is asked
    # again once it is back.
    from phoneagent.delivery import pg_round_trip
    from phoneagent.delivery.pg_outbox import PostgresOutbox
    from phoneagent.twilio.wire import pg_replay

    monkeypatch.setattr(pg_round_trip, "AWAY_SECONDS", 1.0)
    cluster = stoppable_postgres
    box = await PostgresOutbox.open(cluster.url)
    guard = pg_replay.PostgresReplayGuard(box)
    loop = asyncio.get_running_loop()
    expiry = time.time() + 600
    try:
        assert await guard.claim_stream("token-before", expiry)
        cluster.pause()
        try:
            began = loop.time()
            assert await guard.answer_for("voice:CA1") is None
            assert await guard.claim_stream("token-during", expiry)
            assert (await guard.remember("voice:CA1", "<Response/>")) == ("<Response/>", True)
            took = loop.time() - began
        finally:
            cluster.resume()
        await asyncio.sleep(1.2)  # past AWAY_SECONDS
        assert await guard.claim_stream("token-after", expiry)
        # Asked again: a token claimed on "another instance" (directly in the table) is refused.
        other = pg_replay.PostgresReplayGuard(box)
        assert not await other.claim_stream("token-after", expiry)
    finally:
        await box.close()
    assert pg_round_trip.ROUND_TRIP_SECONDS <= took < pg_round_trip.ROUND_TRIP_SECONDS + 1.5, took
