"""The replay defences (twilio/wire/replay.py) behind one interface, the same tests against
both backends (memory and PostgreSQL), and what only a shared database gives: a token opens
one stream across instances, and a webhook replayed to another instance gets the first answer."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import asyncpg
import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.config import Settings
from phoneagent.delivery.pg_outbox import PostgresOutbox
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.stack import LocalStack, demo_credentials
from phoneagent.twilio.wire.pg_replay import PostgresReplayGuard
from phoneagent.twilio.wire.replay import MemoryReplayGuard

DENTAL = "+14155550100"


@pytest.fixture(params=["memory", "postgres"])
async def guards(request):
    """Opens replay guards on one store of the parametrized backend: with PostgreSQL each is
    one more "instance" on the same database; in memory, there is one instance's guard."""
    opened: list[PostgresOutbox] = []
    memory = MemoryReplayGuard()

    async def open_guard(**options):
        if request.param == "memory":
            return memory
        outbox = await PostgresOutbox.open(request.getfixturevalue("pg_database"))
        opened.append(outbox)
        return PostgresReplayGuard(outbox, **options)

    open_guard.backend = request.param
    yield open_guard
    for outbox in opened:
        await outbox.close()


async def test_a_token_is_claimed_once(guards):
    guard = await guards()
    expiry = time.time() + 120
    assert await guard.claim_stream("token-a", expiry)
    assert not await guard.claim_stream("token-a", expiry)
    assert await guard.claim_stream("token-b", expiry)


async def test_concurrent_claims_of_one_token_let_one_through(guards):
    guard = await guards()
    expiry = time.time() + 120
    results = await asyncio.gather(*(guard.claim_stream("token", expiry) for _ in range(10)))
    assert sorted(results) == [False] * 9 + [True]


async def test_the_first_answer_is_kept(guards):
    guard = await guards()
    assert await guard.answer_for("voice:CA1") is None
    assert await guard.remember("voice:CA1", "<first/>") == ("<first/>", True)
    assert await guard.remember("voice:CA1", "<second/>") == ("<first/>", False)
    assert await guard.answer_for("voice:CA1") == "<first/>"
    assert await guard.answer_for("voice:CA2") is None


async def test_concurrent_answers_keep_one(guards):
    guard = await guards()
    results = await asyncio.gather(*(guard.remember("k", f"<a{i}/>") for i in range(10)))
    firsts = [answer for answer, first in results if first]
    assert len(firsts) == 1
    assert {answer for answer, _ in results} == set(firsts)


async def test_two_instances_share_claims_and_answers(pg_database):
    outboxes = [await PostgresOutbox.open(pg_database) for _ in range(2)]  # two "instances"
    try:
        await two_guards_share(*(PostgresReplayGuard(outbox) for outbox in outboxes))
    finally:
        for outbox in outboxes:
            await outbox.close()


async def two_guards_share(one: PostgresReplayGuard, two: PostgresReplayGuard) -> None:
    expiry = time.time() + 120
    results = await asyncio.gather(
        *(g.claim_stream("shared", expiry) for g in (one, two) for _ in range(5))
    )
    assert results.count(True) == 1
    answers = await asyncio.gather(
        one.remember("voice:CA", "<one/>"), two.remember("voice:CA", "<two/>")
    )
    [kept] = [a for a, first in answers if first]
    assert [a for a, _ in answers] == [kept, kept]
    assert await two.answer_for("voice:CA") == kept == await one.answer_for("voice:CA")


async def test_expired_rows_are_purged_and_an_expired_answer_replaced(pg_database):
    outbox = await PostgresOutbox.open(pg_database)
    now = [1000.0]
    try:
        guard = PostgresReplayGuard(outbox, clock=lambda: now[0], answer_seconds=10)
        assert await guard.claim_stream("old", 1005.0)
        assert await guard.remember("voice:CA", "<old/>") == ("<old/>", True)
        now[0] = 2000.0
        other = PostgresReplayGuard(outbox, clock=lambda: now[0])  # another instance, later
        assert await other.answer_for("voice:CA") is None  # expired
        assert await other.remember("voice:CA", "<new/>") == ("<new/>", True)
        assert await other.claim_stream("fresh", 2100.0)  # purges the expired claim
        async with outbox.connection() as conn:
            assert await conn.fetchval("SELECT COUNT(*) FROM phoneagent_stream_claims") == 1
    finally:
        await outbox.close()


async def test_a_database_down_falls_back_to_this_instance(pg_database):
    outbox = await PostgresOutbox.open(pg_database)
    guard = PostgresReplayGuard(outbox)
    await outbox.close()  # as unreachable as a database can be
    expiry = time.time() + 120
    # Not shared, so a claim that may fail closed is not taken (and takes nothing here) …
    assert not await guard.claim_stream("t", expiry, shared_only=True)
    # … while a stream is served from this instance's memory, once.
    assert await guard.claim_stream("t", expiry)
    assert not await guard.claim_stream("t", expiry)  # still refused on this instance
    assert not await guard.claim_stream("t", expiry, shared_only=True)
    assert await guard.remember("k", "<a/>") == ("<a/>", True)
    assert await guard.answer_for("k") == "<a/>"


async def test_the_schema_step_creates_the_tables(pg_database):
    outbox = await PostgresOutbox.open(pg_database)
    await outbox.close()
    conn = await asyncpg.connect(pg_database)
    try:
        for table in ("phoneagent_stream_claims", "phoneagent_answered_webhooks"):
            assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
    finally:
        await conn.close()


# --- two instances (two apps) on one database ------------------------------------------------


@pytest.fixture
async def two_instances(pg_database, tmp_path: Path):
    account_sid, auth_token = demo_credentials()
    stacks = []
    for name in ("one", "two"):
        settings = Settings(
            twilio_account_sid=account_sid,
            twilio_auth_token=auth_token,
            personas_dir=EXAMPLE_PERSONAS,
            data_dir=tmp_path / name,
            database_url=pg_database,
        )
        stack = LocalStack(
            EXAMPLE_PERSONAS, model=FakeRealtimeServer(speed=None), settings=settings
        )
        await stack.start()
        stacks.append(stack)
    try:
        yield stacks
    finally:
        for stack in stacks:
            await stack.close()


def on_instance(stack: LocalStack, caller, answer):
    """A client of ``stack`` with what ``caller``'s call got: the same CallSid, and the TwiML
    (its stream token) pointing at ``stack``."""
    copy = stack.caller(to=DENTAL, speed=0, call_sid=caller.call_sid)
    copy.answer = dataclasses.replace(answer, stream_url=stack.settings.stream_url)
    return copy


async def test_a_token_raced_on_two_instances_opens_one_stream(two_instances):
    one, two = two_instances
    async with one.caller(to=DENTAL, speed=0) as caller:
        answer = await caller.dial()
        other = on_instance(two, caller, answer)
        try:
            await asyncio.gather(caller.connect(), other.connect())
            streams = [caller, other]
            await caller.wait_until(
                lambda: sum(s.closed for s in streams) == 1, 10, "one stream refused"
            )
            [kept] = [s for s in streams if not s.closed]
            await kept.wait_for_event("media", timeout=10)
            refused = one.state.metrics.streams_refused._value.get()
            refused += two.state.metrics.streams_refused._value.get()
            assert refused == 1
            await kept.hangup()
        finally:
            await other.aclose()


async def test_a_voice_webhook_replayed_to_another_instance_gets_the_first_answer(two_instances):
    one, two = two_instances
    async with one.caller(to=DENTAL, speed=0) as caller:
        first = await caller.dial()
        async with on_instance(two, caller, first) as replay:
            again = await replay.dial()
            assert again.body == first.body  # the same answer, the same (single-use) token
        assert one.state.prewarmer.waiting == 1
        assert two.state.prewarmer.waiting == 0  # the replay started nothing
        assert two.state.metrics.webhook_replays._value.get() == 1
        # The token opens its stream on the second instance, once.
        taker = on_instance(two, caller, first)
        await taker.connect()
        await taker.wait_for_event("media", timeout=10)
        async with on_instance(one, caller, first) as late:
            await late.connect()
            await late.wait_closed(timeout=10)
            assert late.messages("media") == []
        await taker.hangup()
        await taker.aclose()


class SlowGuard(MemoryReplayGuard):
    """A guard whose every answer takes a round trip, as a shared database's does."""

    async def remember(self, key: str, twiml: str) -> tuple[str, bool]:
        await asyncio.sleep(0.2)
        return await super().remember(key, twiml)


async def test_concurrent_new_calls_hold_their_place_under_the_cap_while_answered():
    async with LocalStack(EXAMPLE_PERSONAS, model=FakeRealtimeServer(speed=None)) as stack:
        stack.state.settings = dataclasses.replace(stack.state.settings, max_calls=2)
        stack.state.replay = SlowGuard()
        callers = [stack.caller(to=DENTAL, speed=0) for _ in range(4)]
        try:
            answers = await asyncio.gather(*(c.dial() for c in callers))
            assert sum(a.stream_url is not None for a in answers) == 2
            assert stack.state.prewarmer.waiting == 2
            assert stack.state.answering == 0
        finally:
            for caller in callers:
                await caller.aclose()
