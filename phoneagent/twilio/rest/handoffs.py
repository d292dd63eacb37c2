"""Handing a live call on through Twilio's REST API: transfer and hang-up. The
media-stream shell calls these when the ``Call`` asks (``bridge.Handoffs``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from phoneagent.call import Call
from phoneagent.logs import get_logger
from phoneagent.outbound.context import business_line
from phoneagent.personas import Persona, TransferTarget
from phoneagent.records import CallRecord, CallRecords, Transferred
from phoneagent.twilio.rest.calls import CallUpdateFailed, TwilioCalls
from phoneagent.twilio.wire.twiml import dial_twiml

log = get_logger(__name__)


@dataclass
class TwilioHandoffs:
    """Hands a call on through Twilio's REST API, for the media-stream shell."""

    rest: TwilioCalls
    calls: CallRecords
    # Runs work to its end even if the call's task is cancelled (the server awaits it at exit).
    spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]
    # A transfer's outcome, for the persona's webhook: (persona, record, target, outcome, error,
    # reason).
    publish_transfer: Callable[[Persona, CallRecord, TransferTarget, str, str | None, str], None]
    count_transfer: Callable[[str], None]  # "accepted" or "failed", for the metrics
    public_url: Callable[[], str]  # read at each transfer: the settings may be replaced

    async def transfer(self, call: Call, target: TransferTarget, reason: str = "") -> str | None:
        # Twilio's `stop` (which ends the stream, and cancels the shell's wait) can come before
        # its HTTP answer: the request and its bookkeeping run to the end on their own.
        return await asyncio.shield(self.spawn(self._transfer(call, target, reason)))

    async def hang_up(self, call: Call) -> str | None:
        return await asyncio.shield(
            self.spawn(self._update(self.rest.hang_up(call.call_sid), "hang_up"))
        )

    async def _transfer(self, call: Call, target: TransferTarget, reason: str) -> str | None:
        record = self.calls.open(call.call_sid)
        # The action may reach another instance: it must not depend on this one's records.
        query = urlencode(
            {"persona": call.persona.id, "target": target.name,
             "from": record.caller, "to": record.called}
        )  # fmt: skip
        twiml_text = dial_twiml(
            target.number,
            caller_id=target.caller_id or business_line(record),
            ring_seconds=target.ring_seconds,
            action_url=f"{self.public_url()}/twilio/dial-status?{query}",
        )
        transfer = {"target": target.name, "number": target.number, "reason": reason or None}
        self.calls.note(call.call_sid, Transferred(transfer))
        error = await self._update(self.rest.redirect(call.call_sid, twiml_text), "transfer")
        outcome = "failed" if error else "accepted"
        self.count_transfer(outcome)
        if error is not None:
            self.calls.note(call.call_sid, Transferred(None))
        self.publish_transfer(call.persona, record, target, outcome, error, reason)
        return error

    async def _update(self, request: Awaitable[None], what: str) -> str | None:
        try:
            await request
        except CallUpdateFailed as exc:
            log.error(f"twilio_{what}_failed", status=exc.status, twilio_code=exc.code,
                      error=str(exc))  # fmt: skip
            return f"Twilio error {exc.code}: {exc}" if exc.code else str(exc)
        return None
