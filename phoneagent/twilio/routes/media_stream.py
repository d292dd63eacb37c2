"""The media-stream WebSocket route: check the upgrade and the stream's `start`, open the
``Call`` with its pre-warmed model session, run it, and record how it ended."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

from aiohttp import web

from phoneagent.bridge import (
    CallShell,
    Handoffs,
    StreamRefused,
    TurnListener,
    TwilioLine,
    bind_call_context,
    read_start,
    unbind_call_context,
)
from phoneagent.call import Call, prompts
from phoneagent.call.context import OUTBOUND, CallContext
from phoneagent.call.prompts import session_config
from phoneagent.client_limits import SLOT
from phoneagent.logs import get_logger
from phoneagent.outbound.ends import report_refused_stream
from phoneagent.personas import Persona
from phoneagent.realtime.connection import ModelSession, ModelUnavailable
from phoneagent.records import StreamEnded, StreamStarted, TransferNotAnswered
from phoneagent.state import STATE, ServerState
from phoneagent.twilio.routes.twilio_line import AiohttpTwilioLine
from phoneagent.twilio.routes.webhooks import invalid_signature, persona_for_call, twilio_signed
from phoneagent.twilio.wire.stream import Start
from phoneagent.twilio.wire.twiml import (
    CALLED_PARAMETER,
    CALLER_PARAMETER,
    PERSONA_PARAMETER,
    RESUME_PARAMETER,
    TOKEN_PARAMETER,
)

log = get_logger(__name__)

# Twilio's frames are a few hundred bytes; anything far larger is not Twilio.
MAX_STREAM_MESSAGE_BYTES = 64 * 1024


async def media_stream(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    # The upgrade is signed over the wss:// URL exactly as our TwiML wrote it, with no params.
    if not twilio_signed(request, {}, base_url=state.settings.public_ws_url):
        return invalid_signature()

    ws = web.WebSocketResponse(max_msg_size=MAX_STREAM_MESSAGE_BYTES)
    await ws.prepare(request)
    line = AiohttpTwilioLine(ws)
    try:
        try:
            slot = request.get(SLOT)
            call, model = await open_call(
                state, line, authenticated=slot.release if slot else lambda: None
            )
        except (StreamRefused, TimeoutError) as exc:
            log.warning("stream_refused", reason=str(exc) or "no `start` in time")
            state.metrics.streams_refused.inc()
            await ws.close()
            return ws
        except Exception:  # a bug must not leave the caller in silence: the action apologises
            log.exception("stream_open_failed")
            await ws.close()
            return ws
        await run_call(state, line, call, model)
    finally:
        unbind_call_context()  # bound in `open_call`; the access log line is not the call's
    return ws


async def open_call(
    state: ServerState, line: TwilioLine, authenticated: Callable[[], None]
) -> tuple[Call, ModelSession]:
    """Read `start`, check its token and claim the stream, then open the call with its model
    session. ``authenticated`` is called once the checks pass (client_limits.py counts the
    stream as unauthenticated until then)."""
    start = await read_start(line)
    persona_id = start.custom_parameters.get(PERSONA_PARAMETER, "")
    token = start.custom_parameters.get(TOKEN_PARAMETER, "")
    bind_call_context(start.call_sid, start.stream_sid, persona_id)
    problem = state.stream_token.check(token, start.call_sid, persona_id)
    if problem:
        raise StreamRefused(problem)
    # One stream per call, and a token opens one stream once (a returning transfer gets a new
    # one), even for concurrent streams with two different valid tokens for the call (a
    # replayed webhook answered by another instance, a transfer's resume token). The CallSid is
    # reserved with no await between its check and the reservation, before the token's claim
    # awaits (the shared claim is a database round trip): a second stream for the call arriving
    # meanwhile finds it reserved and is refused, and a refused claim frees it again. The
    # claim itself is atomic across instances (ReplayGuard.claim_stream). The CallSid stays
    # reserved while the model session is claimed (up to the set-up budget), until run_call
    # registers the call or opening fails.
    if start.call_sid in state.active_calls or start.call_sid in state.opening_calls:
        raise StreamRefused("a stream for this call is already open")
    state.opening_calls.add(start.call_sid)
    try:
        if not await state.replay.claim_stream(token, state.stream_token.expiry(token)):
            raise StreamRefused("this stream token was already used")
        try:
            return await _open_checked_call(state, start, persona_id, authenticated)
        except Exception:
            # The token is this stream's now: Twilio's completed callback of a call we placed
            # leaves its report to the stream, which never runs.
            await report_refused_stream(state, start.call_sid, token)
            raise
    except BaseException:
        state.opening_calls.discard(start.call_sid)
        raise


async def _open_checked_call(
    state: ServerState, start: Start, persona_id: str, authenticated: Callable[[], None]
) -> tuple[Call, ModelSession]:
    authenticated()
    persona = state.persona(persona_id)
    if persona is None:
        raise StreamRefused(f"persona {persona_id!r} is no longer configured")
    try:
        return await open_model_call(
            state,
            start,
            persona,
            caller=start.custom_parameters.get(CALLER_PARAMETER, ""),
            called=start.custom_parameters.get(CALLED_PARAMETER, ""),
            resume=start.custom_parameters.get(RESUME_PARAMETER, ""),
        )
    except ModelUnavailable:
        # Closing the stream makes Twilio ask `<Connect action>`, which answers the apology.
        raise StreamRefused("the model is unavailable: the caller hears the apology") from None


def opening_greeting(persona: Persona, context: CallContext | None) -> str:
    """The first words of a call (``persona`` filled with the call's values): a call the
    persona placed opens with its outbound greeting ("" : the persona's own)."""
    if context is not None and context.direction == OUTBOUND and persona.outbound is not None:
        return persona.outbound.greeting
    return ""


async def open_model_call(
    state: ServerState,
    start: Start,
    persona: Persona,
    *,
    caller: str,
    called: str,
    resume: str = "",
) -> tuple[Call, ModelSession]:
    """The call's model session (the pre-warmed one, else one opened now, within the set-up
    budget) and its ``Call``, its start recorded. Whoever placed the call has checked it: the
    media stream (Twilio's token) or the console (talk to this persona). ``resume``: the call
    comes back from a transfer nobody answered. Raises ModelUnavailable (logged, counted)."""
    # The call's context and, back from a transfer nobody answered, the conversation so far:
    # recorded by whichever instance answered the webhook or ran the call.
    before = await state.calls.fetch(start.call_sid)
    context = CallContext.of_record(before)
    if context is None and start.call_sid not in state.console_calls:
        log.warning("call_context_unknown", reason="no context in the call's record: defaults")
    known_here = state.calls.get(start.call_sid)
    if context is not None and (known_here is None or not known_here.direction):
        # Answered on another instance: this one's view of the call (its events) gets it too.
        state.calls.note(start.call_sid, context.answered(persona.id, caller, called))
    persona = persona_for_call(persona, before)
    try:
        model = await state.prewarmer.claim(start.call_sid, session_config(persona))
    except ModelUnavailable as exc:
        log.error("model_unavailable", reason=str(exc), status=exc.status)
        state.metrics.model_failures.labels(str(exc.status or "none")).inc()
        raise
    started = StreamStarted(
        at=time.time(),
        persona=persona.id,
        model_session=model.session_id,
        caller=caller,
        called=called,
    )
    if resume:  # a transfer nobody answered: this part of the call is not that transfer
        state.calls.note(start.call_sid, TransferNotAnswered(resume.partition(":")[2]))
    state.calls.note(start.call_sid, started)
    call = Call(
        persona,
        start.stream_sid,
        start.call_sid,
        clock=state.clock,
        model_input_rate=model.dialect.input_rate,
        model_output_rate=model.dialect.output_rate,
        greeting=opening_greeting(persona, context),
    )
    if resume:  # the agent picks the call up again
        target, _, outcome = resume.partition(":")
        call.history = tuple(before.transcript) if before is not None else ()
        call.opening = prompts.transfer_not_answered(target, outcome)
    return call, model


async def run_call(
    state: ServerState,
    line: TwilioLine,
    call: Call,
    model: ModelSession,
    *,
    handoffs: Handoffs | None = None,
    turn_listeners: Sequence[TurnListener] = (),
) -> None:
    """Run the call opened by ``open_call`` (or the console) to its end, and record it.
    ``handoffs``: who performs transfers and hang-ups (default: Twilio's REST API);
    ``turn_listeners``: called with each final turn, besides the server's own."""
    config = session_config(call.persona)
    listeners = [*state.turn_listeners, *turn_listeners] if turn_listeners else state.turn_listeners
    try:
        shell = CallShell(
            line,
            model,
            call,
            turn_listeners=listeners,
            handoffs=handoffs or state.handoffs,
            business_tools=state.business_tools,
            metrics=state.metrics,
            open_model=lambda: state.prewarmer.open(config),
        )
        state.active_calls[call.call_sid] = shell
    finally:
        state.opening_calls.discard(call.call_sid)  # reserved by open_call until now
    log.info("call_started", model=model.model, model_session=model.session_id)
    publishes = state.publishes(call.call_sid)  # not a console call's events
    if state.publisher is not None and publishes:
        state.spawn(state.publisher.call_started(call.persona, state.calls.open(call.call_sid)))
    try:
        await shell.run()
    finally:
        state.active_calls.pop(call.call_sid, None)
        ended = StreamEnded(
            at=time.time(),
            end_reason=call.end_reason.value if call.end_reason else "error",
            # The whole call's: a stream taking a call back from a transfer continues it.
            transcript=[*call.history, *call.transcript],
            stats=call.stats.as_dict(),
        )
        record = state.calls.note(call.call_sid, ended)
        state.metrics.record_call_end(ended.end_reason, ended.stats)
        # Transcripts go to the business's webhook, not to the logs.
        log.info(
            "call_ended",
            end_reason=record.end_reason,
            duration_s=round(record.ended_at - (record.started_at or record.ended_at), 1),
            turns=len(record.transcript),
            barge_ins=call.stats.barge_ins,
        )
        if state.publisher is not None and publishes:
            # As the stream left it: the Dial action or the call's next stream may change the
            # record before the event is built.
            state.spawn(state.publisher.call_ended(call.persona, copy.deepcopy(record)))
