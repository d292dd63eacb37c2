"""Events per second through the webhook outbox and worker to a local receiver, SQLite and
PostgreSQL (one and two instances) in one table.

    python bench/outbox.py [--events 2000] [--database-url URL] [--data-dir DIR]

The receiver is the test kit's webhook sink (``phoneagent.testing.webhook_sink``) in its own
process. Each instance (an outbox and its ``DeliveryWorker``, as one phoneagent process runs
them) is its own process too: two instances are two processes sharing one database, as two
deployed instances are, each with its own event loop, connection pool and share of the CPUs; in
one process they would share one event loop and one core, and measure that loop rather than
the database's sharing. Events are realistic ``call.ended`` payloads (a 40-turn transcript,
about 6.7 KB), signed per attempt, committed durably: SQLite WAL with ``synchronous=FULL`` in a
temporary data directory, PostgreSQL with its defaults (``fsync``, ``synchronous_commit``),
each an fsync per commit. Without ``--database-url`` the bench starts a throwaway PostgreSQL
cluster (``phoneagent.testing.postgres_cluster``, durable) in the system temp dir and removes it
at the end; with it, each row gets a schema of its own in that database (dropped after the row).

Commit → 2xx is timed per event from two ``time.monotonic()`` readings (one clock for every
process on Linux): in the instance as the commit returns (see ``time_commits``), and in the sink
when it has read the request and answers 200 (the first 2xx for that event id).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AsyncExitStack, asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from _harness import cpu_busy_seconds, cpu_seconds, tree_cpu_seconds

from phoneagent.delivery.events import call_ended_event
from phoneagent.delivery.outbox import Outbox, SQLiteOutbox
from phoneagent.delivery.status import AttemptOutcome, DeliveryStatus
from phoneagent.delivery.stores import open_outbox
from phoneagent.delivery.worker import DeliveryWorker
from phoneagent.logs import configure_logging

SECRET_ENV = "BENCH_WEBHOOK_SECRET"
ENV = {SECRET_ENV: "whsec_" + "QmVuY2htYXJrIHNlY3JldCBvZiAzMiBieXRlcyEhIQ=="}
URL_ENV = "BENCH_OUTBOX_DATABASE_URL"  # to the instances: not on their command line (a password)
TIMEOUT = 300.0  # seconds a row may take before the bench gives up
LINE_LIMIT = 1 << 24  # bytes: the processes answer with one JSON line holding every event's time

SINK = """
import asyncio, json, sys
from phoneagent.testing.webhook_sink import WebhookSink

async def main():
    async with WebhookSink([200]) as sink:
        print(sink.port, flush=True)
        loop = asyncio.get_running_loop()
        timeout = float(sys.argv[1])
        # "wait N": until N distinct events had a 2xx; then when each first had it. EOF: exit.
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            count, first, seen = int(line.split()[1]), {}, 0
            while len(first) < count:
                await sink.wait_for(len(sink.received) + count - len(first), timeout=timeout)
                for request in sink.received[seen:]:
                    if 200 <= request.status < 300:
                        first.setdefault(request.json["id"], request.at)
                seen = len(sink.received)
            print(json.dumps({"first_2xx": first, "requests": seen}), flush=True)
            sink.received.clear()

asyncio.run(main())
"""


def event(n: int):
    turns = [
        {
            "role": "agent" if i % 2 == 0 else "caller",
            "text": "I can book you in for a cleaning on Tuesday at ten, does that work for you?",
            "start_ms": i * 4000,
            "end_ms": i * 4000 + 3500,
            "interrupted": False,
        }
        for i in range(40)
    ]
    now = time.time()
    return call_ended_event(
        call_sid=f"CA{n:032x}",
        persona_id="bright-smile-dental",
        persona_name="Bright Smile Dental front desk",
        from_number="+14155550123",
        to_number="+14155550100",
        started_at=now - 160,
        ended_at=now,
        end_reason="caller_hung_up",
        transcript=turns,
    )


# --- one instance: its own process ---------------------------------------------------------


async def instance(spec: dict) -> None:
    """One phoneagent instance's delivery: open the store, print ``ready``; at ``go`` start the
    worker and submit this instance's events (none when draining a backlog); at ``stop`` stop
    and print when each event was committed and how many this worker delivered."""
    configure_logging("json", "warning")  # an info line per delivery would time the log pipe
    loop = asyncio.get_running_loop()
    outbox = await open_outbox(spec["data_dir"], os.environ.get(URL_ENV, ""))
    delivered = 0

    def count(outcome: AttemptOutcome) -> None:
        nonlocal delivered
        if outcome is AttemptOutcome.DELIVERED:
            delivered += 1

    concurrency = spec["concurrency"]
    worker = DeliveryWorker(
        outbox,
        concurrency=concurrency,
        per_destination=concurrency,
        environ=ENV,
        retention=None,
        on_outcome=count,
    )
    events = [event(n) for n in range(spec["first"], spec["first"] + spec["submit"])]
    commit_time = time_commits(outbox)
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # go
    runner = asyncio.create_task(worker.run())
    committed = {}
    for e in events:
        await worker.submit(e, url=spec["url"], secret_env=SECRET_ENV)
        committed[e.id] = commit_time(e.id)
    await loop.run_in_executor(None, sys.stdin.readline)  # stop
    await worker.stop()
    await runner
    await outbox.close()
    print(json.dumps({"committed": committed, "delivered": delivered}), flush=True)


def time_commits(outbox: Outbox) -> Callable[[str], float]:
    """Have each enqueue note when its commit returned (``time.monotonic()``); read it back by
    event id once ``submit`` has returned. Timed where the commit ends, not when ``submit``
    returns: the task that submits resumes only when the event loop gets to it (after other
    deliveries' steps), and PostgreSQL's pool resets the connection (one more round trip) before
    the outbox hands it back. SQLite: on the outbox's thread, as its autocommit returns (fsync
    done). PostgreSQL: as asyncpg's transaction returns from COMMIT, in the submitting task.
    Both hooks are the bench's, in the instance process only."""
    if isinstance(outbox, SQLiteOutbox):
        times: dict[str, float] = {}
        enqueue = outbox._enqueue

        def timed(row: tuple, closes_call: str | None) -> bool:
            added = enqueue(row, closes_call)
            times[row[0]] = time.monotonic()  # row[0]: the event id
            return added

        outbox._enqueue = timed  # type: ignore[method-assign]
        return times.pop
    from asyncpg.transaction import Transaction

    committed: ContextVar[float] = ContextVar("committed")
    aexit = Transaction.__aexit__

    async def timed_aexit(self, extype, ex, tb) -> None:
        await aexit(self, extype, ex, tb)
        committed.set(time.monotonic())

    Transaction.__aexit__ = timed_aexit  # type: ignore[method-assign]
    return lambda _: committed.get()


# --- the stores ------------------------------------------------------------------------------


class Store:
    name: str

    def fresh(self, label: str):
        """An async context manager: (data dir, database URL) of an empty outbox for a row."""
        raise NotImplementedError

    def server_cpu(self) -> float | None:
        """CPU seconds the database server has used so far (None: no server, or not on this
        machine)."""
        return None


class SQLite(Store):
    name = "SQLite"

    def __init__(self, base: Path) -> None:
        self.base = base

    @asynccontextmanager
    async def fresh(self, label: str):
        yield self.base / label, ""


class Postgres(Store):
    """Each row in a schema of its own (``search_path`` in the URL), dropped after the row: a
    database given with ``--database-url`` keeps nothing of the bench."""

    name = "PostgreSQL"

    def __init__(self, url: str, scratch: Path) -> None:
        self.url = url
        self.scratch = scratch  # the data dir an outbox is opened with (unused by PostgreSQL)
        self.postmaster: int | None = None

    async def describe(self) -> str:
        """The server's version and durability settings; finds its postmaster process when it
        runs on this machine (its CPU time is then counted)."""
        import asyncpg

        from phoneagent.config import redact_database_url

        conn = await asyncpg.connect(self.url)
        try:
            version, fsync, synchronous_commit, backend = await conn.fetchrow(
                "SELECT current_setting('server_version'), current_setting('fsync'), "
                "current_setting('synchronous_commit'), pg_backend_pid()"
            )
            host = urlsplit(self.url).hostname or "localhost"
            if host in ("127.0.0.1", "::1", "localhost") or host.startswith("/"):
                self.postmaster = _parent_postgres(backend)  # while the backend is alive
        finally:
            await conn.close()
        return (
            f"PostgreSQL {version} at {redact_database_url(self.url)}, fsync={fsync}, "
            f"synchronous_commit={synchronous_commit}"
        )

    def server_cpu(self) -> float | None:
        return None if self.postmaster is None else tree_cpu_seconds(self.postmaster)

    async def admin(self, sql: str) -> list:
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetch(sql)
        finally:
            await conn.close()

    @asynccontextmanager
    async def fresh(self, label: str):
        schema = f"bench_outbox_{label}_{secrets.token_hex(4)}"
        await self.admin(f"CREATE SCHEMA {schema}")
        parts = urlsplit(self.url)
        query = urlencode([*parse_qsl(parts.query), ("search_path", schema)])
        try:
            yield self.scratch, urlunsplit(parts._replace(query=query))
        finally:
            await self.admin(f"DROP SCHEMA {schema} CASCADE")


def _parent_postgres(pid: int) -> int | None:
    """The parent of process ``pid`` (a backend: its postmaster) if it is a PostgreSQL
    process on this machine."""
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        if Path(f"/proc/{parent}/comm").read_text().startswith("postgres"):
            return parent
    except (OSError, ValueError, IndexError):
        pass
    return None


# --- one row ---------------------------------------------------------------------------------


@dataclass
class Cpu:
    """CPU seconds used during a row by the instances, the database server and the sink;
    ``busy``: the share of all the CPUs that was busy, ``others``: the part of it that none of
    the bench's processes used (other users of a shared machine, the kernel's own threads)."""

    instances: float
    database: float | None
    sink: float | None
    busy: float
    others: float


class CpuMeter:
    """Reads the CPU time of the row's processes at :meth:`start` and again at :meth:`stop`.
    ``instances``: their process ids, 0 for this process (it enqueues the backlog)."""

    def __init__(self, store: Store, instances: list[int], sink: int | None) -> None:
        self.store, self.instances, self.sink = store, instances, sink

    def _read(self) -> tuple:
        return (
            sum(cpu_seconds(pid) if pid else time.process_time() for pid in self.instances),
            self.store.server_cpu(),
            cpu_seconds(self.sink) if self.sink else None,
            time.process_time(),  # the bench itself (also in instances when it is one)
            sum(cpu_busy_seconds().values()),
            time.monotonic(),
        )

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> Cpu:
        after = self._read()
        instances, database, sink, bench, busy, wall = (
            None if b is None else a - b for a, b in zip(after, self._before, strict=True)
        )
        ours = instances + (database or 0) + (sink or 0) + (0 if 0 in self.instances else bench)
        capacity = wall * (os.cpu_count() or 1)
        return Cpu(instances, database, sink, busy / capacity, max(0.0, busy - ours) / capacity)


@dataclass
class Row:
    store: str
    instances: int
    scenario: str
    concurrency: int | None
    seconds: float
    cpu: Cpu
    latency: list[float] | None = None  # commit → 2xx of each event, sorted
    delivered_by: list[int] | None = None
    duplicates: int = 0


class Sink:
    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}/hooks/calls"

    async def first_2xx(self, count: int) -> tuple[dict[str, float], int]:
        """Once ``count`` distinct events had a 2xx: when each had its first, and how many
        requests came (more than ``count``: some event was delivered twice)."""
        self.process.stdin.write(f"wait {count}\n".encode())
        line = await self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the sink did not see {count} deliveries within {TIMEOUT:.0f} s")
        answer = json.loads(line)
        return answer["first_2xx"], answer["requests"]


async def enqueue(store: Store, data_dir: Path, database_url: str, url: str, count: int) -> Row:
    """Commit ``count`` events from this process, nothing delivering them."""
    outbox = await open_outbox(data_dir, database_url)
    events = [event(n) for n in range(count)]
    meter = CpuMeter(store, [0], None)  # 0: this process (and the SQLite thread)
    meter.start()
    start = time.perf_counter()
    for e in events:
        await outbox.enqueue(e, url=url, secret_env=SECRET_ENV, now=time.time())
    seconds = time.perf_counter() - start
    cpu = meter.stop()
    await outbox.close()
    return Row(store.name, 1, "enqueue only (durable commit)", None, seconds, cpu)


async def deliver(
    store: Store,
    sink: Sink,
    count: int,
    concurrency: int,
    instances: int,
    *,
    backlog: bool,
    rows: list[Row],
) -> None:
    """``backlog``: every event is queued before the workers start (draining after an outage;
    the first backlog of a store also gives its "enqueue only" row); otherwise the instances
    submit their share of the events back to back while their workers run."""
    label = f"{'backlog' if backlog else 'steady'}{concurrency}x{instances}"
    async with store.fresh(label) as (data_dir, database_url):
        if backlog:
            row = await enqueue(store, data_dir, database_url, sink.url, count)
            if not any(r.store == store.name and r.scenario == row.scenario for r in rows):
                rows.append(row)
        shares = [0] * instances if backlog else [count // instances] * instances
        shares[0] += 0 if backlog else count - sum(shares)
        children = []
        async with AsyncExitStack() as stack:
            first = 0
            for share in shares:
                spec = {
                    "data_dir": str(data_dir),
                    "url": sink.url,
                    "concurrency": concurrency,
                    "first": first,
                    "submit": share,
                }
                first += share
                child = await asyncio.create_subprocess_exec(
                    sys.executable,
                    __file__,
                    "--instance",
                    json.dumps(spec),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    env={**os.environ, URL_ENV: database_url},
                    limit=LINE_LIMIT,
                )
                stack.push_async_callback(reap, child)
                children.append(child)
            for child in children:
                if await child.stdout.readline() != b"ready\n":
                    raise SystemExit("an instance did not start (its error is above)")
            meter = CpuMeter(store, [c.pid for c in children], sink.process.pid)
            meter.start()
            start = time.monotonic()
            for child in children:
                child.stdin.write(b"go\n")
            first_2xx, requests = await sink.first_2xx(count)
            cpu = meter.stop()
            committed: dict[str, float] = {}
            delivered_by = []
            for child in children:
                child.stdin.write(b"stop\n")
                line = await child.stdout.readline()
                if not line:
                    raise SystemExit("an instance failed (its error is above)")
                report = json.loads(line)
                committed.update(report["committed"])
                delivered_by.append(report["delivered"])
        outbox = await open_outbox(data_dir, database_url)
        counts = await outbox.counts()
        await outbox.close()
    if counts[DeliveryStatus.DELIVERED] != count:
        raise SystemExit(f"not everything was recorded delivered: {counts}")
    rows.append(
        Row(
            store.name,
            instances,
            "drain a backlog" if backlog else "submit while delivering",
            concurrency,
            max(first_2xx.values()) - start,
            cpu,
            None if backlog else sorted(first_2xx[i] - t for i, t in committed.items()),
            delivered_by,
            requests - count,
        )
    )


async def reap(process: asyncio.subprocess.Process) -> None:
    if process.stdin is not None and not process.stdin.is_closing():
        process.stdin.close()
    try:
        async with asyncio.timeout(30):
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()


# --- the run ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def table(rows: list[Row], count: int) -> list[str]:
    """The markdown table; each PostgreSQL figure followed by its ratio to SQLite's row of the
    same scenario and concurrency (per instance)."""

    def figures(row: Row) -> list[float | None]:
        rate = count / row.seconds
        if row.latency is None:
            return [rate, None, None]
        return [rate, percentile(row.latency, 0.5) * 1000, percentile(row.latency, 0.99) * 1000]

    def key(row: Row) -> tuple:
        return row.scenario, row.concurrency

    def per_event(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds / count * 1000:.2f}"

    sqlite = {key(r): figures(r) for r in rows if r.store == SQLite.name}
    header = (
        "store",
        "instances",
        "scenario",
        "concurrency",
        "events/s",
        "commit → 2xx p50 (ms)",
        "p99 (ms)",
        "CPU ms per event: instances / database / sink",
        "CPU busy (others)",
    )
    lines = ["| " + " | ".join(header) + " |", "| --- " * 4 + "| ---: " * 5 + "|"]
    for row in rows:
        cells = [
            row.store,
            str(row.instances),
            row.scenario,
            "-" if row.concurrency is None else str(row.concurrency),
        ]
        reference = sqlite.get(key(row)) if row.store != SQLite.name else None
        for i, value in enumerate(figures(row)):
            if value is None:
                cells.append("-")
                continue
            text = f"{value:.0f}" if i == 0 else f"{value:.1f}"
            if reference is not None and reference[i]:
                text += f" ({value / reference[i]:.2f}×)"
            cells.append(text)
        cpu = row.cpu
        cells.append(" / ".join(per_event(s) for s in (cpu.instances, cpu.database, cpu.sink)))
        cells.append(f"{cpu.busy:.0%} ({cpu.others:.0%})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


async def run(args: argparse.Namespace, base: Path, database_url: str | None) -> None:
    count = args.events
    configure_logging("json", "warning")
    sink_process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SINK,
        str(TIMEOUT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=LINE_LIMIT,
    )
    try:
        sink = Sink(sink_process, int((await sink_process.stdout.readline()).decode()))
        stores: list[Store] = [SQLite(base / "sqlite")]
        described = ""
        if database_url is not None:
            postgres = Postgres(database_url, base / "unused")
            described = "\n" + await postgres.describe()
            stores.append(postgres)
        print(
            f"phoneagent outbox bench: {count} events of {len(event(0).body())} bytes per row, "
            f"Python {platform.python_version()}, {os.cpu_count()} CPUs ({cpu_model()}), "
            f"SQLite data dir {base}{described}\n",
            flush=True,
        )
        rows: list[Row] = []
        for store in stores:
            for concurrency in args.backlog_concurrency:
                await deliver(store, sink, count, concurrency, 1, backlog=True, rows=rows)
            for concurrency in args.concurrency:
                await deliver(store, sink, count, concurrency, 1, backlog=False, rows=rows)
            if isinstance(store, Postgres):
                for concurrency in args.concurrency:
                    await deliver(store, sink, count, concurrency, 2, backlog=True, rows=rows)
                    await deliver(store, sink, count, concurrency, 2, backlog=False, rows=rows)
    finally:
        sink_process.stdin.close()
        await sink_process.wait()

    print("\n".join(table(rows, count)))
    print(
        "\nConcurrency is per instance. A PostgreSQL figure is followed by its ratio to SQLite's "
        "row of the same scenario and concurrency. CPU per event: the instance processes (with "
        "SQLite's thread; the bench itself for enqueue only), the PostgreSQL server (all its "
        "processes), the sink. CPU busy: all CPUs, whatever ran; in brackets the share none of "
        "the bench's processes used (others on a shared machine)."
    )
    for row in rows:
        where = f"{row.store}, {row.instances} instance(s), {row.scenario}"
        if row.instances > 1 and row.delivered_by:
            print(f"{where}: each instance delivered {' + '.join(map(str, row.delivered_by))}")
        if row.latency and row.latency[0] < 0:
            early = sum(t < 0 for t in row.latency)
            print(
                f"{where}: {early} events answered 2xx up to {-row.latency[0] * 1000:.1f} ms "
                "before their commit was timed (the committing instance's event loop read "
                "COMMIT's answer that late)"
            )
        if row.duplicates:
            print(f"{where}: {row.duplicates} events delivered twice")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    if sys.argv[1:2] == ["--instance"]:
        asyncio.run(instance(json.loads(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--events", type=int, default=2000, help="events per row (2000)")
    parser.add_argument(
        "--database-url",
        help="a PostgreSQL database to use (each row in a schema of its own, dropped after it); "
        "default: a throwaway cluster the bench starts and removes",
    )
    parser.add_argument(
        "--sqlite-only", action="store_true", help="no PostgreSQL rows (none installed)"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="where the SQLite outbox files go (default: a temp dir)"
    )
    parser.add_argument(
        "--backlog-concurrency",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[1, 32],
        help="worker concurrencies of the backlog rows (1,32)",
    )
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(n) for n in s.split(",")],
        default=[32],
        help="worker concurrencies of the submit-while-delivering and two-instance rows (32)",
    )
    args = parser.parse_args()
    base = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-outbox-"))
    try:
        if args.sqlite_only:
            asyncio.run(run(args, base, None))
        elif args.database_url:
            asyncio.run(run(args, base, args.database_url))
        else:
            from phoneagent.testing.postgres_cluster import PostgresUnavailable, postgres_cluster

            try:
                cluster = postgres_cluster(durable=True)
                url = cluster.__enter__()
            except PostgresUnavailable as exc:
                raise SystemExit(
                    f"PostgreSQL unavailable: {exc}\n(--database-url to use a server, or "
                    "--sqlite-only)"
                ) from None
            try:
                asyncio.run(run(args, base, url))
            finally:
                cluster.__exit__(None, None, None)
    finally:
        if args.data_dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
