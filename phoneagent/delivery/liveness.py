"""Instances sharing a PostgreSQL database tell each other they are alive, and end the calls of
those that are not.

Each run of `phoneagent serve` on a shared database (a fresh ``run_id`` at each start) refreshes
its row in ``phoneagent_instances`` every ``HEARTBEAT_SECONDS``, and each call it records in
progress carries that run. A run not seen for ``STALE_SECONDS`` (killed, its pod or host gone, cut
off from the database), or whose row is gone (it stopped cleanly with calls it could not end),
has lost its calls: every instance looks for such calls at each heartbeat, adopts them in one
transaction (so of two instances adopting at once, each call goes to one) and sends their
``call.ended`` with end reason ``server_lost``, as a restarted SQLite instance does for its own.
An adopted call stays open, now this run's, until its event is committed: an adopter that dies
midway leaves the call to the next one.

Liveness is by run, not by name, so a replaced Deployment pod (a new name) has its calls ended
by the others, and two processes sharing a host name never take each other's calls for lost.
The name (``PHONEAGENT_INSTANCE_NAME``) says who held a call, in logs and in the table.

An instance adopts only once it has itself been in touch with the database for
``SETTLE_BEATS`` heartbeats in a row: after an outage of the database every instance's heartbeat
is old, and the live ones must have had the time to beat again before anyone judges them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from phoneagent.delivery.outbox import OutboxError
from phoneagent.delivery.pg_outbox import LostCall, PostgresOutbox
from phoneagent.delivery.publisher import CallEventPublisher
from phoneagent.logs import get_logger

__all__ = ["HEARTBEAT_SECONDS", "STALE_SECONDS", "InstanceLiveness"]

log = get_logger(__name__)

#: How often a running instance records that it is alive, and looks for lost calls.
HEARTBEAT_SECONDS = 10.0
#: A run not seen for this long is taken for dead: several missed heartbeats, so a slow
#: moment (a long garbage collection, a busy database) is not mistaken for a death.
STALE_SECONDS = 60.0
#: Heartbeats in a row this instance must have made before it adopts anything.
SETTLE_BEATS = 3


class InstanceLiveness:
    """This run's heartbeat, and the adoption of lost calls: :meth:`start` beats once (before
    the first call, so this run's calls are never taken for lost) and then every
    ``heartbeat_seconds`` (:meth:`tick`) until :meth:`stop`. The timings default to the
    module's constants, read when it is made."""

    def __init__(
        self,
        outbox: PostgresOutbox,
        publisher: CallEventPublisher,
        *,
        heartbeat_seconds: float | None = None,
        stale_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_adopted: Callable[[int], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.publisher = publisher
        self.heartbeat_seconds = heartbeat_seconds or HEARTBEAT_SECONDS
        self.stale_seconds = stale_seconds or STALE_SECONDS
        self.clock = clock
        self.monotonic = monotonic
        self.on_adopted = on_adopted  # told how many calls each adoption ended (metrics)
        self._last_beat: float | None = None  # monotonic time of the last heartbeat recorded
        self._beats_in_a_row = 0
        self._name_shared = False
        self._first_adoption = True
        self._unfinished: list[LostCall] = []  # adopted, but closing the record failed
        self._task: asyncio.Task[None] | None = None

    def heartbeat_age(self) -> float:
        """Seconds since this run's heartbeat was last recorded (the metric): past
        ``stale_seconds`` the other instances take this one for dead."""
        if self._last_beat is None:
            return 0.0
        return max(0.0, self.monotonic() - self._last_beat)

    async def start(self) -> None:
        """The first heartbeat, then the loop in a task of its own (until :meth:`stop`).
        Raises OutboxError if the database refuses the first heartbeat."""
        await self._beat()
        log.info(
            "instance_heartbeat_started",
            instance=self.outbox.owner,
            run_id=self.outbox.run_id,
            heartbeat_seconds=self.heartbeat_seconds,
            stale_seconds=self.stale_seconds,
        )
        self._task = asyncio.create_task(self._run(), name="instance heartbeat")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                await self.tick()
            except Exception:  # the loop must outlive any one bad moment
                log.exception("instance_liveness_failed")

    async def tick(self) -> int:
        """One round: beat, then adopt and end lost calls if this instance has settled; how
        many calls were ended."""
        try:
            await self._beat()
        except OutboxError as exc:
            self._beats_in_a_row = 0
            log.warning(
                "instance_heartbeat_failed",
                error=str(exc),
                seconds_since_last=round(self.heartbeat_age(), 1),
            )
            return 0
        if self._beats_in_a_row < SETTLE_BEATS:
            return 0
        try:
            return await self.adopt()
        except OutboxError as exc:  # nothing was taken (one transaction): next beat
            log.warning("lost_calls_not_adopted", error=str(exc))
            return 0

    async def adopt(self) -> int:
        """Adopt the calls of dead runs and end each; how many were ended."""
        legacy_owner = self.outbox.owner if self._first_adoption else None
        adopted = await self.outbox.adopt_lost_calls(
            stale_after=self.stale_seconds, legacy_owner=legacy_owner
        )
        self._first_adoption = False
        if adopted:
            log.warning(
                "lost_calls_adopted",
                calls=len(adopted),
                lost_by=sorted({call.owner for call in adopted}),
            )
        pending, self._unfinished = self._unfinished + adopted, []
        ended = 0
        for call in pending:
            try:
                await self.publisher.end_lost_call(
                    call.call_sid, call.call, call.turns, now=self.clock(), owner=call.owner
                )
            except OutboxError as exc:
                # Its record stays open under this run: try again at the next beat.
                log.warning("lost_call_not_closed", call_sid=call.call_sid, error=str(exc))
                self._unfinished.append(call)
                continue
            ended += 1
        if ended and self.on_adopted is not None:
            self.on_adopted(ended)
        return ended

    async def stop(self) -> None:
        """Stop beating and delete this run's heartbeat (a clean stop): a call it still holds
        is adopted by the others at their next beat."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self.outbox.forget_instance()
        except OutboxError as exc:  # its heartbeat goes stale instead
            log.warning("instance_not_forgotten", error=str(exc))

    async def _beat(self) -> None:
        gap = self.heartbeat_age()
        others = await self.outbox.heartbeat()
        self._last_beat = self.monotonic()
        self._beats_in_a_row += 1
        if gap > self.stale_seconds:
            # The others may have taken this instance for dead meanwhile, and ended its calls
            # as server_lost: those calls' own call.ended follows when they end.
            log.error("instance_heartbeat_resumed_late", seconds_without=round(gap, 1))
        if others and not self._name_shared:
            log.error(
                "instance_name_shared",
                instance=self.outbox.owner,
                other_runs=others,
                hint="give each instance its own PHONEAGENT_INSTANCE_NAME",
            )
        self._name_shared = bool(others)
