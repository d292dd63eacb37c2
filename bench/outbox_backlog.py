"""CPU per claimed event of the SQLite outbox as its backlog grows: does a claim cost the same
with 500 events queued as with 20,000 (a receiver back from a long outage)?

    python bench/outbox_backlog.py [--sizes 500,4000,20000] [--claims 500] [--data-dir DIR]
                                   [--postgres | --database-url URL]

For each size, a fresh outbox (``SQLiteOutbox``, WAL, ``synchronous=FULL``) in a temporary
data directory is filled through ``enqueue`` with that many realistic ``call.ended`` events
(bench/outbox.py's, about 6.7 KB) for one receiver, then ``--claims`` of them are delivered as
the worker does at concurrency 1: ``claim_due`` (with the worker's room arguments),
``mark_delivered``, ``next_due_at``. Nothing is sent: this is the store's share of a delivery.

A second scenario queues the same backlog for a receiver that is at its limit (its deliveries
all in flight, so ``room`` gives it none and ``next_due_at`` skips it) and ``--claims`` events
for another receiver, due after the whole backlog: the busy receiver's backlog must not make
the other's claims dearer.

With ``--postgres`` (a throwaway durable cluster, as bench/outbox.py starts) or
``--database-url`` the same rows run on ``PostgresOutbox`` too, each size in a schema of its own.

CPU is this process's (user + system, every thread, so the outbox's SQLite thread included)
and the PostgreSQL server's (all its processes, when it runs on this machine), per claimed
event; the ratio compares each size's total with the smallest size's, same store and scenario,
in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sqlite3
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path

from outbox import Postgres, SQLite, Store, event

from phoneagent.delivery.outbox import Outbox, destination_of
from phoneagent.delivery.stores import open_outbox

BUSY_URL = "https://busy.example.com/hooks/calls"
OTHER_URL = "https://other.example.com/hooks/calls"
PER_DESTINATION = 8  # the worker's default per-receiver limit


async def fill(outbox: Outbox, count: int, url: str, first: int, now: float) -> None:
    for n in range(first, first + count):
        await outbox.enqueue(event(n), url=url, secret_env="BENCH_SECRET", now=now)


async def drain(
    outbox: Outbox, store: Store, claims: int, busy: str | None
) -> tuple[float, float, float | None]:
    """Deliver ``claims`` events one at a time; CPU seconds: this process's in claim_due and
    next_due_at, this process's over the whole cycles (the durable marks included), the
    database server's over the whole cycles (None: no server)."""
    room = {busy: 0} if busy else {}
    skip = [busy] if busy else []
    query_cpu = 0.0
    server = store.server_cpu()
    start = time.process_time()
    for _ in range(claims):
        now = time.time()
        before = time.process_time()
        items = await outbox.claim_due(
            now=now, limit=1, lease=60.0, room=room, default_room=PER_DESTINATION
        )
        query_cpu += time.process_time() - before
        if len(items) != 1 or (busy and items[0].destination == busy):
            raise SystemExit(f"claimed {items!r}: expected one event of the free receiver")
        await outbox.mark_delivered(items[0].id, items[0].claim, now=time.time(), status=200)
        before = time.process_time()
        await outbox.next_due_at(skip=skip)
        query_cpu += time.process_time() - before
    cycles = time.process_time() - start
    after = store.server_cpu()
    return query_cpu, cycles, None if server is None or after is None else after - server


@asynccontextmanager
async def fresh_outbox(store: Store, label: str):
    async with store.fresh(label) as (data_dir, database_url):
        outbox = await open_outbox(data_dir, database_url)
        try:
            yield outbox
        finally:
            await outbox.close()


async def row(store: Store, size: int, claims: int, scenario: str):
    label = f"{size}_{'busy' if scenario != 'one receiver' else 'one'}"
    async with fresh_outbox(store, label) as outbox:
        now = time.time() - 3600  # the outage: everything fell due an hour ago
        await fill(outbox, size, BUSY_URL, 0, now)
        if scenario == "one receiver":
            return await drain(outbox, store, claims, None)
        await fill(outbox, claims, OTHER_URL, size, now + 1)  # due after the whole backlog
        return await drain(outbox, store, claims, destination_of(BUSY_URL))


async def run(args: argparse.Namespace, base: Path, database_url: str | None) -> None:
    stores: list[Store] = [SQLite(base)]
    described = ""
    if database_url is not None:
        postgres = Postgres(database_url, base / "unused")
        described = "; " + await postgres.describe()
        stores.append(postgres)
    print(
        f"# {platform.node()}, Python {platform.python_version()}, SQLite "
        f"{sqlite3.sqlite_version}{described}; {args.claims} claims per row; CPU ms per "
        "claimed event"
    )
    header = (
        "store",
        "scenario",
        "queued",
        "claim + next due (ms)",
        "whole cycle, durable mark included: this process / database (ms)",
        f"ratio to {args.sizes[0]} queued",
    )
    print("| " + " | ".join(header) + " |")
    print("| --- " * 3 + "| ---: " * 3 + "|")
    for store in stores:
        for scenario in ("one receiver", "busy receiver at its limit"):
            reference = None
            for size in args.sizes:
                query, cycle, server = await row(store, size, args.claims, scenario)
                total = cycle + (server or 0.0)
                reference = reference or total
                per = [x if x is None else x / args.claims * 1000 for x in (query, cycle, server)]
                queued = f"{size}" if scenario == "one receiver" else f"{size} + {args.claims}"
                cells = (
                    store.name,
                    scenario,
                    queued,
                    f"{per[0]:.3f}",
                    f"{per[1]:.3f} / " + ("-" if per[2] is None else f"{per[2]:.3f}"),
                    f"{total / reference:.2f}×",
                )
                print("| " + " | ".join(cells) + " |", flush=True)
    if database_url is not None:
        print(
            "\nPostgreSQL: claim + next due is this process's CPU only (asyncpg); the server's "
            "is in the next column, over whole cycles."
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="500,4000,20000", help="backlogs, comma-separated")
    parser.add_argument("--claims", type=int, default=500, help="events claimed per row")
    parser.add_argument("--data-dir", help="where the SQLite files go (default: the temp dir)")
    parser.add_argument(
        "--postgres", action="store_true", help="PostgreSQL rows too, on a throwaway cluster"
    )
    parser.add_argument("--database-url", help="PostgreSQL rows too, in this database")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if min(args.sizes) < args.claims:
        sys.exit("every size must be at least --claims")
    with tempfile.TemporaryDirectory(dir=args.data_dir, prefix="outbox-backlog-") as base:
        if args.database_url or not args.postgres:
            asyncio.run(run(args, Path(base), args.database_url))
            return
        from phoneagent.testing.postgres_cluster import PostgresUnavailable, postgres_cluster

        try:
            with postgres_cluster(durable=True) as url:
                asyncio.run(run(args, Path(base), url))
        except PostgresUnavailable as exc:
            sys.exit(f"no PostgreSQL for --postgres ({exc}); use --database-url")


if __name__ == "__main__":
    main()
