"""Twilio's requests about the calls we placed: the callee answered (``AnsweredBy`` from
answering machine detection decides between the agent and the voicemail message), and the
call's progress (a call nobody answered is reported in ``call.ended``). Both are signed by
Twilio and checked exactly as the inbound webhooks are."""

from __future__ import annotations

from aiohttp import web

from phoneagent.call.actions import EndReason
from phoneagent.call.context import OUTBOUND, CallContext
from phoneagent.logs import get_logger
from phoneagent.outbound import rules
from phoneagent.outbound.context import ANSWER_PATH, STATUS_PATH, answered_by, placed_for
from phoneagent.outbound.dialer import Dialer
from phoneagent.outbound.ends import agent_stream, answer_key, report_end
from phoneagent.personas import Persona
from phoneagent.records import CallRecord, TwilioReported
from phoneagent.state import STATE, ServerState
from phoneagent.twilio.routes.webhooks import (
    invalid_signature,
    replay_answer,
    replayed_answer,
    signed_form,
    start_agent_stream,
    twiml,
)
from phoneagent.twilio.wire.twiml import (
    hangup_twiml,
    say_then_hang_up_twiml,
)

log = get_logger(__name__)

DIALER = web.AppKey("dialer", Dialer)

# What the status callback keeps of Twilio's fields (StatusCallback, Calls create).
STATUS_FIELDS = ("CallStatus", "CallDuration", "AnsweredBy", "SipResponseCode", "Timestamp",
                 "SequenceNumber", "ErrorCode")  # fmt: skip


def add_routes(app: web.Application) -> None:
    app.router.add_post(ANSWER_PATH, outbound_answer)
    app.router.add_post(STATUS_PATH, outbound_status)


async def outbound_answer(request: web.Request) -> web.Response:
    """The callee picked up (Url of Calls create): the agent for a person (or when detection
    cannot tell), the voicemail message or a hang-up for a machine, a hang-up for a fax."""
    state = request.app[STATE]
    form = await signed_form(request)
    if form is None:
        return invalid_signature()
    call_sid = form.get("CallSid", "")
    key = answer_key(call_sid)
    if (replayed := await replay_answer(state, key, call_sid)) is not None:
        return replayed
    persona_id = request.query.get("persona", "")
    persona = state.persona(persona_id)
    record = await state.calls.fetch(call_sid)
    if persona is None or persona.outbound is None:
        log.warning("outbound_answer_unknown_persona", call_sid=call_sid, persona=persona_id[:100])
        return twiml(hangup_twiml())
    if not placed_for(record, persona.id):
        # A call we know, but did not place for this persona: not ours to talk in.
        log.warning("outbound_answer_not_placed", call_sid=call_sid, persona=persona.id)
        return twiml(hangup_twiml())
    context = placed_context(record, persona, call_sid)
    event = {f: form[f] for f in STATUS_FIELDS if f in form} | {"path": request.path}
    state.calls.note(call_sid, TwilioReported(event))
    # The callee is ``To`` of Twilio's request, the persona's caller ID ``From``.
    caller, called = form.get("From", ""), form.get("To", "")
    state.calls.note(call_sid, context.answered(persona.id, caller, called))
    who = form.get("AnsweredBy", "")
    kind = rules.answer_for(who)
    log.info("outbound_answered", call_sid=call_sid, persona=persona.id, answered_by=who or None,
             answer=kind.value)  # fmt: skip
    # The voicemail message, like every text of the call, is filled with its variables.
    message = context.persona(persona).outbound.voicemail_message  # type: ignore[union-attr]
    if kind is rules.Answer.VOICEMAIL and message:
        answer = say_then_hang_up_twiml(message, persona)
    elif kind is not rules.Answer.AGENT:
        answer = hangup_twiml()
    elif state.draining or state.at_capacity():
        log.warning("outbound_answer_no_capacity", call_sid=call_sid, draining=state.draining)
        answer = say_then_hang_up_twiml(persona.apology, persona)
        # No stream will report this call's end, and its completed callback says only that a
        # person answered: reported here, once (a replayed answer is answered from the cache).
        reason = EndReason.SERVER_SHUTDOWN.value if state.draining else rules.NO_CAPACITY
        kept, first = await state.replay.remember(key, answer)
        if not first:
            return replayed_answer(state, key, call_sid, kept)
        await report_end(state, call_sid, reason, request.query.get("persona", ""))
        return twiml(answer)
    else:
        state.answering += 1  # no await since the capacity check: the place is held from here
        try:
            # Exactly as an inbound call: the context in the record, a token-bound stream,
            # the model pre-warmed with the persona filled with the call's values.
            answer, first = await start_agent_stream(
                state, key, persona, call_sid, caller=caller, called=called, context=context
            )
        finally:
            state.answering -= 1
        return twiml(answer) if first else replayed_answer(state, key, call_sid, answer)
    kept, first = await state.replay.remember(key, answer)
    if not first:
        return replayed_answer(state, key, call_sid, kept)
    return twiml(answer)


def placed_context(record: CallRecord | None, persona: Persona, call_sid: str) -> CallContext:
    """The context the dialer recorded with the call; for a call placed by a process without
    the shared database (``phoneagent call`` without PHONEAGENT_DATABASE_URL), an outbound
    call with the persona's defaults (that command refuses to place a call whose values
    would be lost so)."""
    context = CallContext.of_record(record)
    if context is not None and context.direction == OUTBOUND:
        return context
    log.info("outbound_call_not_recorded", call_sid=call_sid, persona=persona.id)
    return CallContext.defaults(persona, OUTBOUND)


async def outbound_status(request: web.Request) -> web.Response:
    """A placed call's progress (StatusCallback): recorded; once over without the agent
    (busy, no answer, failed, canceled, a machine or a fax), reported in ``call.ended``."""
    state = request.app[STATE]
    form = await signed_form(request)
    if form is None:
        return invalid_signature()
    call_sid = form.get("CallSid", "")
    event = {f: form[f] for f in STATUS_FIELDS if f in form} | {"path": request.path}
    log.info(
        "outbound_status", call_sid=call_sid, **{k: v for k, v in event.items() if k != "path"}
    )
    known = await state.calls.fetch(call_sid)  # every instance's view: a stream ran elsewhere?
    persona_id = request.query.get("persona", "")
    persona = state.persona(persona_id)
    context = CallContext.of_record(known)
    caller, called = form.get("From", ""), form.get("To", "")
    if context is not None and context.direction == OUTBOUND:
        # This instance's view gets the context recorded when the call was placed (maybe by
        # another instance): the events it sends carry the call's own values.
        state.calls.note(call_sid, context.answered(persona_id, caller, called))
    record = state.calls.note(call_sid, TwilioReported(event))
    views = [r for r in (known, record) if r is not None]
    talked = next((r for r in views if r.started_at is not None), record)
    call_status, who = event.get("CallStatus", ""), event.get("AnsweredBy") or answered_by(record)
    reason = rules.end_reason_without_agent(call_status, talked, who)
    not_ended = all(r.ended_at is None for r in views)
    if (
        not reason
        and not_ended
        and rules.hung_up_before_the_agent(call_status, talked, who)
        and await _no_stream_will_report(state, call_sid)
    ):
        reason = EndReason.CALLER_HUNG_UP.value
    if reason and not_ended:
        if context is None or context.direction != OUTBOUND:
            # Twilio signed it, so our account placed the call: a process without the shared
            # database did (`phoneagent call`), or its record is gone. Reported for the persona
            # of the callback's URL, which Twilio signed too, as outbound with its defaults.
            # Only now, at its end: Twilio's callbacks are asynchronous, and an early one
            # ("initiated") may come before the dialer has Twilio's answer and records the
            # call's context, which a context written here would shadow (the first one stays).
            log.warning("outbound_status_unknown_call", call_sid=call_sid)
            fallback = CallContext.defaults(persona, OUTBOUND) if persona else CallContext(OUTBOUND)
            state.calls.note(call_sid, fallback.answered(persona_id, caller, called))
        await report_end(state, call_sid, reason, request.query.get("persona", ""))
    return web.Response(status=204)


async def _no_stream_will_report(state: ServerState, call_sid: str) -> bool:
    """Whether no media stream of the call reports its end, now or later: this claims the
    stream token the agent's TwiML gave Twilio, as a stream's ``start`` does (atomically, on
    every instance sharing the database). Claimed here first, no stream can open with it; a
    stream that claimed it first reports the call itself. Only while the token is valid: an
    expired token's claim is forgotten, so a stream may have used it. And only when the claim
    is shared: with the database away another instance may hold the token, and two reports are
    worse than none for a call nobody talked in."""
    token, persona_id = await agent_stream(state, call_sid)
    # Not the agent's TwiML (none kept, or the apology), or a token past its life.
    if not token or state.stream_token.check(token, call_sid, persona_id):
        log.info("outbound_end_left_to_the_stream", call_sid=call_sid, token=bool(token))
        return False
    expiry = state.stream_token.expiry(token)
    return await state.replay.claim_stream(token, expiry, shared_only=True)
