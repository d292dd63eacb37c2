"""What one server instance holds while it runs: settings, personas, the calls it is taking,
and the work it has started. The app keeps it under ``STATE``; every route reads it there."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from phoneagent.bridge import BusinessTools, CallShell, Handoffs, TurnListener
from phoneagent.call import Call
from phoneagent.client_limits import UnauthenticatedGate
from phoneagent.config import Settings
from phoneagent.delivery.publisher import CallEventPublisher
from phoneagent.lookup import CallerLookups
from phoneagent.metrics import Metrics
from phoneagent.personas import Persona, PersonaRegistry, TransferTarget
from phoneagent.realtime.connection import Prewarmer
from phoneagent.records import CallRecord, CallRecords, TurnFinished
from phoneagent.twilio.wire.replay import MemoryReplayGuard, ReplayGuard
from phoneagent.twilio.wire.token import StreamToken

T = TypeVar("T")


@dataclass
class ServerState:
    settings: Settings
    personas: PersonaRegistry
    prewarmer: Prewarmer
    draining: bool = False
    active_calls: dict[str, CallShell] = field(default_factory=dict)  # by CallSid
    # CallSids whose stream passed its checks and is being set up (its model session claimed):
    # reserved at once, so a second stream for the call is refused while the first awaits.
    opening_calls: set[str] = field(default_factory=set)
    # Voice webhooks past the capacity check, awaiting their answer's record (a database round
    # trip when shared): counted as calls, so concurrent new calls cannot all pass the cap.
    answering: int = 0
    # What is known about calls: this instance's view, and with PHONEAGENT_DATABASE_URL the
    # records every instance shares (records/call_records.py).
    calls: CallRecords = field(default_factory=CallRecords)
    # Replay defences: Twilio's signatures carry no timestamp (see twilio/wire/replay.py). In
    # memory, or shared by every instance of PHONEAGENT_DATABASE_URL (twilio/wire/pg_replay.py).
    replay: ReplayGuard = field(default_factory=MemoryReplayGuard)
    clock: Callable[[], float] = time.monotonic  # calls' clock: tests run calls faster
    publisher: CallEventPublisher | None = None  # None: no webhook delivery (no outbox)
    handoffs: Handoffs | None = None  # Twilio's REST API (twilio/rest/handoffs.py), set by the app
    business_tools: BusinessTools | None = None  # persona tools' requests (business_tools.py)
    metrics: Metrics = field(init=False)
    # Personas' lookups, asked before an inbound call is answered (lookup.py).
    lookups: CallerLookups = field(init=False)
    # Twilio requests not yet authenticated (client_limits.py).
    unauthenticated: UnauthenticatedGate = field(init=False)
    # Where the metrics listener listens, once it does: (host, port).
    metrics_address: tuple[str, int] | None = None
    # Work that must finish even if the request that started it is cancelled (event commits).
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    # Called with (call, turn) as each transcript turn becomes final: live transcript views.
    turn_listeners: list[TurnListener] = field(default_factory=list)
    # CallSids of calls placed from the console ("talk to this persona", console/talk.py): a
    # call like any other (counted against PHONEAGENT_MAX_CALLS, recorded, shown live) except
    # that its events go to no webhook: an operator trying a persona is not a customer calling.
    console_calls: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.turn_listeners.append(self._record_live_turn)
        self.unauthenticated = UnauthenticatedGate(lambda: self.settings.max_unauthenticated)
        self.metrics = Metrics(
            active_calls=lambda: len(self.active_calls),
            unauthenticated=lambda: self.unauthenticated.count,
        )
        self.lookups = CallerLookups(
            on_failure=lambda reason: self.metrics.lookup_failures.labels(reason).inc()
        )

    def persona(self, persona_id: str) -> Persona | None:
        """The persona as configured now (reloads may have changed or removed it)."""
        return self.personas.current.personas.get(persona_id)

    def persona_for_number(self, called: str) -> Persona | None:
        return self.personas.current.for_number(called)

    def at_capacity(self) -> bool:
        """A new call would exceed PHONEAGENT_MAX_CALLS (calls in progress, being set up and
        ringing)."""
        taken = len(self.active_calls) + len(self.opening_calls) + self.prewarmer.waiting
        taken += self.answering
        return taken >= self.settings.max_calls

    def readiness_problems(self) -> list[str]:
        """Why this instance should take no new calls, besides draining: its events cannot
        reach the outbox (damaged, disk full, read-only, the database away), or its call records
        the shared database."""
        problems = self.publisher.problems() if self.publisher is not None else []
        return problems + ([self.calls.problem] if self.calls.problem else [])

    def publishes(self, call_sid: str) -> bool:
        """Whether the call's events go to its persona's webhook (console calls' do not)."""
        return self.publisher is not None and call_sid not in self.console_calls

    def _record_live_turn(self, call: Call, turn: dict) -> None:
        self.calls.note(call.call_sid, TurnFinished(turn))
        if self.publisher is not None and self.publishes(call.call_sid):
            # On disk too, for a call.ended if this run is killed.
            self.spawn(self.publisher.call_turn(call.call_sid, dict(turn)))

    @property
    def stream_token(self) -> StreamToken:
        return StreamToken(self.settings.twilio_auth_token)

    def publish_transfer(
        self,
        persona: Persona,
        record: CallRecord,
        target: TransferTarget,
        outcome: str,
        error: str | None,
        reason: str = "",
    ) -> None:
        """A transfer's outcome, for the persona's webhook (when this app publishes events)."""
        if self.publisher is not None:
            self.spawn(
                self.publisher.call_transferred(
                    persona,
                    record,
                    target=target.name,
                    target_number=target.number,
                    outcome=outcome,
                    at=time.time(),
                    error=error,
                    reason=reason,
                )
            )


STATE = web.AppKey("state", ServerState)
