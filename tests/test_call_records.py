"""Call records behind one interface, the same tests against both stores (memory and
PostgreSQL), and what the facade adds: this instance's view at once, the shared store in the
call's order, retried while the database is away."""

from __future__ import annotations

import asyncio
import time

import pytest
import structlog

from phoneagent.delivery.outbox import OutboxError
from phoneagent.delivery.pg_outbox import PostgresOutbox
from phoneagent.records import (
    Answered,
    CallRecord,
    CallRecords,
    StreamEnded,
    StreamStarted,
    TransferNotAnswered,
    Transferred,
    TurnFinished,
    TwilioReported,
)
from phoneagent.records.memory import MemoryCallRecords
from phoneagent.records.postgres import PostgresCallRecords
from phoneagent.records.record import apply, transfer_taken

SID = "CA" + "1" * 32
TURN_1 = {"role": "agent", "text": "您好，这里是明珠牙科。", "start_ms": 0, "end_ms": 2100,
          "interrupted": False}  # fmt: skip
TURN_2 = {"role": "caller", "text": "I'd like to book — 下周二 please.", "start_ms": 2500,
          "end_ms": 4000, "interrupted": False}  # fmt: skip


@pytest.fixture(params=["memory", "postgres"])
async def stores(request):
    """Opens call-record stores of the parametrized backend: with PostgreSQL each is one more
    "instance" on the same database; in memory, there is one instance's store."""
    opened: list[PostgresOutbox] = []
    memory = MemoryCallRecords()

    async def open_store():
        if request.param == "memory":
            return memory
        outbox = await PostgresOutbox.open(request.getfixturevalue("pg_database"))
        opened.append(outbox)
        return PostgresCallRecords(outbox)

    open_store.backend = request.param
    yield open_store
    for outbox in opened:
        await outbox.close()


def expected(*changes) -> CallRecord:
    record = CallRecord(SID)
    for change in changes:
        apply(record, change)
    return record


A_CALL = (
    Answered("bright-smile-dental", "+14155550123", "+14155550100"),
    TwilioReported({"CallStatus": "ringing", "path": "/twilio/call-status"}),
    StreamStarted(
        at=1000.5,
        persona="bright-smile-dental",
        model_session="sess_1",
        caller="+14155550123",
        called="+14155550100",
    ),
    TwilioReported({"StreamEvent": "stream-started", "path": "/twilio/stream-status"}),
    TurnFinished(TURN_1),
    TurnFinished(TURN_2),
    Transferred({"target": "front_desk", "number": "+14155550999"}),
    StreamEnded(
        at=1010.25,
        end_reason="transferred",
        transcript=[TURN_1, TURN_2],
        stats={"barge_ins": 1, "first_audio_ms": 412},
    ),
)


async def test_a_call_written_step_by_step_reads_back_whole(stores):
    store = await stores()
    for change in A_CALL:
        await store.write(SID, change, at=time.time())
    record = await store.get(SID)
    assert record == expected(*A_CALL)
    assert record.status == "completed"  # ended while in progress
    assert record.transcript[0]["text"] == "您好，这里是明珠牙科。"
    assert await store.get("CA" + "0" * 32) is None


async def test_turns_are_appended_in_order_and_the_end_replaces_them(stores):
    store = await stores()
    await store.write(SID, TurnFinished(TURN_1), at=1.0)
    await store.write(SID, TurnFinished(TURN_2), at=2.0)
    assert [t["role"] for t in (await store.get(SID)).transcript] == ["agent", "caller"]
    whole = [TURN_2, TURN_1, TURN_2]  # the whole call's, an earlier stream's turns first
    await store.write(SID, StreamEnded(at=3.0, end_reason="caller_hung_up", transcript=whole,
                                       stats={}), at=3.0)  # fmt: skip
    assert (await store.get(SID)).transcript == whole


async def test_what_the_webhook_says_never_overwrites_what_the_stream_said(stores):
    # The stream may reach its instance, and be written, before the webhook's instance writes.
    store = await stores()
    await store.write(SID, StreamStarted(at=5.0, persona="p", model_session="s",
                                         caller="client:alice", called="+1415"), at=1)  # fmt: skip
    await store.write(SID, Answered("other", "+1999", "+1888"), at=2)
    record = await store.get(SID)
    assert (record.persona, record.caller, record.called) == ("p", "client:alice", "+1415")
    assert record.status == "in-progress"


async def test_a_final_status_from_twilio_is_kept_and_a_returning_stream_is_live_again(stores):
    store = await stores()
    await store.write(SID, StreamStarted(at=1.0, persona="p", model_session="s1"), at=1)
    await store.write(SID, StreamEnded(at=2.0, end_reason="transferred", transcript=[TURN_1],
                                       stats={}), at=2)  # fmt: skip
    assert (await store.get(SID)).status == "completed"
    await store.write(SID, StreamStarted(at=3.0, persona="p", model_session="s2"), at=3)
    record = await store.get(SID)
    # Back from a transfer: live again, the end of the first stream cleared, its turns kept.
    assert (record.ended_at, record.end_reason, record.model_session) == (None, None, "s2")
    assert record.transcript == [TURN_1]
    assert record.status == "completed"  # Twilio's (or our) final word is not undone
    await store.write(SID, TwilioReported({"CallStatus": "no-answer"}), at=4)
    assert (await store.get(SID)).status == "no-answer"


async def test_a_late_callback_does_not_turn_a_call_that_is_over_back(stores):
    """Twilio's status callbacks are not sent in order: "ringing" or "in-progress" arriving
    after "completed" leaves the call completed (its events are all kept)."""
    store = await stores()
    await store.write(SID, TwilioReported({"CallStatus": "in-progress"}), at=1)
    await store.write(SID, TwilioReported({"CallStatus": "completed"}), at=2)
    await store.write(SID, TwilioReported({"CallStatus": "ringing"}), at=3)
    await store.write(SID, TwilioReported({"CallStatus": "in-progress"}), at=4)
    await store.write(SID, TwilioReported({"StreamEvent": "stream-stopped"}), at=5)
    record = await store.get(SID)
    assert record.status == "completed"
    assert [e.get("CallStatus") for e in record.twilio_events] == [
        "in-progress", "completed", "ringing", "in-progress", None
    ]  # fmt: skip


async def test_a_turn_finished_again_after_a_barge_in_replaces_the_one_recorded(stores):
    store = await stores()
    await store.write(SID, TurnFinished(TURN_1), at=1)
    await store.write(SID, TurnFinished(TURN_2), at=2)
    cut = dict(TURN_1, text="您好，这里", end_ms=900, interrupted=True)
    await store.write(SID, TurnFinished(cut), at=3)
    assert (await store.get(SID)).transcript == [cut, TURN_2]


async def test_a_failed_transfer_is_cleared(stores):
    store = await stores()
    await store.write(SID, Transferred({"target": "t", "number": "+1"}), at=1)
    await store.write(SID, Transferred(None), at=2)
    assert (await store.get(SID)).transfer is None


async def test_a_transfer_nobody_answered_is_kept_with_its_dial_status(stores):
    """The Dial action and the returning stream both say so (maybe on two instances): once or
    twice, the transfer stays, marked; the call's next part is not a transfer; a transfer
    that part makes is its own."""
    store, other = await stores(), await stores()
    transfer = {"target": "front_desk", "number": "+14155550111", "reason": "billing"}
    steps = (
        Transferred(transfer),
        StreamEnded(at=10.0, end_reason="transferred", transcript=[TURN_1], stats={}),
        TransferNotAnswered("no-answer"),
        TransferNotAnswered("no-answer"),
        StreamStarted(at=40.0, persona="bright-smile-dental", model_session="sess_2"),
        StreamEnded(at=50.0, end_reason="caller_hung_up", transcript=[TURN_1], stats={}),
    )
    for at, change in enumerate(steps):
        await (store if at % 2 else other).write(SID, change, at=at)
    record = await store.get(SID)
    assert record == expected(*steps)
    assert record.transfer == transfer | {"error": "no-answer"}
    assert transfer_taken(record) is None
    again = {"target": "billing", "number": "+14155550122", "reason": None}
    await store.write(SID, Transferred(again), at=10)
    assert transfer_taken(await other.get(SID)) == again


async def test_a_transfer_nobody_answered_changes_nothing_without_a_transfer(stores):
    store = await stores()
    await store.write(SID, TransferNotAnswered("busy"), at=1)  # the first write of the call
    await store.write(SID, Transferred(None), at=2)
    await store.write(SID, TransferNotAnswered("busy\x00"), at=3)
    assert (await store.get(SID)).transfer is None


async def test_text_with_nul_characters_is_kept_without_them(stores):
    # PostgreSQL's jsonb refuses U+0000: such a turn must not block the call's record for ever.
    store = await stores()
    turn = dict(TURN_1, text="a\x00b")
    await store.write(SID, TurnFinished(turn), at=1)
    [kept] = (await store.get(SID)).transcript
    assert kept["text"] in ("a\x00b", "a\ufffdb")  # memory keeps it; the database replaces it


async def test_text_that_is_not_unicode_and_numbers_json_lacks_are_kept_as_near_as_can_be(stores):
    # A lone surrogate (half an emoji, split across two model deltas) cannot be encoded for the
    # database, and jsonb refuses NaN: neither may lose the call's end or block its record.
    store = await stores()
    turn = dict(TURN_1, text="a\ud83d" + "\ude00b\udcff")
    ended = StreamEnded(at=2.0, end_reason="caller_hung_up", transcript=[turn],
                        stats={"barge_in_reaction_ms": [float("nan"), 1.5]})  # fmt: skip
    await store.write(SID, TurnFinished(turn), at=1)
    await store.write(SID, ended, at=2)
    record = await store.get(SID)
    assert record.end_reason == "caller_hung_up"
    assert record.transcript[0]["text"] in (turn["text"], "a\U0001f600b\ufffd")
    assert record.stats["barge_in_reaction_ms"][1] == 1.5


async def test_replayed_status_callbacks_do_not_grow_a_record_without_bound(stores):
    # Twilio's signature has no timestamp: one captured status callback can be sent again and
    # again, each appended to the record (rewritten whole in PostgreSQL at every append).
    from phoneagent.records.record import TWILIO_EVENTS_KEPT

    store = await stores()
    for n in range(TWILIO_EVENTS_KEPT + 30):
        await store.write(SID, TwilioReported({"CallStatus": "ringing", "n": n}), at=n)
    await store.write(SID, TwilioReported({"CallStatus": "completed"}), at=1000)
    record = await store.get(SID)
    assert len(record.twilio_events) == TWILIO_EVENTS_KEPT
    assert record.twilio_events[-1] == {"CallStatus": "completed"}  # the latest are kept
    assert record.status == "completed"


async def test_odd_text_in_plain_columns_never_blocks_the_record(stores):
    # PostgreSQL's text refuses NUL as jsonb does: a model's session id (from the model's own
    # server) holding one made the change, and every later one of the call, fail for ever.
    store = await stores()
    await store.write(SID, StreamStarted(at=1.0, persona="p", model_session="s\x00x",
                                         caller="+1\ud800"), at=1)  # fmt: skip
    await store.write(SID, StreamEnded(at=2.0, end_reason="caller_hung_up", transcript=[],
                                       stats={}), at=2)  # fmt: skip
    record = await store.get(SID)
    assert record.end_reason == "caller_hung_up"
    assert record.model_session in ("s\x00x", "s\ufffdx")


async def test_old_records_are_purged(stores):
    store = await stores()
    await store.write(SID, Answered("p", "+1", "+2"), at=100.0)
    await store.write("CA" + "2" * 32, Answered("p", "+1", "+2"), at=200.0)
    assert await store.purge(before=150.0) == 1
    assert await store.get(SID) is None
    assert await store.get("CA" + "2" * 32) is not None


def sid(n: int) -> str:
    return f"CA{n:032x}"


async def a_call(store, n, *, caller, persona="dental", started=None, ended=None, at=None):
    """Call ``n``: answered, its stream started at ``started`` (None: never), ended at ``ended``
    (None: still live), last changed at ``at``."""
    at = at if at is not None else (ended or started or 0.0)
    await store.write(sid(n), Answered(persona, caller, "+14155550100"), at=at)
    if started is not None:
        await store.write(sid(n), StreamStarted(at=started, persona=persona, model_session="s"),
                          at=at)  # fmt: skip
    if ended is not None:
        await store.write(sid(n), StreamEnded(at=ended, end_reason="caller_hung_up",
                                              transcript=[], stats={}), at=at)  # fmt: skip


async def test_live_calls_are_started_not_ended_and_changed_recently(stores):
    store = await stores()
    await a_call(store, 1, caller="+14155550001", started=1000.0, at=1000.0)  # quiet for long
    await a_call(store, 2, caller="+14155550002", started=5000.0, at=5050.0)
    await a_call(store, 3, caller="+14155550003", started=5100.0, at=5100.0)
    await a_call(store, 4, caller="+14155550004", started=5000.0, ended=5060.0)  # over
    await a_call(store, 5, caller="+14155550005", at=5100.0)  # answered, no stream yet
    live = await store.live(updated_since=4000.0)
    assert [r.call_sid for r in live] == [sid(3), sid(2)]  # the latest started first
    assert live[0].caller == "+14155550003" and live[0].status == "in-progress"
    assert [r.call_sid for r in await store.live(1, updated_since=4000.0)] == [sid(3)]
    assert len(await store.live(updated_since=0.0)) == 3


async def test_recent_calls_are_searched_by_number_persona_and_time_newest_first(stores):
    store = await stores()
    await a_call(store, 1, caller="+14155550123", started=1000.0, ended=1100.0)
    await a_call(store, 2, caller="+442071234567", started=2000.0, ended=2100.0, persona="luca")
    await a_call(store, 3, caller="+14155550199", started=3000.0)  # live
    await a_call(store, 4, caller="anonymous", at=2500.0)  # never streamed: its last change
    found = await store.search()
    assert [r.call_sid for r in found] == [sid(3), sid(4), sid(2), sid(1)]
    assert [r.call_sid for r in await store.search(limit=2)] == [sid(3), sid(4)]
    assert [r.call_sid for r in await store.search(number="555012")] == [sid(1)]
    assert [r.call_sid for r in await store.search(number="+4420")] == [sid(2)]
    assert [r.call_sid for r in await store.search(number="55501")] == [
        sid(3),
        sid(4),
        sid(2),
        sid(1),
    ]
    # The called number matches too: every call here was to the dental line.
    assert len(await store.search(number="4155550100")) == 4
    assert await store.search(number="%") == [] and await store.search(number="_") == []
    assert [r.call_sid for r in await store.search(persona="luca")] == [sid(2)]
    assert [r.call_sid for r in await store.search(since=2000.0, until=3000.0)] == [
        sid(4),
        sid(2),
    ]
    assert [r.call_sid for r in await store.search(number="0123", persona="luca")] == []
    [whole] = await store.search(number="0123")
    assert (whole.persona, whole.end_reason, whole.ended_at) == ("dental", "caller_hung_up", 1100)


async def test_searches_use_the_index_of_the_call_time(pg_database):
    outbox = await PostgresOutbox.open(pg_database)
    try:
        async with outbox.connection() as conn, conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")  # a tiny table: force the choice
            plan = await conn.fetch(
                "EXPLAIN SELECT call_sid FROM phoneagent_calls WHERE "
                "COALESCE(started_at, updated_at) >= 1 ORDER BY COALESCE(started_at, updated_at) "
                "DESC LIMIT 50"
            )
    finally:
        await outbox.close()
    assert "phoneagent_calls_recent" in "\n".join(row[0] for row in plan)


async def test_two_instances_writing_one_call_at_once_lose_nothing(pg_database):
    first_outbox = await PostgresOutbox.open(pg_database)
    second_outbox = await PostgresOutbox.open(pg_database)
    first, second = PostgresCallRecords(first_outbox), PostgresCallRecords(second_outbox)
    turns = [dict(TURN_1, start_ms=i) for i in range(20)]
    events = [{"StreamEvent": f"e{i}"} for i in range(20)]
    await asyncio.gather(
        *(first.write(SID, TurnFinished(t), at=1) for t in turns),
        *(second.write(SID, TwilioReported(e), at=1) for e in events),
    )
    record = await second.get(SID)
    await first_outbox.close()
    await second_outbox.close()
    assert sorted(t["start_ms"] for t in record.transcript) == list(range(20))
    assert len(record.twilio_events) == 20


# --- the facade: this instance's view, and the shared store ------------------------------


class FlakyStore(MemoryCallRecords):
    """A shared store whose database is away for the first ``failures`` writes."""

    def __init__(self, failures: int):
        super().__init__()
        self.failures = failures
        self.attempts = 0

    async def write(self, call_sid, change, *, at):
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise OutboxError("the database postgresql://u:***@db/x: ConnectionRefusedError")
        await asyncio.sleep(0.001)  # a round trip: later writes could overtake
        await super().write(call_sid, change, at=at)


async def test_the_view_changes_at_once_and_the_shared_store_in_the_calls_order():
    shared = FlakyStore(failures=0)
    calls = CallRecords(shared)
    for change in A_CALL:
        calls.note(SID, change)
    assert calls.get(SID) == expected(*A_CALL)  # this instance's view, without awaiting
    assert await calls.fetch(SID) == expected(*A_CALL)  # waits for its own writes
    assert calls.pending == 0


async def test_writes_the_database_refuses_are_retried_in_order_and_readiness_says_so(
    monkeypatch,
):
    monkeypatch.setattr("phoneagent.records.call_records.RETRY_FIRST", 0.01)
    shared = FlakyStore(failures=3)
    calls = CallRecords(shared)
    calls.note(SID, TurnFinished(TURN_1))
    calls.note(SID, TurnFinished(TURN_2))
    await asyncio.sleep(0.005)
    assert calls.problem is not None and "cannot be written" in calls.problem
    assert "***" in calls.problem
    for _ in range(200):
        if not calls.pending:
            break
        await asyncio.sleep(0.01)
    assert calls.problem is None
    assert [t["role"] for t in (await shared.get(SID)).transcript] == ["agent", "caller"]
    assert shared.attempts == 5


class BrokenStore(MemoryCallRecords):
    """A shared store that cannot take one kind of change (a bug of ours, not the database)."""

    async def write(self, call_sid, change, *, at):
        if isinstance(change, TurnFinished) and change.turn["role"] == "agent":
            raise TypeError("Object of type bytes is not JSON serializable")
        await super().write(call_sid, change, at=at)


async def test_a_change_the_store_cannot_take_is_logged_counted_and_the_next_ones_written():
    unshared = []
    shared = BrokenStore()
    calls = CallRecords(shared, on_unshared=lambda: unshared.append(1))
    with structlog.testing.capture_logs() as logs:
        calls.note(SID, TurnFinished(TURN_1))  # the agent's: refused
        calls.note(SID, TurnFinished(TURN_2))
        assert await calls.written(SID)
    assert [t["role"] for t in (await shared.get(SID)).transcript] == ["caller"]
    assert unshared == [1] and calls.problem is None
    [logged] = [e for e in logs if e["event"] == "call_record_not_shared"]
    assert logged["reason"] == "TypeError" and logged["change"] == "TurnFinished"


async def test_a_read_falls_back_to_this_instances_view_while_the_database_is_away():
    class Away(MemoryCallRecords):
        async def get(self, call_sid):
            raise OutboxError("the database is away")

    calls = CallRecords(Away())
    calls.note(SID, Answered("p", "+1", "+2"))
    assert (await calls.fetch(SID)).persona == "p"


async def test_live_and_search_fall_back_to_this_instances_view_while_the_database_is_away():
    class Away(MemoryCallRecords):
        async def live(self, limit=100, *, updated_since):
            raise OutboxError("the database postgresql://u:***@db/x: ConnectionRefusedError")

        async def search(self, *args, **kwargs):
            raise OutboxError("the database postgresql://u:***@db/x: ConnectionRefusedError")

    calls = CallRecords(Away())
    calls.note(SID, StreamStarted(at=time.time(), persona="p", model_session="s", caller="+1555"))
    assert [r.call_sid for r in await calls.live()] == [SID]
    assert "cannot be read" in calls.read_problem and "***" in calls.read_problem
    assert [r.call_sid for r in await calls.search(number="555")] == [SID]
    assert await calls.search(number="999") == []


async def test_on_a_database_that_is_away_live_and_search_are_errors_the_facade_survives(
    pg_database,
):
    outbox = await PostgresOutbox.open(pg_database)
    store = PostgresCallRecords(outbox)
    await outbox.close()  # as good as a database that went away
    with pytest.raises(OutboxError):
        await store.live(updated_since=0.0)
    with pytest.raises(OutboxError):
        await store.search(number="555")
    calls = CallRecords(store)
    started = StreamStarted(at=time.time(), persona="p", model_session="s", caller="+1555")
    calls.local.apply_now(SID, started, at=time.time())  # this instance's view
    assert [r.call_sid for r in await calls.live()] == [SID]
    assert [r.call_sid for r in await calls.search(number="555")] == [SID]
    assert "cannot be read" in calls.read_problem


async def test_live_and_search_read_the_shared_store_when_it_answers():
    shared = MemoryCallRecords()  # another instance wrote the call there
    started = StreamStarted(at=time.time(), persona="p", model_session="s")
    await shared.write(SID, started, at=time.time())
    calls = CallRecords(shared)
    calls.read_problem = "stale"
    assert [r.call_sid for r in await calls.live()] == [SID]
    assert calls.read_problem is None
    assert [r.call_sid for r in await calls.search(persona="p")] == [SID]
    assert CallRecords().get(SID) is None and await CallRecords().live() == []


async def test_a_call_quiet_for_an_hour_is_no_longer_live():
    now = [10_000.0]
    calls = CallRecords(clock=lambda: now[0])
    calls.note(SID, StreamStarted(at=now[0], persona="p", model_session="s"))
    assert len(await calls.live()) == 1
    now[0] += 3601
    assert await calls.live() == []


async def test_closing_gives_up_on_writes_that_cannot_land(monkeypatch):
    monkeypatch.setattr("phoneagent.records.call_records.RETRY_FIRST", 0.01)
    calls = CallRecords(FlakyStore(failures=10**9))
    calls.note(SID, TurnFinished(TURN_1))
    await calls.close(0.05)
    assert calls.pending == 0


async def test_without_a_shared_store_records_stay_in_this_instances_memory():
    calls = CallRecords()
    calls.note(SID, Answered("p", "+1", "+2"))
    assert calls.pending == 0
    assert (await calls.fetch(SID)).caller == "+1"


async def test_a_calls_context_is_written_once_and_read_back(stores):
    # The webhook that connects the stream writes the context; a replay, or a transfer's
    # return (which knows no context), leaves it as it is.
    store = await stores()
    context = ("inbound", {"name": "Dana", "when": "Thursday's {cleaning}"}, {"crm": [7, None]})
    await store.write(SID, StreamStarted(at=1.0, persona="p", model_session="s"), at=1)
    await store.write(SID, Answered("p", "+1", "+2", *context), at=2)
    await store.write(SID, Answered("p", "+1", "+2", "outbound", {"name": "Eve"}, {}), at=3)
    await store.write(SID, Answered("p", "+1", "+2"), at=4)
    record = await store.get(SID)
    assert (record.direction, record.variables, record.metadata) == context
    assert record == expected(
        StreamStarted(at=1.0, persona="p", model_session="s"), Answered("p", "+1", "+2", *context)
    )
    # A record that never got a context (a console call) says so: no direction.
    await store.write("CA" + "2" * 32, Answered("p", "+1", "+2"), at=5)
    assert (await store.get("CA" + "2" * 32)).direction == ""


async def test_written_waits_for_this_instances_changes_but_not_on_a_database_that_is_away(
    monkeypatch,
):
    # The voice webhook waits for the call's context to be shared before it answers (the
    # stream may reach another instance), but never on a database that refuses writes.
    shared = FlakyStore(failures=0)
    calls = CallRecords(shared)
    calls.note(SID, Answered("p", "+1", "+2", "inbound", {"name": "Dana"}, {}))
    assert await calls.written(SID)
    assert (await shared.get(SID)).variables == {"name": "Dana"}

    monkeypatch.setattr("phoneagent.records.call_records.RETRY_FIRST", 5.0)
    away = CallRecords(FlakyStore(failures=1000))
    away.note(SID, Answered("p", "+1", "+2", "inbound", {"name": "Dana"}, {}))
    await asyncio.sleep(0.01)  # the first write refused: the store is failing
    began = time.monotonic()
    assert not await away.written(SID)
    # Not the 5 s of the next retry (RETRY_FIRST): a margin a loaded machine's stalls never
    # reach, well short of that.
    assert time.monotonic() - began < 1.0
    await away.close(0.01)
    assert await CallRecords().written(SID)  # no shared store: nothing to wait for
