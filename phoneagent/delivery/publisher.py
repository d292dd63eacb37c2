"""From calls to webhook events: which persona wants which event, built and committed.

The call path hands over the persona and the call record; this module decides whether the
persona's webhook wants the event, builds it (masking the caller's number if asked) and commits
it to the outbox. Once ``publish`` returns, the event survives a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable

from phoneagent.call.actions import EndReason
from phoneagent.delivery.events import (
    CALL_ENDED,
    OUTBOUND_END_REASONS,
    Event,
    call_ended_event,
    call_started_event,
    call_transferred_event,
    mask_number,
)
from phoneagent.delivery.outbox import OutboxError
from phoneagent.delivery.spool import EventSpool
from phoneagent.delivery.worker import DeliveryWorker
from phoneagent.logs import get_logger
from phoneagent.outbound.context import is_outbound
from phoneagent.personas import Persona
from phoneagent.records import CallRecord, transfer_taken

log = get_logger(__name__)

# How the core's end reasons read in `call.ended` (events.END_REASONS, the public schema 1). A
# media socket closed without Twilio's `stop`, or a model that went away, is an error from the
# caller's side. Records keep ``EndReason.value``; anything else (a call that never ended
# cleanly) reads "error".
EVENT_END_REASONS: dict[EndReason, str] = {
    EndReason.CALLER_HUNG_UP: "caller_hung_up",
    EndReason.AGENT_HUNG_UP: "agent_hung_up",
    EndReason.TRANSFERRED: "transferred",
    EndReason.TIME_LIMIT: "time_limit",
    EndReason.DRAIN_GOODBYE: "server_shutdown",  # the schema has one word for both
    EndReason.SERVER_SHUTDOWN: "server_shutdown",
    EndReason.TWILIO_DISCONNECTED: "error",
    EndReason.MODEL_DISCONNECTED: "error",
}


def lost_call_event_id(call_sid: str, started_at: float) -> str:
    """The id of a lost call's ``call.ended``: the same for every report of that call (the
    call and when it started: a CallSid that comes back from a transfer is a later start)."""
    digest = hashlib.sha256(f"server_lost\0{call_sid}\0{started_at!r}".encode()).hexdigest()
    return "evt_" + digest[:24]  # the shape of new_event_id's


def event_end_reason(recorded: str | None) -> str:
    """The schema's end_reason for a record's (an ``EndReason`` value, an outbound call's
    reason without the agent — ``busy``, ``voicemail``… — or None)."""
    if recorded in OUTBOUND_END_REASONS:
        return recorded
    try:
        return EVENT_END_REASONS[EndReason(recorded)]
    except ValueError:
        return "error"


class CallEventPublisher:
    def __init__(
        self,
        worker: DeliveryWorker,
        *,
        on_write_failure: Callable[[], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
    ):
        self.worker = worker
        self.on_write_failure = on_write_failure
        self.spool = EventSpool(self._commit, on_write_failure=on_write_failure, on_lost=on_lost)
        # One call's writes in the order the call made them (each is its own task): its open
        # record before its turns and its end, call.started before call.ended, even when a
        # write is slow (a full disk) and the call was short.
        self._call_locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def _in_call_order(self, call_sid: str) -> AsyncIterator[None]:
        lock = self._call_locks.setdefault(call_sid, asyncio.Lock())
        async with lock:
            yield

    async def _commit(self, event: Event, url: str, secret_env: str) -> None:
        # A call.ended closes its open call in the same transaction (see close_lost_calls).
        closes = event.data.get("call_sid") if event.type == CALL_ENDED else None
        await self.worker.submit(event, url=url, secret_env=secret_env, closes_call=closes)

    # --- calls a killed run left open ----------------------------------------------------
    # The outbox keeps each call in progress (who, when, the turns so far), so the calls of a
    # run that was killed mid-call can be ended: the business gets an end for every start.
    # With SQLite the next start ends them (the file is the instance's own: instances sharing
    # one would close each other's live calls, and the README forbids it); with a shared
    # database any instance adopts them once their run's heartbeat is stale (liveness.py).

    async def call_turn(self, call_sid: str, turn: dict) -> None:
        """A transcript turn became final: keep it for a call.ended if this run dies."""
        async with self._in_call_order(call_sid):
            await self._journal("add_turn", call_sid, turn)

    async def close_lost_calls(self, *, now: float) -> int:
        """At start-up, before any call: a call.ended ``server_lost`` for each call the last
        run left open, with what was recorded; how many."""
        calls = await self.worker.outbox.open_calls()
        for call_sid, call, turns in calls:
            await self.end_lost_call(call_sid, call, turns, now=now)
        return len(calls)

    async def end_lost_call(
        self, call_sid: str, call: dict, turns: list[dict], *, now: float, owner: str = ""
    ) -> None:
        """End one call its instance lost: a call.ended ``server_lost`` if its persona wants
        one (the call's open record is closed with it), else just close the record."""
        started = float(call["started_at"])
        # When it ended is unknown: the last moment it was seen alive (its last turn).
        last_ms = max((int(t.get("end_ms", 0)) for t in turns), default=0)
        if call.get("wants_ended"):
            event = call_ended_event(
                call_sid=call_sid,
                persona_id=call["persona_id"],
                persona_name=call["persona_name"],
                from_number=call["from"],
                to_number=call["to"],
                mask_caller=bool(call["mask_caller"]),
                # Recorded by this release on: a call opened by an earlier one was answered.
                direction=call.get("direction") or "inbound",
                variables=call.get("variables") or {},
                metadata=call.get("metadata") or {},
                started_at=started,
                ended_at=min(max(started, started + last_ms / 1000), max(now, started)),
                end_reason="server_lost",
                transcript=turns,
                # One id per lost call, whoever reports it and however often: should two
                # reports race (an adopter whose commit waited in memory), the outbox keeps one.
                event_id=lost_call_event_id(call_sid, started),
            )
            await self.spool.submit(event, url=call["url"], secret_env=call["secret_env"])
        else:
            await self.worker.outbox.close_call(call_sid)
        fields = {"lost_by": owner} if owner else {}
        log.warning("lost_call_closed", call_sid=call_sid, turns=len(turns), **fields)

    async def _journal(self, method: str, *args) -> None:
        try:
            await getattr(self.worker.outbox, method)(*args)
        except OutboxError as exc:
            # Not an event: the call's own call.ended still carries everything. Only a crash
            # during this outage would report less (logged here).
            log.warning("open_call_not_recorded", call_sid=args[0], step=method, error=str(exc))
            if self.on_write_failure is not None:
                self.on_write_failure()

    def problems(self) -> list[str]:
        """Why events cannot reach the outbox now (readiness); empty when they can."""
        problems = (self.worker.outbox.problem, self.worker.outbox_problem, self.spool.problem)
        return [p for p in problems if p]

    async def call_started(self, persona: Persona, record: CallRecord) -> None:
        async with self._in_call_order(record.call_sid):
            await self._call_started(persona, record)

    async def _call_started(self, persona: Persona, record: CallRecord) -> None:
        if persona.webhook is not None:
            fields = self._call_fields(persona, record)
            await self._journal(
                "open_call",
                record.call_sid,
                {
                    **fields,
                    "url": persona.webhook.url,
                    "secret_env": persona.webhook.secret_env,
                    "wants_ended": self._wants(persona, CALL_ENDED),
                    "started_at": record.started_at or 0.0,
                    "from": record.caller,
                    "to": fields["to_number"],  # an outbound callee's masked, as the events
                },
            )
        if self._wants(persona, "call.started"):
            await self._publish(
                persona,
                call_started_event(
                    **self._call_fields(persona, record), started_at=record.started_at or 0.0
                ),
            )

    async def call_transferred(
        self,
        persona: Persona,
        record: CallRecord,
        *,
        target: str,
        target_number: str,
        outcome: str,
        at: float,
        error: str | None = None,
        reason: str = "",
    ) -> None:
        if not self._wants(persona, "call.transferred"):
            return
        async with self._in_call_order(record.call_sid):
            event = call_transferred_event(
                **self._call_fields(persona, record),
                target=target,
                target_number=target_number,
                outcome=outcome,
                at=at,
                error=error,
                reason=reason,
            )
            await self._publish(persona, event)

    async def call_ended(self, persona: Persona, record: CallRecord) -> None:
        try:
            async with self._in_call_order(record.call_sid):
                await self._call_ended(persona, record)
        finally:
            lock = self._call_locks.get(record.call_sid)
            if lock is not None and not lock.locked():
                del self._call_locks[record.call_sid]  # the call's last write

    async def _call_ended(self, persona: Persona, record: CallRecord) -> None:
        if not self._wants(persona, "call.ended"):
            if persona.webhook is not None:
                await self._journal("close_call", record.call_sid)
            return
        ended_at = record.ended_at or 0.0
        # A transfer nobody answered is not how the caller's return to the agent ended.
        transfer = transfer_taken(record)
        event = call_ended_event(
            **self._call_fields(persona, record),
            started_at=record.started_at or ended_at,
            ended_at=ended_at,
            end_reason=event_end_reason(record.end_reason),
            transcript=record.transcript,
            transfer_target=transfer["target"] if transfer else None,
            transfer_number=transfer["number"] if transfer else None,
            transfer_reason=transfer.get("reason") if transfer else None,
        )
        await self._publish(persona, event)

    @staticmethod
    def _wants(persona: Persona, event_type: str) -> bool:
        return persona.webhook is not None and event_type in persona.webhook.events

    @staticmethod
    def _call_fields(persona: Persona, record: CallRecord) -> dict:
        assert persona.webhook is not None
        mask, to_number = persona.webhook.mask_caller, record.called
        if mask and is_outbound(record):
            # The person on the line is the one called: `from` is the persona's own number.
            mask, to_number = False, mask_number(record.called)
        return {
            "call_sid": record.call_sid,
            "persona_id": persona.id,
            "persona_name": persona.name,
            "from_number": record.caller,
            "to_number": to_number,
            "mask_caller": mask,
            # A record without a context is a call answered before one was known: inbound.
            "direction": record.direction or "inbound",
            "variables": record.variables,
            "metadata": record.metadata,
        }

    async def _publish(self, persona: Persona, event: Event) -> None:
        assert persona.webhook is not None
        # Committed, or held in memory and retried while the outbox refuses writes.
        await self.spool.submit(
            event, url=persona.webhook.url, secret_env=persona.webhook.secret_env
        )
