"""The dialer: places a persona's call through Twilio's REST API (Calls create), after the
rules (``rules``) allow it, and records it so the answer and the status callbacks — on any
instance, with a shared database — know the call (``context``).

Concurrency: the calls of a persona placed and not yet ended are counted from the call records:
every instance's with ``PHONEAGENT_DATABASE_URL``, else this process's own. Two instances
placing a persona's last free call at the same moment may both pass (the count is read, not
reserved, in the database); within one process the count includes calls being placed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from phoneagent.api.errors import ApiError
from phoneagent.call.context import OUTBOUND
from phoneagent.logs import get_logger
from phoneagent.outbound import rules
from phoneagent.outbound.context import ANSWER_PATH, PLACED, STATUS_PATH
from phoneagent.outbound.rules import OutboundRefused
from phoneagent.personas import Persona
from phoneagent.records import CallRecords, TwilioReported
from phoneagent.twilio.rest.calls import CallUpdateFailed, TwilioCalls

log = get_logger(__name__)

# Twilio's call progress events, all of them: the record follows the call, and busy / no-answer
# / failed / canceled arrive with `completed` (StatusCallbackEvent, Calls create).
STATUS_EVENTS = ["initiated", "ringing", "answered", "completed"]
# A persona's calls in its counting window, read at most: far above any sane limit.
COUNT_LIMIT = 5000
# Twilio's error codes about the numbers, answered as a problem with that field.
TO_ERRORS = frozenset({21201, 21211, 21214, 21215, 21216, 21217})
FROM_ERRORS = frozenset({21210, 21212, 21213})


class Dialer:
    def __init__(
        self,
        *,
        persona: Callable[[str], Persona | None],
        calls: CallRecords,
        rest: TwilioCalls,
        public_url: Callable[[], str],
        now: Callable[[], datetime] = rules.now_utc,
        count: Callable[[str], None] = lambda outcome: None,
        our_lines: Callable[[], Collection[str]] = tuple,
    ) -> None:
        self._persona = persona
        self._our_lines = our_lines  # the numbers our personas answer (not called)
        self._calls = calls
        self._rest = rest
        self._public_url = public_url
        self.now = now  # the calling hours are checked at this time (tests set it)
        self._count = count  # each call asked for: "placed", or the refusal's code (metrics)
        self._placing: dict[str, int] = {}  # by persona: Twilio asked, not yet answered

    async def place(
        self,
        *,
        to: str,
        persona: str,
        from_: str | None = None,
        variables: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Place the call: its fields (call_sid, status "queued", to, from, persona, direction
        "outbound"), or OutboundRefused with a code, a message and the field at fault."""
        try:
            call = await self._place(to, persona, from_, variables, metadata)
        except OutboundRefused as refused:
            log.info("outbound_call_refused", persona=persona[:100], code=refused.code,
                     field=refused.field)  # fmt: skip
            self._count(refused.code)
            raise
        self._count("placed")
        return call

    async def _place(
        self,
        to: str,
        persona: str,
        from_: str | None,
        variables: Mapping[str, str] | None,
        metadata: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        found = self._persona(persona)
        variables = {} if variables is None else variables
        metadata = {} if metadata is None else metadata
        outbound, context = rules.check_request(persona, found, to, from_, variables, metadata)
        assert found is not None
        rules.check_not_our_line(to, self._our_lines())
        rules.check_calling_hours(persona, outbound, self.now())
        caller_id = from_ or outbound.from_number
        self._placing[persona] = self._placing.get(persona, 0) + 1  # before the first await
        try:
            active = await self._under_way(found) + self._placing[persona] - 1
            rules.check_concurrency(persona, outbound, active)
            call = await self._create(found, to, caller_id)
        finally:
            self._placing[persona] -= 1
        call_sid = str(call["sid"])
        # The call's context goes into its record now, with Twilio's answer: the callee may
        # answer on any instance, which reads it there (``routes.outbound_answer``).
        self._calls.note(call_sid, context.answered(persona, caller_id, to))
        placed = {"path": PLACED, "CallStatus": call["status"] or ""}
        self._calls.note(call_sid, TwilioReported(placed))
        # Returns once the record is where every instance counts it (a shared database: the
        # write is awaited, for a second at most; a database that is away is logged there).
        await self._calls.fetch(call_sid)
        # Not the number called: a person's number stays out of the logs, as callers' do.
        log.info("outbound_call_placed", call_sid=call_sid, persona=persona)
        return {
            "call_sid": call_sid,
            "status": call["status"] or "queued",
            "to": to,
            "from": caller_id,
            "persona": persona,
            "direction": OUTBOUND,
        }

    async def _under_way(self, persona: Persona) -> int:
        """The persona's placed calls not yet ended: the shared records' view, with this
        process's own where it knows better (its writes may not be in the database yet)."""
        since = time.time() - rules.counting_window(persona)
        query = {"persona": persona.id, "since": since, "limit": COUNT_LIMIT}
        shared = {r.call_sid: r for r in await self._calls.search(**query)}
        local = {r.call_sid: r for r in await self._calls.local.search(**query)}
        calls = shared | local
        return sum(
            1
            for sid, record in calls.items()
            if rules.under_way(record) and (sid not in shared or rules.under_way(shared[sid]))
        )

    async def _create(self, persona: Persona, to: str, caller_id: str) -> dict[str, Any]:
        assert persona.outbound is not None
        public_url = self._public_url()
        query = urlencode({"persona": persona.id})
        try:
            return await self._rest.create(
                to=to,
                from_=caller_id,
                url=f"{public_url}{ANSWER_PATH}?{query}",
                method="POST",
                status_callback=f"{public_url}{STATUS_PATH}?{query}",
                status_callback_event=STATUS_EVENTS,
                status_callback_method="POST",
                machine_detection=rules.machine_detection(persona.outbound),
            )
        except CallUpdateFailed as exc:
            log.warning("outbound_call_refused_by_twilio", persona=persona.id, code=exc.code,
                        status=exc.status, reason=str(exc))  # fmt: skip
            field = "to" if exc.code in TO_ERRORS else "from" if exc.code in FROM_ERRORS else None
            code = f" {exc.code}" if exc.code else ""
            message = f"Twilio refused the call (error{code}): {exc}"
            if field:  # a number Twilio will not call, or not from: the request's fault
                raise rules.invalid(field, message) from None
            raise OutboundRefused("twilio_refused", message, status=502) from None


class ApiDialer:
    """The dialer as ``POST /api/v1/calls`` uses it (``api.routes.OutboundDialer``): the
    persona the route found, and a refusal answered as an API error with the same code,
    status and field (the codes are the API's: ``api/errors.py``)."""

    def __init__(self, dialer: Dialer) -> None:
        self.dialer = dialer

    async def place(
        self,
        *,
        to: str,
        persona: Persona,
        from_: str | None,
        variables: dict[str, str],
        metadata: dict[str, Any],
    ) -> dict[str, Any]:
        try:
            return await self.dialer.place(
                to=to, persona=persona.id, from_=from_, variables=variables, metadata=metadata
            )
        except OutboundRefused as refused:
            where = f"{refused.field}: " if refused.field else ""
            raise ApiError(refused.status, refused.code, where + refused.message,
                           refused.field) from None  # fmt: skip
