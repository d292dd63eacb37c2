"""``phoneagent events …``: look into the webhook outbox, and queue events again; and
``python -m phoneagent.delivery.worker``, which delivers the outbox without the server.

The ``events`` commands open the outbox the server uses: the PostgreSQL database of
``PHONEAGENT_DATABASE_URL`` when it is set, else the file of ``PHONEAGENT_DATA_DIR`` (``--data-dir``
picks a file). They work while the server runs (PostgreSQL: row locks only; SQLite WAL: readers
never block it, a redeliver waits a moment for its lock at most); the running servers' workers
notice a redelivered event within their poll interval (1 s).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from phoneagent.delivery.outbox import (
    DEFAULT_BUSY_TIMEOUT,
    OUTBOX_FILENAME,
    OutboxError,
    OutboxItem,
    SQLiteOutbox,
    display_url,
)
from phoneagent.delivery.policy import RetryPolicy
from phoneagent.delivery.status import DeliveryStatus
from phoneagent.delivery.stores import open_outbox
from phoneagent.delivery.worker import (
    DEFAULT_CONCURRENCY,
    DEFAULT_PER_DESTINATION,
    DEFAULT_TIMEOUT,
    DeliveryWorker,
)
from phoneagent.logs import get_logger

__all__ = ["add_events_commands", "cmd_events_list", "cmd_events_redeliver", "run_worker"]

log = get_logger("phoneagent.delivery.worker")  # the worker's own log, as when it runs in serve

EXIT_OK, EXIT_NOT_FOUND, EXIT_CONFIG = 0, 1, 2
ERROR_WIDTH = 60
#: How long a command waits for a lock the server holds (its writes take milliseconds).
BUSY_TIMEOUT = DEFAULT_BUSY_TIMEOUT


def add_events_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``events list`` and ``events redeliver`` to the ``phoneagent`` command's
    subparsers; returns the ``events`` parser."""
    events = subparsers.add_parser("events", help="webhook events: list, redeliver")
    commands = events.add_subparsers(title="event commands", required=True)

    listing = commands.add_parser("list", help="list webhook events, newest first")
    listing.add_argument("--status", choices=list(DeliveryStatus), help="only events in this state")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    _data_dir_option(listing)
    listing.set_defaults(handler=cmd_events_list)

    redeliver = commands.add_parser(
        "redeliver", help="queue events again (dead letters, or delivered ones) for delivery now"
    )
    redeliver.add_argument("ids", nargs="*", metavar="ID", help="event id (evt_…)")
    redeliver.add_argument(
        "--all-failed", action="store_true", help="every dead letter (after a long outage)"
    )
    _data_dir_option(redeliver)
    redeliver.set_defaults(handler=cmd_events_redeliver)
    return events


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, help="data directory (default: $PHONEAGENT_DATA_DIR, else ./data)"
    )


def cmd_events_list(args: argparse.Namespace) -> int:
    path = _outbox_path(args)
    if path is None:
        return EXIT_CONFIG
    if isinstance(path, Path) and not path.exists():
        print(f"no events yet: {path} does not exist")
        return EXIT_OK
    try:
        items, counts = asyncio.run(_list(path, args.status, args.limit))
    except OutboxError as exc:
        print(f"phoneagent: outbox error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    rows = [("ID", "TYPE", "STATUS", "TRIES", "CREATED (UTC)", "NEXT / DONE (UTC)", "URL", "LAST")]
    rows += [_row(item) for item in items]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())
    total = sum(counts.values())
    summary = ", ".join(f"{counts[s]} {s}" for s in DeliveryStatus)
    matching = counts[args.status] if args.status else total
    shown = f"; showing the newest {len(items)} (--limit)" if len(items) < matching else ""
    print(f"{total} events: {summary}{shown}")
    return EXIT_OK


def cmd_events_redeliver(args: argparse.Namespace) -> int:
    if not args.ids and not args.all_failed:
        print("phoneagent: give an event ID, or --all-failed", file=sys.stderr)
        return EXIT_CONFIG
    path = _outbox_path(args)
    if path is None:
        return EXIT_CONFIG
    if isinstance(path, Path) and not path.exists():
        print(f"phoneagent: no outbox at {path}", file=sys.stderr)
        return EXIT_NOT_FOUND
    try:
        queued, missing = asyncio.run(_redeliver(path, list(args.ids), args.all_failed))
    except OutboxError as exc:
        print(f"phoneagent: outbox error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for item in queued:
        print(f"queued {item.id} ({item.type}) for {display_url(item.url)}")
    for item_id in missing:
        print(f"phoneagent: no event {item_id} in {_shown(path)}", file=sys.stderr)
    if queued:
        print(
            f"{len(queued)} event(s) queued: the running server (or "
            "`python -m phoneagent.delivery.worker`) sends them within a second"
        )
    elif args.all_failed and not missing:
        print("no failed events")
    return EXIT_NOT_FOUND if missing else EXIT_OK


def _outbox_path(args: argparse.Namespace) -> Path | str | None:
    """The outbox file, or the database URL (a str) when ``PHONEAGENT_DATABASE_URL`` is set and
    no ``--data-dir`` was given; None after printing a configuration error."""
    data_dir = getattr(args, "data_dir", None)
    if data_dir is None:
        from phoneagent.config import ConfigError, load_settings

        try:
            settings = load_settings(require_credentials=False)
        except ConfigError as exc:
            for problem in exc.problems:
                print(f"phoneagent: configuration error: {problem}", file=sys.stderr)
            return None
        if settings.database_url:
            return settings.database_url
        data_dir = settings.data_dir
    return Path(data_dir) / OUTBOX_FILENAME


def _shown(where: Path | str) -> str:
    from phoneagent.config import redact_database_url

    return str(where) if isinstance(where, Path) else redact_database_url(where)


async def _open(where: Path | str) -> Any:
    if isinstance(where, Path):
        return await SQLiteOutbox.open(where, busy_timeout=BUSY_TIMEOUT)
    return await open_outbox(Path(), where)


async def _list(
    path: Path | str, status: str | None, limit: int
) -> tuple[list[OutboxItem], dict[str, int]]:
    outbox = await _open(path)
    try:
        return await outbox.list(status=status, limit=limit), await outbox.counts()
    finally:
        await outbox.close()


async def _redeliver(
    path: Path | str, ids: list[str], all_failed: bool
) -> tuple[list[OutboxItem], list[str]]:
    outbox = await _open(path)
    try:
        if all_failed:
            counts = await outbox.counts()
            failed = await outbox.list(
                status=DeliveryStatus.FAILED, limit=max(counts[DeliveryStatus.FAILED], 1)
            )
            ids += [item.id for item in failed if item.id not in ids]
        queued, missing = [], []
        for item_id in ids:
            item = await outbox.redeliver(item_id, now=time.time())
            if item is None:
                missing.append(item_id)
            else:
                queued.append(item)
        return queued, missing
    finally:
        await outbox.close()


def _row(item: OutboxItem) -> tuple[str, ...]:
    if item.status is DeliveryStatus.PENDING:
        when = "in flight" if item.claim else _time(item.next_attempt_at)
    elif item.status is DeliveryStatus.FAILED:
        when = "gave up " + _time(item.last_attempt_at)
    else:
        when = _time(item.delivered_at)
    last = item.last_error or (f"HTTP {item.last_status}" if item.last_status else "")
    if len(last) > ERROR_WIDTH:
        last = last[: ERROR_WIDTH - 1] + "…"
    return (
        item.id,
        item.type,
        item.status,
        str(item.attempts),
        _time(item.created_at),
        when,
        display_url(item.url),
        last,
    )


def _time(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")


# --- `python -m phoneagent.delivery.worker`: the worker on its own ----------------------------


def run_worker(argv: list[str] | None = None) -> int:
    """Deliver a data directory's outbox without the server: after an outage, from a cron job
    (``--drain``), or as a separate process next to ``phoneagent serve``."""
    parser = argparse.ArgumentParser(
        prog="python -m phoneagent.delivery.worker",
        description="Deliver the webhook events waiting in the outbox.",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="default: $PHONEAGENT_DATABASE_URL if set, else $PHONEAGENT_DATA_DIR, else ./data",
    )
    parser.add_argument("--drain", action="store_true", help="exit once nothing is due")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--per-destination", type=int, default=DEFAULT_PER_DESTINATION)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds")
    parser.add_argument("--lease", type=float, help="seconds a claim lasts (default timeout+30)")
    parser.add_argument(
        "--schedule",
        help="comma-separated retry delays in seconds (default: the spec's 5 s … 24 h)",
    )
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds")
    args = parser.parse_args(argv)

    from phoneagent.config import ConfigError, load_settings
    from phoneagent.logs import configure_logging

    try:
        settings = load_settings(require_credentials=False)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"phoneagent: configuration error: {problem}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    policy = RetryPolicy()
    if args.schedule:
        try:
            policy = RetryPolicy(delays=tuple(float(s) for s in args.schedule.split(",")))
        except ValueError as exc:
            parser.error(f"--schedule: {exc}")
    try:
        database_url = "" if args.data_dir else settings.database_url
        data_dir = args.data_dir or settings.data_dir
        return asyncio.run(_serve_worker(args, data_dir, database_url, policy))
    except OutboxError as exc:
        print(f"phoneagent: outbox error: {exc}", file=sys.stderr)
        return 2


async def _serve_worker(
    args: argparse.Namespace, data_dir: Path, database_url: str, policy: RetryPolicy
) -> int:
    outbox = await open_outbox(data_dir, database_url)
    worker = DeliveryWorker(
        outbox,
        policy=policy,
        timeout=args.timeout,
        concurrency=args.concurrency,
        per_destination=args.per_destination,
        lease=args.lease,
        poll_interval=args.poll_interval,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(worker.run())
    try:
        if args.drain:
            flushed = asyncio.create_task(worker.flush(float("inf")))
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({flushed, stopped}, return_when=asyncio.FIRST_COMPLETED)
            flushed.cancel()
            stopped.cancel()
        else:
            await stop.wait()
    finally:
        await worker.stop()
        await runner
        counts = await outbox.counts()
        await outbox.close()
    log.info("outbox_counts", **counts)
    return 0
