"""A long backlog (a receiver back from an outage) must not make claims dearer.

The claim and next-due queries read each receiver's first due rows from an index that yields
them in order (``outbox_due_by_destination``), never every pending row: checked on the plans
SQLite makes (``EXPLAIN QUERY PLAN``) and on the work it does (its virtual machine's
instructions, counted by a progress handler: the same for a claim with 30 or 600 queued, where
timing would be noise). Files written before the index are upgraded when opened. The order and
fairness of claims across receivers is checked on both backends."""

from __future__ import annotations

import json
import sqlite3

from delivery_helpers import SECRET_ENV, T0, ended_event

from phoneagent.delivery.outbox import (
    _DUE_OF_RECEIVER_SQL,
    _RECEIVERS_SQL,
    OUTBOX_FILENAME,
    SQLiteOutbox,
    destination_of,
)

URL_A = "https://a.example/hooks/calls"
URL_B = "https://b.example:8443/hooks"
URL_C = "http://c.example/hooks"

# The outbox schema as phoneagent wrote it before outbox_due_by_destination (and before
# outbox_by_call): user_version 1.
OLD_SCHEMA = """
CREATE TABLE outbox (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    url TEXT NOT NULL,
    destination TEXT NOT NULL,
    secret_env TEXT NOT NULL,
    body BLOB NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    claim TEXT,
    last_attempt_at REAL,
    last_status INTEGER,
    last_error TEXT,
    delivered_at REAL
);
CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE status = 'pending';
CREATE INDEX outbox_by_status ON outbox (status, created_at);
CREATE TABLE open_calls (
    call_sid TEXT PRIMARY KEY,
    call TEXT NOT NULL,
    transcript TEXT NOT NULL DEFAULT '[]'
);
PRAGMA user_version = 1;
"""


async def fill(box, first: int, count: int, url: str, now: float) -> None:
    for n in range(first, first + count):
        assert await box.enqueue(ended_event(n), url=url, secret_env=SECRET_ENV, now=now)


def plan(db: sqlite3.Connection, sql: str, params: tuple) -> list[str]:
    return [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()]


async def test_the_claim_and_next_due_queries_use_the_index_in_order(tmp_path):
    box = await SQLiteOutbox.in_data_dir(tmp_path)
    try:
        await fill(box, 0, 20, URL_A, T0)
        await fill(box, 100, 5, URL_B, T0 + 1)
    finally:
        await box.close()
    with sqlite3.connect(tmp_path / OUTBOX_FILENAME) as db:
        db.execute("ANALYZE")  # statistics must not tempt the planner back to outbox_by_status
        plans = {
            "receivers": plan(db, _RECEIVERS_SQL, ()),
            "due rows": plan(db, _DUE_OF_RECEIVER_SQL, (destination_of(URL_A), T0, 8)),
        }
    for name, steps in plans.items():
        on_outbox = [s for s in steps if " outbox " in f"{s} "]
        assert on_outbox, (name, steps)
        for step in on_outbox:
            assert step.startswith("SEARCH outbox USING INDEX outbox_due_by_destination"), (
                name,
                steps,
            )
        assert not any("TEMP B-TREE" in s for s in steps), (name, steps)
    assert "(destination=? AND next_attempt_at<?)" in plans["due rows"][0]


async def vm_steps(box: SQLiteOutbox, work) -> int:
    """How many instructions SQLite's virtual machine ran during ``await work()``, on the
    outbox's own connection (the progress handler runs every 10)."""
    count = [0]

    def tick() -> int:
        count[0] += 10
        return 0  # go on

    await box._run(lambda: box._connection().set_progress_handler(tick, 10))
    try:
        await work()
    finally:
        await box._run(lambda: box._connection().set_progress_handler(None, 0))
    return count[0]


async def claim_cost(tmp_path, queued: int, *, busy: bool) -> int:
    """VM steps of one worker cycle (claim, next due) with ``queued`` events of receiver A
    waiting; ``busy``: A is at its limit and the claim must find B's one event behind them."""
    box = await SQLiteOutbox.in_data_dir(tmp_path / f"{queued}-{busy}")
    try:
        await fill(box, 0, queued, URL_A, T0)
        await fill(box, 10_000, 1, URL_B, T0 + 1)
        a, b = destination_of(URL_A), destination_of(URL_B)
        room = {a: 0} if busy else {}
        claimed = []

        async def cycle() -> None:
            claimed.extend(
                await box.claim_due(now=T0 + 2, limit=4, lease=30, room=room, default_room=8)
            )
            await box.next_due_at(skip=[a] if busy else [])

        steps = await vm_steps(box, cycle)
        if busy:
            assert [i.destination for i in claimed] == [b]
            assert await box.next_due_at(skip=[a]) == T0 + 32  # B's lease end, not A's backlog
        else:
            assert [i.destination for i in claimed] == [a] * 4
        return steps
    finally:
        await box.close()


async def test_a_claim_costs_the_same_whatever_the_backlog(tmp_path):
    small = await claim_cost(tmp_path, 30, busy=False)
    large = await claim_cost(tmp_path, 600, busy=False)
    # Reading every pending row made this 20 times larger; a few B-tree levels more are free
    # (the VM counts instructions, not page reads).
    assert large <= small * 1.2 + 50, (small, large)


async def test_a_busy_receivers_backlog_costs_the_others_nothing(tmp_path):
    small = await claim_cost(tmp_path, 30, busy=True)
    large = await claim_cost(tmp_path, 600, busy=True)
    assert large <= small * 1.2 + 50, (small, large)


async def test_claims_take_the_earliest_due_across_receivers_within_their_room(outbox):
    await fill(outbox, 0, 6, URL_A, T0)
    await fill(outbox, 100, 2, URL_B, T0 + 1)
    await fill(outbox, 200, 1, URL_C, T0 + 0.5)
    a, b, c = (destination_of(u) for u in (URL_A, URL_B, URL_C))

    first = await outbox.claim_due(now=T0 + 2, limit=3, lease=30, default_room=2)
    assert [(i.destination, i.next_attempt_at) for i in first] == [(a, T0 + 32)] * 2 + [
        (c, T0 + 32)
    ]
    # The worker's own count lowers A's room to 0 and B's to 1: B's earliest, then nothing more.
    second = await outbox.claim_due(now=T0 + 2, limit=5, lease=30, room={a: 0, b: 1})
    assert [i.destination for i in second] == [b]
    assert await outbox.next_due_at(skip=[a]) == T0 + 1  # B's second event
    assert await outbox.next_due_at(skip=[a, b]) == T0 + 32  # C's, under its lease
    assert await outbox.next_due_at(skip=[a, b, c]) is None


async def test_an_old_outbox_file_gains_the_index_when_opened(tmp_path):
    path = tmp_path / OUTBOX_FILENAME
    bodies = [ended_event(n).body() for n in range(3)]
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        for n, (url, due) in enumerate([(URL_A, T0 + 3), (URL_B, T0 + 1), (URL_A, T0 + 2)]):
            db.execute(
                "INSERT INTO outbox (id, type, url, destination, secret_env, body, status, "
                "created_at, next_attempt_at) "
                "VALUES (?, 'call.ended', ?, ?, ?, ?, 'pending', ?, ?)",
                (f"evt_{n}", url, destination_of(url), SECRET_ENV, bodies[n], T0, due),
            )
    db.close()

    box = await SQLiteOutbox.open(path)
    try:
        assert await box.next_due_at() == T0 + 1
        claimed = await box.claim_due(now=T0 + 5, limit=10, lease=30, default_room=8)
        assert [i.id for i in claimed] == ["evt_1", "evt_2", "evt_0"]
        assert [i.body for i in claimed] == [bodies[1], bodies[2], bodies[0]]
    finally:
        await box.close()
    with sqlite3.connect(path) as db:
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1  # older versions still open it
    db.close()
    assert "outbox_due_by_destination" in indexes
    assert "outbox_due" not in indexes


# --- PostgreSQL: the same queries' plans on a real server -------------------------------------


async def pg_backlog(url: str, queued: int) -> None:
    """``queued`` events of receiver A due first, then 50 of B, as analysed statistics see them."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE phoneagent_outbox")
        for prefix, destination, count, first_due in (("a", A, queued, 0), ("b", B, 50, 10**6)):
            await conn.execute(
                "INSERT INTO phoneagent_outbox (id, type, url, destination, secret_env, body, "
                "status, created_at, next_attempt_at) SELECT $1 || g, 'call.ended', $2, $2, "
                "'S', $3, 'pending', $4 + g, $4 + g FROM generate_series(1, $5) AS g",
                f"evt_{prefix}",
                destination,
                b"x" * 4000,
                float(first_due),
                count,
            )
        await conn.execute("ANALYZE phoneagent_outbox")
    finally:
        await conn.close()


A, B = destination_of(URL_A), destination_of(URL_B)
PG_NOW = 2e6


async def pg_plans(url: str) -> dict[str, tuple[str, int]]:
    """Each claim query's plan (EXPLAIN ANALYZE) and the buffers it touched, with A full."""
    import asyncpg

    from phoneagent.delivery.pg_outbox import _CLAIM_DUE, _NEXT_DUE

    queries = {
        "claim": (_CLAIM_DUE, (PG_NOW, [], [], 8, 32)),
        "claim, A full": (_CLAIM_DUE, (PG_NOW, [A], [0], 8, 32)),
        "next due": (_NEXT_DUE, ([],)),
        "next due, A skipped": (_NEXT_DUE, ([A],)),
    }
    conn = await asyncpg.connect(url)
    try:
        plans = {}
        for name, (sql, args) in queries.items():
            async with conn.transaction():  # FOR UPDATE: locks released at once
                rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, *args)
            root = json.loads(rows[0][0])[0]["Plan"]
            plans[name] = (json.dumps(root), root.get("Shared Hit Blocks", 0))
        return plans
    finally:
        await conn.close()


def scans(node: dict) -> list[tuple[str, str | None]]:
    found = [(node["Node Type"], node.get("Index Name"))] if "Relation Name" in node else []
    for child in node.get("Plans", []):
        found += scans(child)
    return found


async def test_on_postgresql_claims_read_each_receivers_first_rows_from_the_index(pg_database):
    from phoneagent.delivery.pg_outbox import PostgresOutbox

    box = await PostgresOutbox.open(pg_database)  # migrated: the index is step 10
    await box.close()
    await pg_backlog(pg_database, 100)
    small = await pg_plans(pg_database)
    await pg_backlog(pg_database, 5000)
    large = await pg_plans(pg_database)
    for name, (plan, blocks) in large.items():
        steps = scans(json.loads(plan))
        assert steps, (name, plan)
        assert all(
            kind in ("Index Scan", "Index Only Scan")
            and index == "phoneagent_outbox_due_by_destination"
            for kind, index in steps
        ), (name, steps)
        # The blocks read do not grow with A's backlog (a walk past it read hundreds more).
        assert blocks <= small[name][1] + 10, (name, small[name][1], blocks)
