"""Events per second through the webhook outbox and worker to a local receiver, as one table.

    python bench/outbox.py [--events 2000] [--data-dir DIR]

The receiver is the test kit's webhook sink (``phoneagent.testing.webhook_sink``), run in its
own process so it does not share the sender's core. Events are realistic ``call.ended``
payloads (a 40-turn transcript, about 5 KB), signed per attempt, committed durably (SQLite WAL,
``synchronous=FULL``: an fsync per commit) in a data directory on the disk the bench runs on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from phoneagent.delivery.events import call_ended_event
from phoneagent.delivery.outbox import SQLiteOutbox
from phoneagent.delivery.worker import DeliveryWorker
from phoneagent.logs import configure_logging

SECRET_ENV = "BENCH_WEBHOOK_SECRET"
ENV = {SECRET_ENV: "whsec_" + "QmVuY2htYXJrIHNlY3JldCBvZiAzMiBieXRlcyEhIQ=="}

SINK = """
import asyncio, sys
from phoneagent.testing.webhook_sink import WebhookSink

async def main():
    async with WebhookSink([200]) as sink:
        print(sink.port, flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes stdin

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


async def enqueue_only(data_dir: Path, count: int) -> dict:
    outbox = await SQLiteOutbox.in_data_dir(data_dir)
    events = [event(i) for i in range(count)]
    start = time.perf_counter()
    for e in events:
        await outbox.enqueue(e, url="http://127.0.0.1:9/", secret_env=SECRET_ENV, now=time.time())
    seconds = time.perf_counter() - start
    await outbox.close()
    return {"seconds": seconds, "latency": None}


async def through(data_dir: Path, url: str, count: int, concurrency: int, *, backlog: bool) -> dict:
    """``backlog``: every event is queued before the worker starts (draining after an outage);
    otherwise events are submitted while it runs (steady state)."""
    outbox = await SQLiteOutbox.in_data_dir(data_dir)
    worker = DeliveryWorker(
        outbox, concurrency=concurrency, per_destination=concurrency, environ=ENV, retention=None
    )
    events = [event(i) for i in range(count)]
    start = time.perf_counter()
    if backlog:
        for e in events:
            await outbox.enqueue(e, url=url, secret_env=SECRET_ENV, now=time.time())
        start = time.perf_counter()
        runner = asyncio.create_task(worker.run())
    else:
        runner = asyncio.create_task(worker.run())
        for e in events:
            await worker.submit(e, url=url, secret_env=SECRET_ENV)
    flushed = await worker.flush(600)
    seconds = time.perf_counter() - start
    await worker.stop()
    await runner
    items = await outbox.list(limit=count)
    counts = await outbox.counts()
    await outbox.close()
    if not flushed or counts["delivered"] != count:
        raise SystemExit(f"not everything was delivered: {counts}")
    latency = sorted(i.delivered_at - i.created_at for i in items)
    return {"seconds": seconds, "latency": None if backlog else latency}


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--data-dir", type=Path, help="where the outbox files go (a temp dir)")
    args = parser.parse_args()
    count = args.events
    # One info line per delivery is production's choice; here it would time the log pipe.
    configure_logging("json", "warning")

    sink = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SINK, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    port = int((await sink.stdout.readline()).decode())
    url = f"http://127.0.0.1:{port}/hooks/calls"
    base = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-outbox-"))
    size = len(event(0).body())
    print(
        f"phoneagent outbox bench: {count} events of {size} bytes, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, data dir {base}\n"
    )

    rows = [("enqueue only (durable commit)", "-", await enqueue_only(base / "enqueue", count))]
    for concurrency in (1, 8, 32):
        result = await through(
            base / f"backlog{concurrency}", url, count, concurrency, backlog=True
        )
        rows.append(("drain a backlog", str(concurrency), result))
    for concurrency in (8, 32):
        result = await through(
            base / f"steady{concurrency}", url, count, concurrency, backlog=False
        )
        rows.append(("submit while delivering", str(concurrency), result))

    sink.stdin.close()
    await sink.wait()

    header = ("scenario", "concurrency", "events/s", "enqueue → 2xx p50 (ms)", "p99 (ms)")
    table = []
    for name, concurrency, result in rows:
        latency = result["latency"]
        table.append(
            (
                name,
                concurrency,
                f"{count / result['seconds']:.0f}",
                f"{percentile(latency, 0.5) * 1000:.1f}" if latency else "-",
                f"{percentile(latency, 0.99) * 1000:.1f}" if latency else "-",
            )
        )
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    asyncio.run(main())
