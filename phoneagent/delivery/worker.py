"""The delivery worker: takes due events from the outbox and has them POSTed, signed, to their
webhook, following the retry rules of ``policy`` (the sender is ``sender``).

- Deliveries run concurrently (``concurrency``), at most ``per_destination`` to one receiver
  (scheme, host and port), so a slow or hanging receiver holds a few slots, never all of them.
  With a shared (PostgreSQL) outbox the limit is the receiver's in total, over all instances.
- A claim on an event lasts ``lease`` seconds, longer than a request may take, so two workers
  (or a worker and a restart) never deliver the same event at once.

Time is injected (``clock``: Unix seconds, ``sleep``, ``rng``), so backoff and ``Retry-After``
are tested without waiting. ``next_attempt_at`` is stored as wall-clock time because it must
mean the same thing after a restart.

``python -m phoneagent.delivery.worker`` runs the worker without the server (``delivery/cli.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping

import aiohttp

from phoneagent.delivery.events import Event
from phoneagent.delivery.outbox import Outbox, OutboxError, OutboxItem
from phoneagent.delivery.policy import HOUR, RETENTION, Decision, RetryPolicy, decide
from phoneagent.delivery.sender import WebhookSender
from phoneagent.delivery.status import AttemptOutcome
from phoneagent.logs import get_logger

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_PER_DESTINATION",
    "DEFAULT_TIMEOUT",
    "DeliveryWorker",
]

log = get_logger("phoneagent.delivery.worker")  # not "__main__" under `python -m`

#: 15–30 s is what the spec recommends a receiver be given to answer.
DEFAULT_TIMEOUT = 15.0
DEFAULT_CONCURRENCY = 32
DEFAULT_PER_DESTINATION = 4
#: An outbox that fails (a database away, a full disk) is tried again this often at most: the
#: instance is unready until a round succeeds, so it must learn soon that the outbox is back.
OUTBOX_RETRY_SECONDS = 5.0
#: Any other failure of the loop (a bug) backs off further.
MAX_BACKOFF_SECONDS = 60.0
#: While the outbox keeps failing, one log line per this many seconds (and one when it is back).
OUTBOX_LOG_EVERY = 60.0


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
        retention: float | None = RETENTION,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rng: random.Random | None = None,
        environ: Mapping[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
        on_outcome: Callable[[AttemptOutcome], None] | None = None,
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
        self.sender = WebhookSender(
            timeout=timeout, concurrency=concurrency, environ=self.environ, session=session
        )
        self.on_outcome = on_outcome  # told each AttemptOutcome (metrics)
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
        logged_at: float | None = None  # when the outbox's failure was last logged
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
                        logged_at = None
                except Exception as exc:  # the worker must outlive any one bad moment
                    failures += 1
                    delay = min(self.poll_interval * 2**failures, MAX_BACKOFF_SECONDS)
                    if isinstance(exc, OutboxError):
                        delay = min(delay, OUTBOX_RETRY_SECONDS)
                        self.outbox_problem = str(exc)
                        if self.on_outbox_error is not None:
                            self.on_outbox_error()
                        now = self.clock()
                        if logged_at is None or now - logged_at >= OUTBOX_LOG_EVERY:
                            logged_at = now
                            log.error(
                                "outbox_unavailable",
                                error=str(exc),
                                failures=failures,
                                retry_in=round(delay, 1),
                            )
                    else:
                        log.exception("delivery_loop_failed", retry_in=round(delay, 1))
                await self._wait(delay)
        finally:
            await self._drain()
            await self.sender.close()
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
        status, error, retry_after = await self.sender.post(item, now)
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
        if decision.action is AttemptOutcome.DELIVERED:
            recorded = await self.outbox.mark_delivered(item.id, claim, now=done, status=status)
            log.info("webhook_delivered", **fields, seconds=round(done - now, 3))
        elif decision.action is AttemptOutcome.RETRY:
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
        # Something is due but nothing could be claimed: its receivers are at their limit with
        # other instances' deliveries (a shared outbox), or another process holds it. Their
        # progress shows at the next poll; our own deliveries finishing wake the loop sooner.
        return delay if claimed or delay > 0 else self.poll_interval

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

    async def close(self) -> None:
        """Close the HTTP session if this worker made it (for :meth:`deliver` without run)."""
        if not self._running:
            await self.sender.close()


if __name__ == "__main__":  # `python -m phoneagent.delivery.worker`, as the README documents
    from phoneagent.delivery.cli import run_worker

    sys.exit(run_worker())
