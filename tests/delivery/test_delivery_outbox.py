"""The outbox: durability, claims and leases, fairness, and clear start-up errors.

The interface tests take ``outbox`` or ``outbox_store`` (tests/conftest.py) and run once per
backend, SQLite and PostgreSQL; the file's own failures (WAL, corruption, locks) are SQLite's.
PostgreSQL's own (several instances on one database, migration, a database that is down) are in
test_pg_outbox.py."""

from __future__ import annotations

import sqlite3

import pytest
from delivery_helpers import SECRET_ENV, T0, ended_event

from phoneagent.delivery.outbox import (
    OUTBOX_FILENAME,
    OutboxError,
    SQLiteOutbox,
    destination_of,
)

URL_A = "https://a.example/hooks/calls?token=abc"
URL_B = "https://b.example:8443/hooks"


async def enqueue(box, n, url=URL_A, now=T0):
    events = [ended_event(i) for i in range(n)]
    for event in events:
        assert await box.enqueue(event, url=url, secret_env=SECRET_ENV, now=now)
    return events


async def test_enqueue_is_durable_and_idempotent(outbox_store):
    box = await outbox_store()
    event = ended_event()
    assert await box.enqueue(event, url=URL_A, secret_env=SECRET_ENV, now=T0)
    assert not await box.enqueue(event, url=URL_A, secret_env=SECRET_ENV, now=T0 + 1)
    await box.close()

    reopened = await outbox_store()
    item = await reopened.get(event.id)
    assert item is not None
    assert (item.status, item.attempts, item.body) == ("pending", 0, event.body())
    assert (item.url, item.secret_env) == (URL_A, SECRET_ENV)
    assert item.destination == "https://a.example:443"
    assert item.next_attempt_at == item.created_at == T0


async def test_the_file_is_in_wal_mode(tmp_path):
    box = await SQLiteOutbox.in_data_dir(tmp_path)
    await box.close()
    with sqlite3.connect(tmp_path / OUTBOX_FILENAME) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_claim_takes_due_items_oldest_first_under_a_lease(outbox):
    early, late = ended_event(1), ended_event(2)
    await outbox.enqueue(late, url=URL_A, secret_env=SECRET_ENV, now=T0 + 5)
    await outbox.enqueue(early, url=URL_A, secret_env=SECRET_ENV, now=T0)
    assert await outbox.claim_due(now=T0 - 1, limit=10, lease=30) == []

    claimed = await outbox.claim_due(now=T0 + 10, limit=10, lease=30)
    assert [i.id for i in claimed] == [early.id, late.id]
    assert all(i.claim for i in claimed) and claimed[0].claim != claimed[1].claim
    # Claimed items are not due again until the lease ends: then another worker may take them.
    assert await outbox.claim_due(now=T0 + 39, limit=10, lease=30) == []
    assert await outbox.next_due_at() == T0 + 40
    again = await outbox.claim_due(now=T0 + 40, limit=10, lease=30)
    assert {i.id for i in again} == {early.id, late.id}


async def test_a_superseded_claim_cannot_overwrite_the_newer_attempt(outbox):
    [event] = await enqueue(outbox, 1)
    [first] = await outbox.claim_due(now=T0, limit=1, lease=10)
    [second] = await outbox.claim_due(now=T0 + 10, limit=1, lease=10)  # first's lease ran out
    assert await outbox.mark_delivered(event.id, second.claim, now=T0 + 11, status=204)
    assert not await outbox.mark_retry(
        event.id, first.claim, now=T0 + 12, at=T0 + 99, status=503, error="late"
    )
    item = await outbox.get(event.id)
    assert (item.status, item.last_status, item.attempts) == ("delivered", 204, 1)


async def test_per_destination_room_leaves_slots_for_other_receivers(outbox):
    await enqueue(outbox, 6, url=URL_A, now=T0)
    b_events = [ended_event(100 + i) for i in range(2)]
    for event in b_events:
        await outbox.enqueue(event, url=URL_B, secret_env=SECRET_ENV, now=T0 + 1)

    claimed = await outbox.claim_due(now=T0 + 2, limit=5, lease=30, default_room=2)
    by_destination = [i.destination for i in claimed]
    assert by_destination.count(destination_of(URL_A)) == 2
    assert by_destination.count(destination_of(URL_B)) == 2
    # A is full (room 0): its due items are skipped, not counted against B.
    room = {destination_of(URL_A): 0}
    assert await outbox.claim_due(now=T0 + 2, limit=5, lease=30, room=room) == []
    assert await outbox.next_due_at(skip=[destination_of(URL_A)]) == T0 + 32  # B's lease end
    assert await outbox.next_due_at() == T0


async def test_retry_dead_release_and_redeliver(outbox):
    a, b, c = await enqueue(outbox, 3)
    claims = {i.id: i.claim for i in await outbox.claim_due(now=T0, limit=3, lease=30)}

    assert await outbox.mark_retry(a.id, claims[a.id], now=T0 + 1, at=T0 + 300, status=503,
                                   error="HTTP 503")  # fmt: skip
    assert await outbox.mark_dead(b.id, claims[b.id], now=T0 + 1, status=410, error="gone")
    assert await outbox.release(c.id, claims[c.id], now=T0 + 2)

    item_a, item_b, item_c = [await outbox.get(e.id) for e in (a, b, c)]
    assert (item_a.status, item_a.attempts, item_a.next_attempt_at) == ("pending", 1, T0 + 300)
    assert (item_a.last_status, item_a.last_error, item_a.claim) == (503, "HTTP 503", None)
    assert (item_b.status, item_b.attempts, item_b.last_status) == ("failed", 1, 410)
    assert (item_c.status, item_c.attempts, item_c.next_attempt_at) == ("pending", 0, T0 + 2)
    # A dead letter cannot be marked again by a stale claim.
    assert not await outbox.mark_delivered(b.id, claims[b.id], now=T0 + 3, status=200)

    assert await outbox.counts() == {"pending": 2, "failed": 1, "delivered": 0}
    assert [i.id for i in await outbox.list(status="failed")] == [b.id]

    again = await outbox.redeliver(b.id, now=T0 + 50)
    assert (again.status, again.attempts, again.next_attempt_at) == ("pending", 0, T0 + 50)
    assert again.last_error == "gone"  # history kept until the next attempt
    assert await outbox.redeliver("evt_nope", now=T0) is None


async def test_list_is_newest_first_and_limited(outbox):
    for i in range(5):
        await outbox.enqueue(ended_event(i, event_id=f"evt_{i}"), url=URL_A,
                             secret_env=SECRET_ENV, now=T0 + i)  # fmt: skip
    assert [i.id for i in await outbox.list(limit=3)] == ["evt_4", "evt_3", "evt_2"]
    with pytest.raises(ValueError):
        await outbox.list(status="sent")


async def test_purge_removes_old_delivered_events_only(outbox):
    old, recent, waiting = await enqueue(outbox, 3)
    claims = {i.id: i.claim for i in await outbox.claim_due(now=T0, limit=3, lease=30)}
    await outbox.mark_delivered(old.id, claims[old.id], now=T0, status=200)
    await outbox.mark_delivered(recent.id, claims[recent.id], now=T0 + 100, status=200)
    assert await outbox.purge_delivered(before=T0 + 50) == 1
    assert await outbox.get(old.id) is None
    assert await outbox.get(recent.id) is not None and await outbox.get(waiting.id) is not None


# --- start-up errors: each names the file and says what to do --------------------------------


async def test_a_corrupt_file_is_a_clear_error_at_open(tmp_path):
    path = tmp_path / OUTBOX_FILENAME
    path.write_bytes(b"this is not a database, just some bytes of junk\n" * 200)
    with pytest.raises(OutboxError) as excinfo:
        await SQLiteOutbox.open(path)
    message = str(excinfo.value)
    assert str(path) in message and "not a readable SQLite database" in message
    assert "move the file aside" in message


async def test_a_damaged_database_is_a_clear_error_at_open(tmp_path):
    box = await SQLiteOutbox.in_data_dir(tmp_path)
    await enqueue(box, 3)
    await box.close()
    path = tmp_path / OUTBOX_FILENAME
    data = bytearray(path.read_bytes())
    data[:16] = b"SQLite format 2\x00"  # a header from nothing SQLite knows
    path.write_bytes(bytes(data))
    with pytest.raises(OutboxError, match="not a readable SQLite database"):
        await SQLiteOutbox.open(path)


async def test_a_locked_file_is_a_clear_error_at_open(tmp_path):
    path = tmp_path / OUTBOX_FILENAME
    await (await SQLiteOutbox.open(path)).close()  # create it
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process mid-write, and never finishing
    try:
        with pytest.raises(OutboxError) as excinfo:
            await SQLiteOutbox.open(path, busy_timeout=0.05)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    message = str(excinfo.value)
    assert str(path) in message and "locked by another process" in message
    assert "PHONEAGENT_DATA_DIR" in message


async def test_an_unusable_data_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(
        OutboxError, match=r"cannot create the data directory .*PHONEAGENT_DATA_DIR"
    ):
        await SQLiteOutbox.in_data_dir(blocker / "data")

    (tmp_path / "dir.sqlite3").mkdir()  # the database path is a directory
    with pytest.raises(OutboxError, match=r"dir\.sqlite3"):
        await SQLiteOutbox.open(tmp_path / "dir.sqlite3")


async def test_a_file_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / OUTBOX_FILENAME
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=7")
    with pytest.raises(OutboxError, match="newer phoneagent"):
        await SQLiteOutbox.open(path)


async def test_a_closed_outbox_says_so(outbox_store):
    box = await outbox_store()
    await box.close()
    await box.close()  # twice is fine
    with pytest.raises(OutboxError, match="closed"):
        await box.counts()


async def test_open_calls_are_journalled_and_closed_with_their_event(outbox):
    await outbox.open_call("CA1", {"persona_id": "p", "started_at": T0})
    await outbox.open_call("CA2", {"persona_id": "q", "started_at": T0 + 1})
    await outbox.add_turn("CA1", {"role": "caller", "text": "hello", "end_ms": 900})
    await outbox.add_turn("CA1", {"role": "agent", "text": "hi", "end_ms": 1800})
    assert await outbox.open_calls() == [
        ("CA1", {"persona_id": "p", "started_at": T0},
         [{"role": "caller", "text": "hello", "end_ms": 900},
          {"role": "agent", "text": "hi", "end_ms": 1800}]),
        ("CA2", {"persona_id": "q", "started_at": T0 + 1}, []),
    ]  # fmt: skip
    await outbox.enqueue(ended_event(1), url=URL_A, secret_env=SECRET_ENV, now=T0,
                         closes_call="CA1")  # fmt: skip
    await outbox.open_call("CA2", {"persona_id": "q", "started_at": T0 + 9})  # back: fresh
    assert await outbox.open_calls() == [("CA2", {"persona_id": "q", "started_at": T0 + 9}, [])]
    await outbox.close_call("CA2")
    assert await outbox.open_calls() == []


async def test_a_turn_finished_again_replaces_its_earlier_self_in_the_open_call(outbox):
    """A barge-in cuts an agent's turn that was final: the call's record replaces it with what
    the caller heard (same role and start), and so does the journal a lost call is ended from."""
    greeting = {"role": "agent", "text": "Hello, how can I help?", "start_ms": 0, "end_ms": 1500,
                "interrupted": False}  # fmt: skip
    question = {"role": "caller", "text": "When are you open?", "start_ms": 1800,
                "end_ms": 2600, "interrupted": False}  # fmt: skip
    answer = {"role": "agent", "text": "We are open Monday to Friday.", "start_ms": 2900,
              "end_ms": 5200, "interrupted": False}  # fmt: skip
    cut = answer | {"text": "We are open", "end_ms": 3700, "interrupted": True}
    over = {"role": "caller", "text": "Sorry, Saturday?", "start_ms": 3500, "end_ms": 4400,
            "interrupted": False}  # fmt: skip
    await outbox.open_call("CA1", {"persona_id": "p", "started_at": T0})
    for turn in (greeting, question, answer, over, cut):
        await outbox.add_turn("CA1", turn)
    [(_, _, turns)] = await outbox.open_calls()
    assert turns == [greeting, question, cut, over]  # where the answer was, once
    # Another turn at the same start by the other side is its own turn.
    also = {"role": "caller", "text": "Hm.", "start_ms": 2900, "end_ms": 3100,
            "interrupted": False}  # fmt: skip
    await outbox.add_turn("CA1", also)
    await outbox.add_turn("CA1", cut)  # the same cut again: still once
    [(_, _, turns)] = await outbox.open_calls()
    assert turns == [greeting, question, cut, over, also]


async def test_the_journal_keeps_turns_with_text_a_database_refuses_as_near_as_it_can(outbox):
    """A caller's words may hold a NUL, a model's a lost half of an emoji: PostgreSQL's jsonb
    refuses both, and the turn would be missing from a lost call's report."""
    odd = {"role": "caller", "text": "a\x00b \ud83d", "start_ms": 0, "end_ms": 900}
    await outbox.open_call("CA1", {"persona_id": "p", "persona_name": "Nul\x00", "started_at": T0})
    await outbox.add_turn("CA1", odd)
    [(_, call, [turn])] = await outbox.open_calls()
    assert turn["text"] in ("a\x00b \ud83d", "a\ufffdb \ufffd")  # SQLite keeps it as it is
    assert turn["end_ms"] == 900 and call["persona_name"].startswith("Nul")


def test_destination_is_the_origin():
    assert destination_of("https://Hooks.Example/a?b=c") == "https://hooks.example:443"
    assert destination_of("http://127.0.0.1:8080/x") == "http://127.0.0.1:8080"
    assert destination_of("http://[::1]/x") == "http://[::1]:80"


async def test_a_calls_items_are_found_by_its_call_sid_oldest_first(outbox):
    from phoneagent.delivery.events import call_started_event

    started = call_started_event(
        call_sid=f"CA{7:032x}",
        persona_id="bright-smile-dental",
        persona_name="Bright Smile Dental front desk",
        from_number="+14155550123",
        to_number="+14155550100",
        started_at=T0 - 95.5,
    )
    ended, other = ended_event(7), ended_event(8)
    await outbox.enqueue(ended, url=URL_A, secret_env=SECRET_ENV, now=T0)
    await outbox.enqueue(started, url=URL_A, secret_env=SECRET_ENV, now=T0 - 95)
    await outbox.enqueue(other, url=URL_A, secret_env=SECRET_ENV, now=T0)
    await outbox.enqueue(ended, url=URL_B, secret_env=SECRET_ENV, now=T0 + 1)  # a duplicate id
    items = await outbox.for_call(f"CA{7:032x}")
    assert [(i.id, i.type) for i in items] == [
        (started.id, "call.started"),
        (ended.id, "call.ended"),
    ]
    [claimed] = await outbox.claim_due(now=T0 - 90, limit=1, lease=30)
    await outbox.mark_delivered(claimed.id, claimed.claim, now=T0 - 89, status=204)
    assert [i.status for i in await outbox.for_call(f"CA{7:032x}")] == ["delivered", "pending"]
    assert [i.id for i in await outbox.for_call(f"CA{7:032x}", limit=1)] == [started.id]
    assert await outbox.for_call(f"CA{9:032x}") == []
    assert await outbox.for_call("' OR 1=1 --") == []


async def test_finding_a_calls_items_uses_an_index_and_a_body_that_is_not_json_is_kept(tmp_path):
    # Every body is an Event's JSON; if one were not, enqueueing must not fail on the index.
    from phoneagent.delivery.events import Event

    box = await SQLiteOutbox.in_data_dir(tmp_path)
    try:

        class NotJson(Event):
            def body(self) -> bytes:
                return b"\xff not json"

        odd = NotJson(id="evt_odd", type="call.ended", timestamp="2027-01-15T08:00:00.000Z")
        assert await box.enqueue(odd, url=URL_A, secret_env=SECRET_ENV, now=T0)
        assert await box.for_call("CA" + "0" * 32) == []
    finally:
        await box.close()
    with sqlite3.connect(tmp_path / OUTBOX_FILENAME) as db:
        from phoneagent.delivery.outbox import _CALL_OF_BODY

        plan = db.execute(
            f"EXPLAIN QUERY PLAN SELECT id FROM outbox WHERE {_CALL_OF_BODY} = ? "
            "ORDER BY created_at, id",
            ("CA" + "0" * 32,),
        ).fetchall()
    assert "outbox_by_call" in str(plan)
