"""Twilio's HTTP webhooks: the voice webhook that connects a call to the agent, the `<Dial>`
action after a transfer, and the call and stream status callbacks."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from twilio.request_validator import SIGNATURE_HEADER, SIGNATURE_SETTINGS_HEADER

from phoneagent.call import EndReason
from phoneagent.call.context import CallContext
from phoneagent.call.prompts import session_config
from phoneagent.config import Settings
from phoneagent.logs import get_logger
from phoneagent.personas import Persona
from phoneagent.records import Answered, CallRecord, TransferNotAnswered, TwilioReported
from phoneagent.state import STATE, ServerState
from phoneagent.twilio.wire.signature import SHARED_KEY_MISSING, signature_problem
from phoneagent.twilio.wire.twiml import (
    CALLED_PARAMETER,
    CALLER_PARAMETER,
    PERSONA_PARAMETER,
    RESUME_PARAMETER,
    TOKEN_PARAMETER,
    apology_twiml,
    busy_twiml,
    connect_stream_twiml,
    hangup_twiml,
    redirect_twiml,
    say_then_hand_on_twiml,
)

log = get_logger(__name__)

NO_PERSONA_APOLOGY = "Sorry, this number is not in service right now. Goodbye."


# What Twilio POSTs (twilio reference, section 1.1); anything else is not Twilio.
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"


def public_url_for(settings: Settings, request: web.Request, base_url: str = "") -> str:
    """The URL Twilio called, as Twilio wrote and signed it: ``base_url`` (default PUBLIC_URL;
    a proxy may have rewritten scheme and host) + the path and query exactly as received.

    Never the decoded query: Twilio signs ``client%3Aalice``, not ``client:alice``.
    """
    target = request.raw_path
    if not target.startswith("/"):  # an absolute-form request target: keep its path and query
        parts = urlsplit(target)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
    return (base_url or settings.public_url) + target


def twilio_signed(
    request: web.Request, params: Mapping[str, str] | object, base_url: str = ""
) -> bool:
    """True when Twilio signed this request (form ``params``, URL under ``base_url``), else
    False, logged with why. Every Twilio route, the media-stream upgrade too, checks here."""
    settings = request.app[STATE].settings
    signature = request.headers.get(SIGNATURE_HEADER, "")
    signature_settings = request.headers.get(SIGNATURE_SETTINGS_HEADER, "")
    problem = signature_problem(
        public_url_for(settings, request, base_url),
        params,
        signature,
        signature_settings,
        auth_token=settings.twilio_auth_token,
        shared_key=settings.twilio_webhook_shared_key,
    )
    if not problem:
        return True
    call_sid = params.get("CallSid") if isinstance(params, Mapping) else None
    details = {"path": request.path, "has_signature": bool(signature), "call_sid": call_sid}
    if signature_settings:  # the key's id and algorithm, never a secret
        details["signature_settings"] = signature_settings[:200]
    if problem == SHARED_KEY_MISSING:
        details["fix"] = (
            "a Twilio Webhook Rule signs these requests with a SharedKey: set "
            "TWILIO_WEBHOOK_SHARED_KEY to that key's secret"
        )
    log.warning(problem, **details)
    return False


async def signed_form(request: web.Request) -> dict[str, str] | None:
    """The webhook's form fields if Twilio's signature checks out, else None (logged).

    A body that is not a form (multipart, JSON, bytes that are not text) is not Twilio's:
    refused with 415 or 400 before any signature check.
    """
    if request.content_type != FORM_CONTENT_TYPE:
        log.warning("twilio_webhook_not_a_form", path=request.path,
                    content_type=request.content_type[:100])  # fmt: skip
        raise web.HTTPUnsupportedMediaType(text=f"expected {FORM_CONTENT_TYPE}")
    try:
        form = await request.post()
    except (ValueError, LookupError) as exc:  # undecodable bytes, an unknown charset
        log.warning("twilio_webhook_malformed_form", path=request.path, error=type(exc).__name__)
        raise web.HTTPBadRequest(text="malformed form body") from None
    if not twilio_signed(request, form):
        return None
    return {k: str(v) for k, v in form.items()}


def invalid_signature() -> web.Response:
    return web.Response(status=403, text="invalid Twilio signature")


def twiml(text: str) -> web.Response:
    return web.Response(text=text, content_type="text/xml")


async def voice_webhook(request: web.Request) -> web.Response:
    state = request.app[STATE]
    form = await signed_form(request)
    if form is None:
        return invalid_signature()
    call_sid, called = form.get("CallSid", ""), form.get("To", "")
    if state.draining:
        # Shutting down: another instance, or the number's fallback URL (on a 5xx), takes it.
        log.info("call_refused_draining", call_sid=call_sid)
        if state.settings.fallback_url:
            return twiml(redirect_twiml(state.settings.fallback_url))
        return web.Response(status=503, text="draining")
    persona = state.persona_for_number(called)
    if persona is None:
        log.warning("no_persona_for_number", call_sid=call_sid, to=called)
        return twiml(apology_twiml(NO_PERSONA_APOLOGY))
    if state.at_capacity():
        log.warning("call_refused_busy", call_sid=call_sid, max_calls=state.settings.max_calls)
        state.metrics.calls.labels("busy").inc()
        return twiml(busy_twiml(persona, called))
    state.answering += 1  # no await since the capacity check: the place is held from here
    try:
        return await answer_call(state, form, persona, call_sid, called)
    finally:
        state.answering -= 1


async def answer_call(
    state: ServerState, form: Mapping[str, str], persona: Persona, call_sid: str, called: str
) -> web.Response:
    key = f"voice:{call_sid}"
    known = await state.calls.fetch(call_sid)  # any instance's, with a shared database
    call_over = known is not None and known.ended_at is not None
    if (replayed := await replay_answer(state, key, call_sid, call_over=call_over)) is not None:
        return replayed
    caller = form.get("From", "")
    # Before the answer: the caller hears it ring, for the lookup's timeout at most.
    context = await state.lookups.context_for(
        persona, call_sid=call_sid, caller=caller, called=called
    )
    answer, first = await start_agent_stream(
        state, key, persona, call_sid, caller=caller, called=called, context=context
    )
    if not first:  # the same request, answered meanwhile here or on another instance
        return replayed_answer(state, key, call_sid, answer)
    log.info("call_incoming", call_sid=call_sid, persona=persona.id, to=called)
    return twiml(answer)


async def start_agent_stream(
    state: ServerState,
    key: str,
    persona: Persona,
    call_sid: str,
    *,
    caller: str,
    called: str,
    context: CallContext,
) -> tuple[str, bool]:
    """Connect a call to the agent with its ``context``: the TwiML of a media stream with a
    fresh stream token, kept as the answer to the request named ``key`` (the first answer
    wins), and whether it is this one: (TwiML, first). Inbound calls come here from the voice
    webhook, outbound calls from whatever Twilio asks once the callee answers.

    The context goes into the call's record, and is in the shared store before the TwiML is
    given out (within ``CallRecords.written``'s wait): the stream may reach another instance,
    which reads it from there (``media_stream.open_model_call``). The first answer pre-warms
    the model session with the persona's texts filled with the call's values."""
    record = state.calls.note(call_sid, context.answered(persona.id, caller, called))
    shared, (answer, first) = await asyncio.gather(
        state.calls.written(call_sid),
        state.replay.remember(key, agent_twiml(state, persona, record)),
    )
    if not shared:
        log.warning("call_context_not_shared", call_sid=call_sid, persona=persona.id)
    if first:
        state.prewarmer.start(call_sid, session_config(persona_for_call(persona, record)))
    return answer, first


def persona_for_call(persona: Persona, record: CallRecord | None) -> Persona:
    """``persona`` as the call recorded in ``record`` has it: filled with the call's values,
    or with the defaults (as loaded) when no context was recorded."""
    context = CallContext.of_record(record)
    return context.persona(persona) if context is not None else persona


async def replay_answer(
    state: ServerState, key: str, call_sid: str, *, call_over: bool = False
) -> web.Response | None:
    """The answer to a request seen before (a replay: Twilio's signature has no timestamp), or
    a hang-up for a call that is over; None for a new request. Neither starts anything."""
    answered = await state.replay.answer_for(key)
    if answered is None and not call_over:
        return None
    return replayed_answer(state, key, call_sid, answered)


def replayed_answer(
    state: ServerState, key: str, call_sid: str, answered: str | None
) -> web.Response:
    log.warning("twilio_webhook_replayed", call_sid=call_sid, request=key.partition(":")[0])
    state.metrics.webhook_replays.inc()
    return twiml(answered if answered is not None else hangup_twiml())


def agent_twiml(
    state: ServerState,
    persona: Persona,
    record: CallRecord,
    resume: str = "",
) -> str:
    """TwiML connecting the call to a media stream with ``persona`` (with a fresh stream
    token). Whoever answers with it opens the model session then (pre-warm: the stream claims
    it on `start`), once the answer is kept as the request's first (``ReplayGuard.remember``).
    ``resume`` marks a call coming back to the agent. The call's context (its direction, its
    values) is not in the TwiML: the stream reads it from the call's record."""
    parameters = {
        PERSONA_PARAMETER: persona.id,
        TOKEN_PARAMETER: state.stream_token.issue(record.call_sid, persona.id),
        # The instance taking the stream may not be the one answering this webhook.
        CALLER_PARAMETER: record.caller,
        CALLED_PARAMETER: record.called,
    }
    if resume:
        parameters[RESUME_PARAMETER] = resume
    public_url = state.settings.public_url
    status_url = f"{public_url}/twilio/stream-status"
    # Any instance may get the action: it carries the persona; Twilio adds CallSid, From, To.
    action_url = f"{public_url}/twilio/stream-ended?{urlencode({'persona': persona.id})}"
    return connect_stream_twiml(state.settings.stream_url, status_url, parameters, action_url)


async def stream_ended(request: web.Request) -> web.Response:
    """`<Connect action>`: the media stream is over and the caller is still on the line.

    After a goodbye whose hang-up request did not get through, the call ends. In every other
    case the agent could not (or can no longer) take the call: the model was unreachable or
    lost, the persona went away, the stream was refused, or this instance does not know the
    call at all. The caller then hears the persona's apology and goes to its fallback target,
    never silence.
    """
    state = request.app[STATE]
    form = await signed_form(request)
    if form is None:
        return invalid_signature()
    call_sid = form.get("CallSid", "")
    reason = await end_reason_of(state, call_sid)
    persona = state.persona(request.query.get("persona", ""))
    log.info("stream_ended", call_sid=call_sid, end_reason=reason, persona_known=bool(persona))
    if reason in HANG_UP_REASONS:
        return twiml(hangup_twiml())
    state.metrics.calls_apologised.inc()
    if persona is None:
        return twiml(apology_twiml(NO_PERSONA_APOLOGY))
    # The persona's own number (for the fallback's caller ID): `From` on a call it placed.
    line = form.get("From" if form.get("Direction") == "outbound-api" else "To", "")
    return twiml(say_then_hand_on_twiml(persona.apology, persona, line))


END_REASON_WAIT = 2.0  # seconds: see end_reason_of
END_REASON_POLL = 0.1

# The stream ended because the call was meant to end: Twilio's action gets a plain hang-up.
HANG_UP_REASONS = frozenset(
    {
        EndReason.AGENT_HUNG_UP.value,
        EndReason.TIME_LIMIT.value,
        EndReason.DRAIN_GOODBYE.value,  # not SERVER_SHUTDOWN: a call cut gets the apology
        EndReason.CALLER_HUNG_UP.value,
        EndReason.TRANSFERRED.value,
    }
)


async def end_reason_of(state: ServerState, call_sid: str) -> str | None:
    """Why the call's stream ended: this instance's call (which may still be closing its
    sockets), else the record. With a shared database the stream may have run on another
    instance, whose record of the end is written as its socket closes, just as Twilio asks this
    action: a record of a live stream is read again for up to END_REASON_WAIT seconds (a
    stream that died with its instance stays live: the caller hears the apology then).

    The wait is bounded: a Twilio signature has no timestamp, so one captured action can be
    sent again and again, each send a 2-second poll of the database. Requests for one call
    share one poll, and at most ``end_reason_pollers`` calls are polled at once; past that a
    request reads the record once and does not wait."""
    shell = state.active_calls.get(call_sid)
    if shell is not None and shell.call.end_reason is not None:
        return shell.call.end_reason.value
    if state.calls.shared is None:
        return _end_reason(await state.calls.fetch(call_sid))
    polls = _END_REASON_POLLS.setdefault(state.calls, {})
    poll = polls.get(call_sid)
    if poll is None:
        if len(polls) >= end_reason_pollers(state):
            log.warning("end_reason_wait_skipped", call_sid=call_sid, polling=len(polls))
            return _end_reason(await state.calls.fetch(call_sid))
        poll = asyncio.ensure_future(_poll_end_reason(state, call_sid))
        polls[call_sid] = poll
        poll.add_done_callback(lambda _: polls.pop(call_sid, None))
    # Shielded: a request that goes away does not cancel the poll the others wait on.
    return await asyncio.shield(poll)


# Polls in progress, by the CallRecords they read and CallSid (weak: an app's records go
# with it).
_END_REASON_POLLS: weakref.WeakKeyDictionary[object, dict[str, asyncio.Future[str | None]]] = (
    weakref.WeakKeyDictionary()
)


def end_reason_pollers(state: ServerState) -> int:
    """Calls whose end may be polled at once: the calls an instance takes, twice (each ending
    stream asks once), and never fewer than 16."""
    return max(16, 2 * state.settings.max_calls)


def _end_reason(record: CallRecord | None) -> str | None:
    return record.end_reason if record is not None else None


async def _poll_end_reason(state: ServerState, call_sid: str) -> str | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + END_REASON_WAIT
    while True:
        record = await state.calls.fetch(call_sid)
        if record is None or record.end_reason is not None or record.started_at is None:
            return _end_reason(record)
        if loop.time() >= deadline:
            return None
        await asyncio.sleep(END_REASON_POLL)


async def dial_status(request: web.Request) -> web.Response:
    """`<Dial action>`: the person we transferred to answered (the call ends when they hang
    up), or did not (the caller comes back to the agent, who apologises)."""
    state = request.app[STATE]
    form = await signed_form(request)
    if form is None:
        return invalid_signature()
    outcome = form.get("DialCallStatus", "")
    call_sid = form.get("CallSid", "")
    key = f"dial:{call_sid}:{form.get('DialCallSid') or outcome}"
    if (replayed := await replay_answer(state, key, call_sid)) is not None:
        return replayed
    record = state.calls.note(
        call_sid,
        Answered(
            request.query.get("persona", ""),
            request.query.get("from", ""),
            request.query.get("to", ""),
        ),
    )
    persona = state.persona(request.query.get("persona", ""))
    target_name = request.query.get("target", "")
    log.info("transfer_outcome", call_sid=record.call_sid, target=target_name, outcome=outcome)
    if outcome in ("completed", "answered") or persona is None:
        return twiml(hangup_twiml())
    resumed = agent_twiml(state, persona, record, resume=f"{target_name}:{outcome}")
    answer, first = await state.replay.remember(key, resumed)
    if not first:  # the same request, answered meanwhile here or on another instance
        return replayed_answer(state, key, call_sid, answer)
    # Kept with the transfer: the caller's return is not a transfer (its call.ended says so).
    state.calls.note(call_sid, TransferNotAnswered(outcome))
    # The call comes back with its own values (recorded by the webhook, on any instance).
    known = await state.calls.fetch(call_sid)
    target = persona.transfer.get(target_name)
    if target is not None:
        # Why the agent transferred, as recorded when it asked Twilio (on any instance).
        reason = ((known or record).transfer or {}).get("reason") or ""
        state.publish_transfer(persona, record, target, "failed", outcome, reason)
    state.prewarmer.start(call_sid, session_config(persona_for_call(persona, known)))
    return twiml(answer)


async def status_callback(request: web.Request) -> web.Response:
    state = request.app[STATE]
    form = await signed_form(request)
    if form is None:
        return invalid_signature()
    fields = ("CallStatus", "CallDuration", "StreamSid", "StreamEvent", "StreamError", "Timestamp")
    event = {f: form[f] for f in fields if f in form}
    log.info("twilio_status", path=request.path, call_sid=form.get("CallSid"), **event)
    state.calls.note(form.get("CallSid", ""), TwilioReported(event | {"path": request.path}))
    return web.Response(status=204)
