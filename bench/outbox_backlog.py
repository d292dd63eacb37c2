"""CPU per claimed event of the SQLite outbox as its backlog grows: does a claim cost the same
with 500 events queued as with 20,000 (a receiver back from a long outage)?

    python bench/outbox_backlog.py [--sizes 500,4000,20000] [--claims 500] [--data-dir DIR]

For each size, a fresh outbox (``SQLiteOutbox``, WAL, ``synchronous=FULL``) in a temporary
data directory is filled through ``enqueue`` with that many realistic ``call.ended`` events
(bench/outbox.py's, about 6.7 KB) for one receiver, then ``--claims`` of them are delivered as
the worker does at concurrency 1: ``claim_due`` (with the worker's room arguments),
``mark_delivered``, ``next_due_at``. Nothing is sent: this is the store's share of a delivery.

A second scenario queues the same backlog for a receiver that is at its limit (its deliveries
all in flight, so ``room`` gives it none and ``next_due_at`` skips it) and ``--claims`` events
for another receiver, due after the whole backlog: the busy receiver's backlog must not make
the other's claims dearer.

CPU is this process's (user + system, every thread, so the outbox's SQLite thread included),
per claimed event; the ratio compares each size with the smallest in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from outbox import event

from phoneagent.delivery.outbox import SQLiteOutbox, destination_of

BUSY_URL = "https://busy.example.com/hooks/calls"
OTHER_URL = "https://other.example.com/hooks/calls"
PER_DESTINATION = 8  # the worker's default per-receiver limit


async def fill(outbox: SQLiteOutbox, count: int, url: str, first: int, now: float) -> None:
    for n in range(first, first + count):
        await outbox.enqueue(event(n), url=url, secret_env="BENCH_SECRET", now=now)


async def drain(outbox: SQLiteOutbox, claims: int, busy: str | None) -> tuple[float, float]:
    """Deliver ``claims`` events one at a time; (CPU seconds in claim_due + next_due_at, CPU
    seconds of the whole cycle including the durable mark)."""
    room = {busy: 0} if busy else {}
    skip = [busy] if busy else []
    query_cpu = 0.0
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
    return query_cpu, time.process_time() - start


async def row(base: Path, size: int, claims: int, scenario: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(dir=base, prefix="outbox-backlog-") as scratch:
        outbox = await SQLiteOutbox.in_data_dir(scratch)
        try:
            now = time.time() - 3600  # the outage: everything fell due an hour ago
            if scenario == "one receiver":
                await fill(outbox, size, BUSY_URL, 0, now)
                return await drain(outbox, claims, None)
            await fill(outbox, size, BUSY_URL, 0, now)
            await fill(outbox, claims, OTHER_URL, size, now + 1)  # due after the whole backlog
            return await drain(outbox, claims, destination_of(BUSY_URL))
        finally:
            await outbox.close()


async def run(args: argparse.Namespace) -> None:
    base = Path(args.data_dir or tempfile.gettempdir())
    print(
        f"# {platform.node()}, Python {platform.python_version()}, SQLite "
        f"{sqlite3.sqlite_version}; {args.claims} claims per row; CPU ms per claimed event"
    )
    header = (
        "scenario",
        "queued",
        "claim + next due (ms)",
        "whole cycle, durable mark included (ms)",
        f"ratio to {args.sizes[0]} queued",
    )
    print("| " + " | ".join(header) + " |")
    print("| --- " * 2 + "| ---: " * 3 + "|")
    for scenario in ("one receiver", "busy receiver at its limit"):
        reference = None
        for size in args.sizes:
            query, cycle = await row(base, size, args.claims, scenario)
            query, cycle = query / args.claims * 1000, cycle / args.claims * 1000
            reference = reference or cycle
            queued = f"{size}" if scenario == "one receiver" else f"{size} + {args.claims}"
            cells = (scenario, queued, f"{query:.3f}", f"{cycle:.3f}", f"{cycle / reference:.2f}×")
            print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="500,4000,20000", help="backlogs, comma-separated")
    parser.add_argument("--claims", type=int, default=500, help="events claimed per row")
    parser.add_argument("--data-dir", help="where the outbox files go (default: the temp dir)")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if min(args.sizes) < args.claims:
        sys.exit("every size must be at least --claims")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
