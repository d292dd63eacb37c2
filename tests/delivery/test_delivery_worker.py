"""The delivery worker against a real webhook receiver on loopback.

Tests that take ``outbox`` (tests/conftest.py) run once per backend, SQLite and PostgreSQL.
Backoff and Retry-After are checked with an injected clock and seeded RNG (no waiting); the
end-to-end tests use millisecond retry schedules. Wall-clock bounds appear only as failure
guards, never as assertions, except where a *lower* bound is the point (Retry-After), which a
slow machine cannot break.
"""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from delivery_helpers import ENV, SECRET, SECRET_ENV, T0, FakeClock, ended_event, spec_signature_ok

from phoneagent.delivery.outbox import OutboxError
from phoneagent.delivery.policy import DEFAULT_DELAYS, RetryPolicy, decide, parse_retry_after
from phoneagent.delivery.worker import OUTBOX_RETRY_SECONDS, DeliveryWorker
from phoneagent.testing.webhook_sink import WebhookSink

FAST = RetryPolicy(delays=[0.02] * 8, jitter=0.0)
GUARD = 15.0  # seconds: only ever reached when something is broken


def fast_worker(outbox, **kwargs) -> DeliveryWorker:
    options = dict(policy=FAST, timeout=2.0, lease=3.0, poll_interval=0.05, environ=ENV)
    options.update(kwargs)
    return DeliveryWorker(outbox, **options)


class Running:
    """``async with Running(worker):`` runs the worker for the block, then stops it."""

    def __init__(self, worker: DeliveryWorker) -> None:
        self.worker = worker

    async def __aenter__(self) -> DeliveryWorker:
        self.task = asyncio.create_task(self.worker.run())
        return self.worker

    async def __aexit__(self, *exc) -> None:
        await self.worker.stop(grace=0.5)
        await asyncio.wait_for(self.task, GUARD)


async def until(predicate, what: str, timeout: float = GUARD) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.01)


async def status_of(outbox, event_id: str) -> str:
    return (await outbox.get(event_id)).status


# --- the rules, deterministically ------------------------------------------------------------


def test_default_schedule_spans_days_with_jitter():
    policy = RetryPolicy()
    assert policy.max_attempts == 10
    assert sum(DEFAULT_DELAYS) / 3600 == pytest.approx(75.5, abs=0.1)  # hours, not seconds
    rng = random.Random(7)
    delays = [policy.delay_after(n, rng) for n in range(1, 10)]
    for delay, base in zip(delays, DEFAULT_DELAYS, strict=True):
        assert 0.8 * base <= delay <= 1.2 * base
    assert delays != list(DEFAULT_DELAYS)  # jittered
    assert policy.delay_after(10, rng) is None  # the tenth failure is the last


def test_same_seed_same_delays():
    policy = RetryPolicy()
    first = [policy.delay_after(n, random.Random(3)) for n in range(1, 10)]
    again = [policy.delay_after(n, random.Random(3)) for n in range(1, 10)]
    assert first == again


@pytest.mark.parametrize(
    ("status", "action"),
    [
        (200, "delivered"), (204, "delivered"), (299, "delivered"),
        (None, "retry"), (500, "retry"), (502, "retry"), (503, "retry"), (429, "retry"),
        (408, "retry"),
        (400, "failed"), (401, "failed"), (404, "failed"), (410, "failed"), (422, "failed"),
        (301, "failed"), (307, "failed"),
    ],
)  # fmt: skip
def test_status_classification(status, action):
    policy = RetryPolicy(jitter=0.0)
    decision = decide(1, status=status, now=T0, policy=policy, rng=random.Random(0))
    assert decision.action == action
    if action == "retry":
        assert decision.at == T0 + 5.0


def test_410_says_the_receiver_is_gone_and_exhaustion_says_how_many():
    policy = RetryPolicy(delays=[1, 2], jitter=0.0)
    gone = decide(1, status=410, now=T0, policy=policy, rng=random.Random())
    assert gone.action == "failed" and "410 Gone" in gone.reason
    last = decide(3, status=503, error="busy", now=T0, policy=policy, rng=random.Random())
    assert last.action == "failed" and "after 3 attempts" in last.reason and "busy" in last.reason


def test_retry_after_lengthens_but_never_shortens_the_backoff_and_is_capped():
    policy = RetryPolicy(delays=[10.0, 100.0], jitter=0.0, max_retry_after=3600)
    rng = random.Random()

    def at(retry_after: str) -> float:
        return decide(1, status=503, retry_after=retry_after, now=T0, policy=policy, rng=rng).at

    assert at("60") == T0 + 60
    assert at("3") == T0 + 10  # the schedule's own delay is longer
    assert at("999999") == T0 + 3600  # capped
    http_date = format_datetime(datetime.fromtimestamp(T0 + 45, UTC), usegmt=True)
    assert at(http_date) == T0 + 45
    assert at("soon") == T0 + 10  # unparseable: ignored


def test_parse_retry_after():
    assert parse_retry_after("120", T0) == 120
    assert parse_retry_after("Fri, 15 Jan 2027 08:00:30 GMT", T0) == 30
    assert parse_retry_after("Fri, 15 Jan 2027 07:00:00 GMT", T0) == 0  # in the past
    assert parse_retry_after("-5", T0) is None
    assert parse_retry_after("", T0) is None
    assert parse_retry_after(None, T0) is None


async def test_retry_after_from_a_real_answer_sets_the_next_attempt(outbox):
    """One attempt with a fixed clock: the stored next_attempt_at is exactly what the rules say."""
    clock = FakeClock()
    http_date = format_datetime(datetime.fromtimestamp(T0 + 600, UTC), usegmt=True)
    async with WebhookSink([(503, 120), (429, http_date), (503, None)]) as sink:
        worker = DeliveryWorker(outbox, policy=RetryPolicy(delays=[5, 5, 5], jitter=0.0),
                                clock=clock, environ=ENV)  # fmt: skip
        event = ended_event()
        await outbox.enqueue(event, url=sink.url("/hooks"), secret_env=SECRET_ENV, now=T0)
        # 120 s asked; then an HTTP date 600 s after T0; then no header: the schedule's 5 s.
        for next_at in [T0 + 120, T0 + 600, T0 + 605]:
            [item] = await outbox.claim_due(now=clock(), limit=1, lease=60)
            decision = await worker.deliver(item)
            assert decision.action == "retry" and decision.at == next_at
            assert (await outbox.get(event.id)).next_attempt_at == next_at
            clock.now = next_at
        await worker.close()
    item = await outbox.get(event.id)
    assert (item.attempts, item.last_status) == (3, 503)
    assert [r.headers["webhook-id"] for r in sink.received] == [event.id] * 3


async def test_jitter_comes_from_the_injected_rng(outbox):
    clock = FakeClock()
    async with WebhookSink([500]) as sink:
        times = []
        for seed in (1, 1, 2):
            event = ended_event()
            await outbox.enqueue(event, url=sink.url("/"), secret_env=SECRET_ENV, now=T0)
            worker = DeliveryWorker(outbox, clock=clock, rng=random.Random(seed), environ=ENV)
            [item] = await outbox.claim_due(now=T0, limit=1, lease=60)
            times.append((await worker.deliver(item)).at)
            await worker.close()
    assert times[0] == times[1] != times[2]
    assert all(T0 + 4 <= t <= T0 + 6 for t in times)


async def test_the_run_loop_keeps_the_production_schedule_on_the_injected_clock(outbox):
    """The default 5 s / 5 min schedule, run in milliseconds: sleeping advances a fake clock,
    and no attempt is made before the clock says it is due."""
    clock = FakeClock()
    worker = DeliveryWorker(outbox, clock=clock, sleep=clock.sleep, rng=random.Random(0),
                            environ=ENV)  # fmt: skip
    async with WebhookSink([503, 503, 200]) as sink, Running(worker):
        event = ended_event()
        await worker.submit(event, url=sink.url("/"), secret_env=SECRET_ENV)
        received = await sink.wait_for(3, timeout=GUARD)
        await until(lambda: _delivered(outbox, event.id), "delivered")
    stamps = [int(r.headers["webhook-timestamp"]) for r in received]
    assert stamps[1] - stamps[0] >= 0.8 * 5 - 1  # signed at attempt time, whole seconds
    assert stamps[2] - stamps[1] >= 0.8 * 300 - 1
    assert (await outbox.get(event.id)).attempts == 3


async def _delivered(outbox, event_id: str) -> bool:
    return await status_of(outbox, event_id) == "delivered"


# --- against a real receiver -----------------------------------------------------------------


async def test_signature_verifies_with_an_independent_implementation(outbox):
    async with WebhookSink([200]) as sink, Running(fast_worker(outbox)) as worker:
        event = ended_event(mask_caller=True)
        await worker.submit(event, url=sink.url("/hooks/calls"), secret_env=SECRET_ENV)
        [received] = await sink.wait_for(1, timeout=GUARD)
    assert received.method == "POST" and received.path == "/hooks/calls"
    assert received.headers["Content-Type"] == "application/json"
    assert received.headers["webhook-id"] == event.id
    assert spec_signature_ok(received.body, received.headers, SECRET)
    assert received.body == event.body()
    assert received.json["data"]["from"] == "+*******0123"
    assert await status_of(outbox, event.id) == "delivered"


async def test_receiver_down_then_up_is_delivered_after_retries(outbox):
    sink = WebhookSink([200])
    await sink.start()
    url = sink.url("/hooks")
    await sink.stop()  # down: connections refused
    event = ended_event()
    async with Running(fast_worker(outbox, policy=RetryPolicy([0.02] * 50, jitter=0.0))) as w:
        await w.submit(event, url=url, secret_env=SECRET_ENV)

        async def failed_twice():
            return (await outbox.get(event.id)).attempts >= 2

        await until(failed_twice, "two failed attempts")
        item = await outbox.get(event.id)
        assert item.status == "pending" and item.last_status is None
        assert "Connect" in item.last_error or "refused" in item.last_error.lower()
        await sink.start()  # up again, same port
        try:
            [received] = await sink.wait_for(1, timeout=GUARD)
            assert await w.flush(GUARD)
        finally:
            await sink.stop()
    assert received.headers["webhook-id"] == event.id
    assert spec_signature_ok(received.body, received.headers, SECRET)
    item = await outbox.get(event.id)
    assert item.status == "delivered" and item.attempts >= 3


async def test_5xx_then_success_retries_with_the_same_id_and_a_fresh_signature(outbox):
    async with WebhookSink([503, 500, 200]) as sink, Running(fast_worker(outbox)) as worker:
        event = ended_event()
        await worker.submit(event, url=sink.url("/"), secret_env=SECRET_ENV)
        received = await sink.wait_for(3, timeout=GUARD)
        assert await worker.flush(GUARD)
    assert [r.status for r in received] == [503, 500, 200]
    assert {r.headers["webhook-id"] for r in received} == {event.id}
    assert all(spec_signature_ok(r.body, r.headers, SECRET) for r in received)
    assert (await outbox.get(event.id)).attempts == 3


@pytest.mark.parametrize("status", [410, 400])
async def test_410_and_400_are_dead_letters_at_once(outbox, status):
    async with WebhookSink([status, 200]) as sink, Running(fast_worker(outbox)) as worker:
        event = ended_event()
        await worker.submit(event, url=sink.url("/"), secret_env=SECRET_ENV)
        await sink.wait_for(1, timeout=GUARD)
        assert await worker.flush(GUARD)
        await asyncio.sleep(0.1)  # several retry delays: none may come
    assert len(sink.received) == 1
    item = await outbox.get(event.id)
    assert (item.status, item.attempts, item.last_status) == ("failed", 1, status)


async def test_retry_after_is_honoured_end_to_end(outbox):
    async with WebhookSink([(503, 1), 200]) as sink, Running(fast_worker(outbox)) as worker:
        event = ended_event()
        await worker.submit(event, url=sink.url("/"), secret_env=SECRET_ENV)
        first, second = await sink.wait_for(2, timeout=GUARD)
    # The schedule alone would retry after 20 ms; the receiver asked for a second.
    assert second.at - first.at >= 0.95


async def test_redeliver_sends_a_dead_letter_again_with_the_same_id(outbox):
    async with WebhookSink([410, 200]) as sink, Running(fast_worker(outbox)) as worker:
        event = ended_event()
        await worker.submit(event, url=sink.url("/"), secret_env=SECRET_ENV)
        await sink.wait_for(1, timeout=GUARD)
        assert await worker.flush(GUARD)
        assert await status_of(outbox, event.id) == "failed"
        await outbox.redeliver(event.id, now=worker.clock())
        worker.wake()
        first, second = await sink.wait_for(2, timeout=GUARD)
        assert await worker.flush(GUARD)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == event.id
    assert first.body == second.body
    assert await status_of(outbox, event.id) == "delivered"


async def test_a_slow_receiver_does_not_hold_up_the_others(outbox):
    slow, fast = WebhookSink([200], delay=60.0), WebhookSink([200])
    async with slow, fast:
        worker = fast_worker(outbox, concurrency=4, per_destination=2, timeout=90.0, lease=120)
        async with Running(worker):
            for i in range(10):  # the slow receiver's events are first in line
                await worker.submit(ended_event(i), url=slow.url("/"), secret_env=SECRET_ENV)
            fast_events = [ended_event(100 + i) for i in range(8)]
            for event in fast_events:
                await worker.submit(event, url=fast.url("/"), secret_env=SECRET_ENV)
            received = await fast.wait_for(8, timeout=GUARD)
            pending = await outbox.list(status="pending")
            in_flight = [i for i in pending if i.claim and i.url == slow.url("/")]
            assert {r.headers["webhook-id"] for r in received} == {e.id for e in fast_events}
            assert len(in_flight) == 2  # the slow receiver holds its two slots and no more
            assert slow.received == []
    # Stopping mid-request handed the claims back: those events are due again at once.
    pending = await outbox.list(status="pending")
    assert len(pending) == 10 and not any(i.claim for i in pending)


async def test_many_events_concurrently_each_delivered_once(outbox):
    async with WebhookSink([200]) as sink, Running(fast_worker(outbox)) as worker:
        events = [ended_event(i) for i in range(60)]
        for event in events:
            await worker.submit(event, url=sink.url("/"), secret_env=SECRET_ENV)
        await sink.wait_for(60, timeout=GUARD)
        assert await worker.flush(GUARD)
    ids = [r.headers["webhook-id"] for r in sink.received]
    assert sorted(ids) == sorted(e.id for e in events)
    assert (await outbox.counts())["delivered"] == 60


async def test_no_answer_within_the_timeout_is_retried(outbox):
    async with WebhookSink([200], delay=5.0) as sink:
        worker = fast_worker(outbox, timeout=0.2, lease=1.0)
        event = ended_event()
        await outbox.enqueue(event, url=sink.url("/"), secret_env=SECRET_ENV, now=worker.clock())
        [item] = await outbox.claim_due(now=worker.clock(), limit=1, lease=1.0)
        decision = await worker.deliver(item)
        await worker.close()
    assert decision.action == "retry"
    assert (await outbox.get(event.id)).last_error == "no answer: no answer within 0.2 s"


async def test_a_missing_secret_fails_the_attempt_and_is_retried_not_sent(outbox):
    async with WebhookSink([200]) as sink:
        worker = fast_worker(outbox, environ={})
        event = ended_event()
        await outbox.enqueue(event, url=sink.url("/"), secret_env=SECRET_ENV, now=worker.clock())
        [item] = await outbox.claim_due(now=worker.clock(), limit=1, lease=5)
        decision = await worker.deliver(item)
        await worker.close()
    assert decision.action == "retry" and sink.received == []
    error = (await outbox.get(event.id)).last_error
    assert SECRET_ENV in error and "empty" in error


async def test_stop_without_run_and_flush_with_nothing_due(outbox):
    worker = fast_worker(outbox)
    await worker.stop()  # never started: nothing to wait for
    async with Running(fast_worker(outbox)) as running:
        assert await running.flush(GUARD)
        with pytest.raises(RuntimeError):
            await running.run()


async def test_the_worker_outlives_outbox_errors(outbox):
    class Flaky:
        """The real outbox, except that claiming fails twice (a locked or full database)."""

        def __init__(self, inner):
            self.inner, self.failures = inner, 2

        def __getattr__(self, name):
            return getattr(self.inner, name)

        async def claim_due(self, **kwargs):
            if self.failures:
                self.failures -= 1
                raise OutboxError("outbox.sqlite3 is locked by another process")
            return await self.inner.claim_due(**kwargs)

    clock = FakeClock()
    flaky = Flaky(outbox)
    worker = DeliveryWorker(flaky, clock=clock, sleep=clock.sleep, environ=ENV)
    async with WebhookSink([200]) as sink, Running(worker):
        await worker.submit(ended_event(), url=sink.url("/"), secret_env=SECRET_ENV)
        await sink.wait_for(1, timeout=GUARD)
    assert flaky.failures == 0


async def test_an_outbox_that_keeps_failing_is_tried_again_every_few_seconds(outbox):
    # While it fails the instance is unready: once the database is back, it must be ready
    # again within seconds, however long the outage was (not after a minute of backoff).
    class Away:
        def __init__(self, inner):
            self.inner, self.failures = inner, 12

        def __getattr__(self, name):
            return getattr(self.inner, name)

        async def claim_due(self, **kwargs):
            if self.failures:
                self.failures -= 1
                raise OutboxError("the database postgresql://…: ConnectionRefusedError")
            return await self.inner.claim_due(**kwargs)

    clock = FakeClock()
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await clock.sleep(seconds)

    away = Away(outbox)
    worker = DeliveryWorker(away, clock=clock, sleep=sleep, environ=ENV)
    async with Running(worker):
        await until(lambda: asyncio.sleep(0, away.failures == 0), "the outbox back")
        await until(lambda: asyncio.sleep(0, worker.outbox_problem is None), "ready again")
    assert max(waits[:12]) == OUTBOX_RETRY_SECONDS


async def test_stop_before_the_run_task_starts_still_stops_it(outbox):
    worker = fast_worker(outbox)
    task = asyncio.create_task(worker.run())
    await worker.stop()
    await asyncio.wait_for(task, GUARD)


def test_worker_settings_are_checked():
    with pytest.raises(ValueError, match="lease"):
        DeliveryWorker(None, timeout=10, lease=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RetryPolicy(delays=[])
    with pytest.raises(ValueError):
        RetryPolicy(jitter=1.5)


def test_payload_round_trips_through_json():
    event = ended_event()
    assert json.loads(event.body())["id"] == event.id


async def test_an_error_naming_the_url_keeps_its_token_out_of_the_outbox():
    # NonHttpUrlClientError and InvalidUrlClientError print the URL whole; the error is stored,
    # listed by `events list` and shown in the console.
    from phoneagent.business_http import without_url_secrets
    from phoneagent.delivery.outbox import OutboxItem
    from phoneagent.delivery.sender import WebhookSender
    from phoneagent.delivery.status import DeliveryStatus

    url = "ftp://user:pa55-word-secret@hooks.example.com/in?token=TOPSECRET12345"
    event = ended_event()
    item = OutboxItem(
        event.id, event.type, url, "ftp://hooks.example.com", SECRET_ENV, event.body(),
        DeliveryStatus.PENDING, 0, T0, T0, None, None, None, None, None,
    )  # fmt: skip
    sender = WebhookSender(timeout=2.0, concurrency=1, environ=ENV)
    try:
        answer = await sender.post(item, now=T0)
    finally:
        await sender.close()
    assert answer.status is None and answer.error
    assert "TOPSECRET" not in answer.error and "pa55" not in answer.error
    assert "hooks.example.com/in?***" in answer.error
    assert without_url_secrets("see x?a=%41%42%43secret", "https://x/?a=%41%42%43secret") == (
        "see x?***"
    )
