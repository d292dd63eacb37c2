"""The delivery worker: takes due events from the outbox and POSTs them, signed, to their webhook.

Rules (what a receiver can count on):

- 2xx: delivered. 408, 429, 5xx, a network error or no answer within ``timeout``: tried again
  after the next delay of the :class:`RetryPolicy` (default: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h,
  14 h, 20 h, 24 h, each ±20 % jitter; ten attempts over about three days), or later if the
  answer carried ``Retry-After`` (seconds or an HTTP date; at most 24 h).
- 410 Gone, any other 4xx, or a 3xx (redirects are not followed: fix the URL instead): given up
  at once, the event becomes a dead letter (``failed``). So does an event whose schedule ran out.
  ``phoneagent events redeliver ID`` queues a dead letter again.
- Every attempt is signed afresh (new ``webhook-timestamp``), with the same ``webhook-id``.
- Deliveries run concurrently (``concurrency``), at most ``per_destination`` to one receiver
  (scheme, host and port), so a slow or hanging receiver holds a few slots, never all of them.

Time is injected (``clock``: Unix seconds, ``sleep``, ``rng``), so backoff and ``Retry-After``
are tested without waiting. ``next_attempt_at`` is stored as wall-clock time because it must
mean the same thing after a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

import aiohttp

from phoneagent import __version__
from phoneagent.delivery.events import Event
from phoneagent.delivery.outbox import Outbox, OutboxError, OutboxItem, SQLiteOutbox
from phoneagent.delivery.signing import SigningError, signature_headers
from phoneagent.logs import get_logger

__all__ = [
    "DEFAULT_DELAYS",
    "Decision",
    "DeliveryWorker",
    "RetryPolicy",
    "decide",
    "parse_retry_after",
]

log = get_logger("phoneagent.delivery.worker")  # not "__main__" under `python -m`

MINUTE, HOUR = 60.0, 3600.0
#: The Standard Webhooks spec's example schedule: the delay before attempts 2 to 10.
DEFAULT_DELAYS = (5.0, 5 * MINUTE, 30 * MINUTE, 2 * HOUR, 5 * HOUR, 10 * HOUR, 14 * HOUR,
                  20 * HOUR, 24 * HOUR)  # fmt: skip
#: 15–30 s is what the spec recommends a receiver be given to answer.
DEFAULT_TIMEOUT = 15.0
DEFAULT_CONCURRENCY = 32
DEFAULT_PER_DESTINATION = 4
#: Statuses worth another try besides 5xx: the receiver is busy, not refusing.
RETRY_STATUSES = frozenset({408, 429})
ERROR_SNIPPET = 200  # characters of a failed answer's body kept for `events list`

_Answer = tuple[int | None, str | None, str | None]  # status (None: no answer), error, Retry-After


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again. ``delays[i]`` is the pause after failed attempt ``i + 1``; after
    ``len(delays) + 1`` failed attempts the event is a dead letter. Each pause is scaled by a
    random factor in ``[1 - jitter, 1 + jitter]`` so a receiver coming back from an outage is
    not hit by every event at the same instant."""

    delays: Sequence[float] = DEFAULT_DELAYS
    jitter: float = 0.2
    #: A ``Retry-After`` longer than this is cut to it: a receiver cannot park events forever.
    max_retry_after: float = 24 * HOUR

    def __post_init__(self) -> None:
        if not self.delays or any(d < 0 for d in self.delays):
            raise ValueError("delays must be a non-empty list of seconds ≥ 0")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    @property
    def max_attempts(self) -> int:
        return len(self.delays) + 1

    def delay_after(self, attempts: int, rng: random.Random) -> float | None:
        """The pause after ``attempts`` failed attempts, or None: give up."""
        if attempts >= self.max_attempts:
            return None
        base = self.delays[attempts - 1]
        return base * rng.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass(frozen=True)
class Decision:
    """What to do with an event after an attempt."""

    action: str  # "delivered" | "retry" | "dead"
    reason: str
    at: float | None = None  # when to try again, for "retry"


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT by definition
        return None
    return max(0.0, when.timestamp() - now)


def decide(
    attempts: int,
    *,
    status: int | None,
    error: str | None = None,
    retry_after: str | None = None,
    now: float,
    policy: RetryPolicy,
    rng: random.Random,
) -> Decision:
    """The fate of an event after its ``attempts``-th attempt got ``status`` (None: no answer,
    ``error`` says why). Pure: the worker's rules, testable with a seeded ``rng``."""
    if status is not None and 200 <= status < 300:
        return Decision("delivered", f"HTTP {status}")
    if status is not None and status not in RETRY_STATUSES and status < 500:
        if status == 410:
            why = "HTTP 410 Gone: the receiver no longer wants these events"
        elif 300 <= status < 400:
            why = f"HTTP {status}: redirects are not followed; set the persona's webhook URL"
        else:
            why = f"HTTP {status}: the receiver refused the event"
        return Decision("dead", _with_detail(why, error))
    failure = _with_detail(f"HTTP {status}" if status is not None else "no answer", error)
    delay = policy.delay_after(attempts, rng)
    if delay is None:
        return Decision("dead", f"gave up after {attempts} attempts; last: {failure}")
    wait = parse_retry_after(retry_after, now)
    if wait is not None:
        delay = max(delay, min(wait, policy.max_retry_after))
    return Decision("retry", failure, at=now + delay)


def _with_detail(what: str, detail: str | None) -> str:
    return f"{what}: {detail}" if detail else what


class DeliveryWorker:
    """Delivers the outbox's due events until :meth:`stop`.

    ::

        outbox = await SQLiteOutbox.in_data_dir(settings.data_dir)
        worker = DeliveryWorker(outbox)
        task = asyncio.create_task(worker.run())
        await worker.submit(event, url=persona.webhook.url, secret_env=persona.webhook.secret_env)
        ...
        await worker.flush(5)   # at shutdown: send what is due
        await worker.stop()

    The signing secret is read from ``environ[item.secret_env]`` at each attempt (the outbox
    stores the variable's name, never the secret). A missing or malformed secret fails the
    attempt, logged, and is retried on the schedule: fix the variable and restart.
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        policy: RetryPolicy | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        concurrency: int = DEFAULT_CONCURRENCY,
        per_destination: int = DEFAULT_PER_DESTINATION,
        lease: float | None = None,
        poll_interval: float = 1.0,
        retention: float | None = 30 * 24 * HOUR,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rng: random.Random | None = None,
        environ: Mapping[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
        on_outcome: Callable[[str], None] | None = None,
        on_outbox_error: Callable[[], None] | None = None,
    ) -> None:
        if concurrency < 1 or per_destination < 1:
            raise ValueError("concurrency and per_destination must be at least 1")
        self.outbox = outbox
        self.policy = policy or RetryPolicy()
        self.timeout = timeout
        self.concurrency = concurrency
        self.per_destination = min(per_destination, concurrency)
        # A claim must outlive the request it covers, or a second worker could start a duplicate
        # while the first still waits for its answer.
        self.lease = lease if lease is not None else timeout + 30.0
        if self.lease <= timeout:
            raise ValueError(f"lease ({self.lease} s) must be longer than timeout ({timeout} s)")
        self.poll_interval = poll_interval
        self.retention = retention
        self.clock = clock
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.environ = os.environ if environ is None else environ
        self._session = session
        self._own_session = session is None
        self.on_outcome = on_outcome  # told "delivered", "retry" or "dead" (metrics)
        self.on_outbox_error = on_outbox_error  # told of each failed round of the loop (metrics)
        #: The outbox error the loop keeps meeting, until a round succeeds: readiness shows it
        #: (a damaged or refusing outbox must make the instance unready, not loop in the logs).
        self.outbox_problem: str | None = None
        self._tasks: dict[asyncio.Task[None], OutboxItem] = {}
        self._by_destination: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._running = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self._grace = 5.0
        self._next_purge = 0.0

    # --- public ---------------------------------------------------------------------------

    async def submit(
        self, event: Event, *, url: str, secret_env: str, closes_call: str | None = None
    ) -> bool:
        """Commit ``event`` to the outbox for ``url``, then wake the worker. Returns once the
        event is durable; False if its id was already queued. Raises OutboxError if the event
        could not be stored (the caller should log it whole: it is not queued)."""
        added = await self.outbox.enqueue(
            event, url=url, secret_env=secret_env, now=self.clock(), closes_call=closes_call
        )
        self.wake()
        return added

    def wake(self) -> None:
        """Look for due events now rather than at the next poll (something was enqueued)."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def run(self) -> None:
        """Deliver until :meth:`stop`. Outbox errors are logged and retried, never raised:
        the worker outlives a database that is briefly locked or full."""
        if self._running:
            raise RuntimeError("this DeliveryWorker is already running")
        # _stopping is not reset: stop() called before this task got to run still stops it.
        self._running = True
        self._stopped.clear()
        log.info(
            "delivery_worker_started",
            concurrency=self.concurrency,
            per_destination=self.per_destination,
            timeout=self.timeout,
        )
        failures = 0
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    claimed = await self._fill()
                    delay = await self._idle_delay(claimed)
                    await self._maybe_purge()
                    failures = 0
                    if self.outbox_problem is not None:
                        log.warning("outbox_available_again")
                        self.outbox_problem = None
                except Exception as exc:  # the worker must outlive any one bad moment
                    failures += 1
                    delay = min(self.poll_interval * 2**failures, 60.0)
                    if isinstance(exc, OutboxError):
                        self.outbox_problem = str(exc)
                        if self.on_outbox_error is not None:
                            self.on_outbox_error()
                        log.error("outbox_unavailable", error=str(exc), retry_in=round(delay, 1))
                    else:
                        log.exception("delivery_loop_failed", retry_in=round(delay, 1))
                await self._wait(delay)
        finally:
            await self._drain()
            if self._own_session and self._session is not None:
                await self._session.close()
                self._session = None
            self._running = False
            self._stopped.set()
            log.info("delivery_worker_stopped")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop claiming; give in-flight deliveries ``grace`` seconds, then cancel them and hand
        their claims back (they are due again at the next start). A stopped worker stays
        stopped: make a new one to start again."""
        self._grace = grace
        self._stopping = True
        self.wake()
        if self._running:
            await self._stopped.wait()

    async def flush(self, timeout: float) -> bool:
        """Wait until nothing is in flight and nothing is due (events waiting for a later retry
        do not count). True if that happened within ``timeout`` seconds. Only :meth:`run`
        delivers: without it running, this waits out ``timeout`` if anything is due."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if not self._tasks:
                try:
                    due = await self.outbox.next_due_at()
                except OutboxError as exc:  # nothing can be delivered from it: stop waiting
                    log.error("outbox_unavailable", error=str(exc))
                    return False
                if due is None or due > self.clock():
                    return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._progress.clear()
            self.wake()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, self.poll_interval)):
                    await self._progress.wait()

    async def deliver(self, item: OutboxItem) -> Decision:
        """One attempt at a claimed item: sign, POST, record the outcome in the outbox."""
        now = self.clock()
        status, error, retry_after = await self._post(item, now)
        done = self.clock()
        attempt = item.attempts + 1
        decision = decide(
            attempt,
            status=status,
            error=error,
            retry_after=retry_after,
            now=done,
            policy=self.policy,
            rng=self.rng,
        )
        fields = {
            "event_id": item.id,
            "event_type": item.type,
            "destination": item.destination,
            "attempt": attempt,
            "status": status,
        }
        claim = item.claim or ""
        if decision.action == "delivered":
            recorded = await self.outbox.mark_delivered(item.id, claim, now=done, status=status)
            log.info("webhook_delivered", **fields, seconds=round(done - now, 3))
        elif decision.action == "retry":
            assert decision.at is not None
            recorded = await self.outbox.mark_retry(
                item.id, claim, now=done, at=decision.at, status=status, error=decision.reason
            )
            log.warning(
                "webhook_retry_scheduled",
                **fields,
                error=decision.reason,
                retry_in=round(decision.at - done, 1),
            )
        else:
            recorded = await self.outbox.mark_dead(
                item.id, claim, now=done, status=status, error=decision.reason
            )
            log.error("webhook_dead_letter", **fields, error=decision.reason)
        if not recorded:
            # The lease ran out, or someone ran `events redeliver`: the newer claim decides.
            log.warning("webhook_claim_superseded", event_id=item.id)
        if self.on_outcome is not None:
            self.on_outcome(decision.action)
        return decision

    # --- the loop -------------------------------------------------------------------------

    async def _fill(self) -> int:
        free = self.concurrency - len(self._tasks)
        if free <= 0:
            return 0
        room = {d: self.per_destination - n for d, n in self._by_destination.items() if n}
        items = await self.outbox.claim_due(
            now=self.clock(),
            limit=free,
            lease=self.lease,
            room=room,
            default_room=self.per_destination,
        )
        for item in items:
            task = asyncio.create_task(self._run_one(item), name=f"deliver {item.id}")
            self._tasks[task] = item
            self._by_destination[item.destination] += 1
        return len(items)

    async def _idle_delay(self, claimed: int) -> float:
        if len(self._tasks) >= self.concurrency:
            return self.poll_interval  # a finishing delivery wakes the loop
        skip = [d for d, n in self._by_destination.items() if n >= self.per_destination]
        due = await self.outbox.next_due_at(skip=skip)
        if due is None:
            return self.poll_interval
        delay = min(self.poll_interval, max(0.0, due - self.clock()))
        # Something is due but nothing could be claimed (another process holds it): don't spin.
        return delay if claimed or delay > 0 else min(self.poll_interval, 0.05)

    async def _wait(self, delay: float) -> None:
        if self._wake.is_set() or delay <= 0:
            await asyncio.sleep(0)
            return
        sleeper = asyncio.ensure_future(self.sleep(delay))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (sleeper, waker):
                fut.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)

    async def _run_one(self, item: OutboxItem) -> None:
        try:
            await self.deliver(item)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.outbox.release(item.id, item.claim or "", now=self.clock())
            raise
        except Exception:
            # A bug or an outbox error while recording: the claim lapses and the event is
            # tried again after the lease (the same id, so receivers deduplicate).
            log.exception("webhook_delivery_crashed", event_id=item.id)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._tasks.pop(task, None)
            self._by_destination[item.destination] -= 1
            if self._by_destination[item.destination] <= 0:
                del self._by_destination[item.destination]
            self._progress.set()
            self.wake()

    async def _drain(self) -> None:
        tasks = list(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self._grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.warning("webhook_deliveries_interrupted", count=len(pending))

    async def _maybe_purge(self) -> None:
        now = self.clock()
        if self.retention is None or now < self._next_purge:
            return
        self._next_purge = now + HOUR
        removed = await self.outbox.purge_delivered(before=now - self.retention)
        if removed:
            log.info("outbox_purged", delivered_events=removed)

    # --- HTTP -----------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.concurrency),
                headers={"User-Agent": f"phoneagent/{__version__} (webhooks)"},
                # Honour HTTPS_PROXY / NO_PROXY: the spec suggests an egress proxy against SSRF.
                trust_env=True,
            )
        return self._session

    async def close(self) -> None:
        """Close the HTTP session if this worker made it (for :meth:`deliver` without run)."""
        if self._own_session and self._session is not None and not self._running:
            await self._session.close()
            self._session = None

    async def _post(
        self, item: OutboxItem, now: float
    ) -> tuple[int | None, str | None, str | None]:
        """(status, error, Retry-After) of one POST; status None when there was no answer."""
        secret = self.environ.get(item.secret_env, "")
        try:
            headers = signature_headers(item.id, item.body, secret, timestamp=int(now))
        except SigningError as exc:
            return None, f"cannot sign with ${item.secret_env}: {exc}", None
        headers["Content-Type"] = "application/json"
        try:
            async with self._http().post(
                item.url,
                data=item.body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as response:
                detail = None
                if not 200 <= response.status < 300:
                    detail = _snippet(await response.content.read(ERROR_SNIPPET))
                return response.status, detail, response.headers.get("Retry-After")
        except TimeoutError:
            return None, f"no answer within {self.timeout:g} s", None
        except (aiohttp.ClientError, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}", None


def _snippet(raw: bytes) -> str | None:
    text = " ".join(raw.decode("utf-8", errors="replace").split())
    return text[:ERROR_SNIPPET] or None


# --- `python -m phoneagent.delivery.worker`: run the worker on its own ------------------------


def main(argv: list[str] | None = None) -> int:
    """Deliver a data directory's outbox without the server: after an outage, from a cron job
    (``--drain``), or as a separate process next to ``phoneagent serve``."""
    parser = argparse.ArgumentParser(
        prog="python -m phoneagent.delivery.worker",
        description="Deliver the webhook events waiting in the outbox.",
    )
    parser.add_argument("--data-dir", type=Path, help="default: $PHONEAGENT_DATA_DIR, else ./data")
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
        return asyncio.run(_serve_worker(args, args.data_dir or settings.data_dir, policy))
    except OutboxError as exc:
        print(f"phoneagent: outbox error: {exc}", file=sys.stderr)
        return 2


async def _serve_worker(args: argparse.Namespace, data_dir: Path, policy: RetryPolicy) -> int:
    outbox = await SQLiteOutbox.in_data_dir(data_dir)
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


if __name__ == "__main__":
    sys.exit(main())
