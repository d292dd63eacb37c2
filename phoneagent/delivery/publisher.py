"""From calls to webhook events: which persona wants which event, built and committed.

The call path hands over the persona and the call record; this module decides whether the
persona's webhook wants the event, builds it (masking the caller's number if asked) and commits
it to the outbox. Once ``publish`` returns, the event survives a crash.
"""

from __future__ import annotations

from collections.abc import Callable

from phoneagent.delivery.events import (
    Event,
    call_ended_event,
    call_started_event,
    call_transferred_event,
)
from phoneagent.delivery.spool import EventSpool
from phoneagent.delivery.worker import DeliveryWorker
from phoneagent.logs import get_logger
from phoneagent.personas import Persona
from phoneagent.records import CallRecord

log = get_logger(__name__)

# How the call path's end reasons read in `call.ended` (events.END_REASONS). A media socket
# closed without Twilio's `stop`, or a model that went away, is an error from the caller's side.
EVENT_END_REASONS = {
    "caller_hung_up": "caller_hung_up",
    "agent_hung_up": "agent_hung_up",
    "transferred": "transferred",
    "time_limit": "time_limit",
    "twilio_disconnected": "error",
    "model_disconnected": "error",
}


class CallEventPublisher:
    def __init__(
        self,
        worker: DeliveryWorker,
        *,
        on_write_failure: Callable[[], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
    ):
        self.worker = worker
        self.spool = EventSpool(self._commit, on_write_failure=on_write_failure, on_lost=on_lost)

    async def _commit(self, event: Event, url: str, secret_env: str) -> None:
        await self.worker.submit(event, url=url, secret_env=secret_env)

    def problems(self) -> list[str]:
        """Why events cannot reach the outbox now (readiness); empty when they can."""
        return [p for p in (self.worker.outbox_problem, self.spool.problem) if p]

    async def call_started(self, persona: Persona, record: CallRecord) -> None:
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
    ) -> None:
        if self._wants(persona, "call.transferred"):
            event = call_transferred_event(
                **self._call_fields(persona, record),
                target=target,
                target_number=target_number,
                outcome=outcome,
                at=at,
                error=error,
            )
            await self._publish(persona, event)

    async def call_ended(self, persona: Persona, record: CallRecord) -> None:
        if not self._wants(persona, "call.ended"):
            return
        ended_at = record.ended_at or 0.0
        event = call_ended_event(
            **self._call_fields(persona, record),
            started_at=record.started_at or ended_at,
            ended_at=ended_at,
            end_reason=EVENT_END_REASONS.get(record.end_reason or "", "error"),
            transcript=record.transcript,
            transfer_target=record.transfer["target"] if record.transfer else None,
            transfer_number=record.transfer["number"] if record.transfer else None,
        )
        await self._publish(persona, event)

    @staticmethod
    def _wants(persona: Persona, event_type: str) -> bool:
        return persona.webhook is not None and event_type in persona.webhook.events

    @staticmethod
    def _call_fields(persona: Persona, record: CallRecord) -> dict:
        assert persona.webhook is not None
        return {
            "call_sid": record.call_sid,
            "persona_id": persona.id,
            "persona_name": persona.name,
            "from_number": record.caller,
            "to_number": record.called,
            "mask_caller": persona.webhook.mask_caller,
        }

    async def _publish(self, persona: Persona, event: Event) -> None:
        assert persona.webhook is not None
        # Committed, or held in memory and retried while the outbox refuses writes.
        await self.spool.submit(
            event, url=persona.webhook.url, secret_env=persona.webhook.secret_env
        )
