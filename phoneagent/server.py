"""The aiohttp application: health, readiness, and the Twilio-facing routes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from phoneagent.bridge import (
    CallShell,
    StreamRefused,
    TurnListener,
    bind_call_context,
    read_start,
    unbind_call_context,
)
from phoneagent.call import Call, session_config
from phoneagent.config import Settings
from phoneagent.delivery.outbox import Outbox, SQLiteOutbox
from phoneagent.delivery.publisher import CallEventPublisher
from phoneagent.delivery.worker import DeliveryWorker
from phoneagent.logs import get_logger
from phoneagent.metrics import CONTENT_TYPE_LATEST, Metrics
from phoneagent.personas import Persona, PersonaRegistry, TransferTarget
from phoneagent.realtime.connection import (
    ModelConnector,
    ModelSession,
    ModelUnavailable,
    Prewarmer,
)
from phoneagent.records import CallRecord, CallRecords
from phoneagent.twilio.rest import CallUpdateFailed, TwilioCalls, dial_twiml
from phoneagent.twilio.webhook import (
    CALLED_PARAMETER,
    CALLER_PARAMETER,
    PERSONA_PARAMETER,
    RESUME_PARAMETER,
    TOKEN_PARAMETER,
    StreamToken,
    apology_twiml,
    busy_twiml,
    connect_stream_twiml,
    hangup_twiml,
    redirect_twiml,
    say_then_hand_on_twiml,
    signature_is_valid,
)

log = get_logger(__name__)
T = TypeVar("T")

NO_PERSONA_APOLOGY = "Sorry, this number is not in service right now. Goodbye."
# Twilio's frames are a few hundred bytes; anything far larger is not Twilio.
MAX_STREAM_MESSAGE_BYTES = 64 * 1024
MAX_REQUEST_BYTES = 64 * 1024
FLUSH_SECONDS = 5.0  # at shutdown, time given to deliver what is due before exiting
DRAIN_POLL_SECONDS = 0.2


@dataclass
class ServerState:
    settings: Settings
    personas: PersonaRegistry
    prewarmer: Prewarmer
    draining: bool = False
    active_calls: dict[str, Call] = field(default_factory=dict)
    calls: CallRecords = field(default_factory=CallRecords)
    clock: Callable[[], float] = time.monotonic  # calls' clock: tests run calls faster
    publisher: CallEventPublisher | None = None  # None: no webhook delivery (no outbox)
    handoffs: TwilioHandoffs | None = None
    metrics: Metrics = field(init=False)
    # Work that must finish even if the request that started it is cancelled (event commits).
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    # Called with (call, turn) as each transcript turn becomes final: live transcript views.
    turn_listeners: list[TurnListener] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.turn_listeners.append(self._record_live_turn)
        self.metrics = Metrics(active_calls=lambda: len(self.active_calls))

    def _record_live_turn(self, call: Call, turn: dict) -> None:
        self.calls.open(call.call_sid).transcript.append(turn)

    @property
    def stream_token(self) -> StreamToken:
        return StreamToken(self.settings.twilio_auth_token)


STATE = web.AppKey("state", ServerState)


@dataclass
class TwilioHandoffs:
    """Hands a call on through Twilio's REST API, for the media-stream shell."""

    state: ServerState
    rest: TwilioCalls

    async def transfer(self, call: Call, target: TransferTarget) -> str | None:
        # Twilio's `stop` (which ends the stream, and cancels the shell's wait) can come before
        # its HTTP answer: the request and its bookkeeping run to the end on their own.
        return await asyncio.shield(self.state.spawn(self._transfer(call, target)))

    async def hang_up(self, call: Call) -> str | None:
        return await asyncio.shield(
            self.state.spawn(self._update(self.rest.hang_up(call.call_sid), "hang_up"))
        )

    async def _transfer(self, call: Call, target: TransferTarget) -> str | None:
        record = self.state.calls.open(call.call_sid)
        # The action may reach another instance: it must not depend on this one's records.
        query = urlencode(
            {"persona": call.persona.id, "target": target.name,
             "from": record.caller, "to": record.called}
        )  # fmt: skip
        twiml_text = dial_twiml(
            target.number,
            caller_id=target.caller_id or record.called,
            ring_seconds=target.ring_seconds,
            action_url=f"{self.state.settings.public_url}/twilio/dial-status?{query}",
        )
        record.transfer = {"target": target.name, "number": target.number}
        error = await self._update(self.rest.redirect(call.call_sid, twiml_text), "transfer")
        self.state.metrics.transfers.labels("failed" if error else "accepted").inc()
        if error is not None:
            record.transfer = None
        if self.state.publisher is not None:
            self.state.spawn(
                self.state.publisher.call_transferred(
                    call.persona,
                    record,
                    target=target.name,
                    target_number=target.number,
                    outcome="failed" if error else "accepted",
                    at=time.time(),
                    error=error,
                )
            )
        return error

    async def apologise(self, call: Call) -> None:
        called = self.state.calls.open(call.call_sid).called
        await self.apologise_for(call.call_sid, call.persona, called)

    async def apologise_for(self, call_sid: str, persona: Persona, called: str) -> None:
        """The agent cannot take the call: Twilio says the persona's apology, then hands the
        caller to its fallback target or hangs up."""
        twiml_text = say_then_hand_on_twiml(persona.apology, persona, called)
        await self._update(self.rest.redirect(call_sid, twiml_text), "apology")

    async def _update(self, request: Awaitable[None], what: str) -> str | None:
        try:
            await request
        except CallUpdateFailed as exc:
            log.error(f"twilio_{what}_failed", status=exc.status, twilio_code=exc.code,
                      error=str(exc))  # fmt: skip
            return f"Twilio error {exc.code}: {exc}" if exc.code else str(exc)
        return None


class AccessLogger(AbstractAccessLogger):
    """One structured line per request. Query strings are left out: they may carry tokens."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        get_logger("phoneagent.access").info(
            "http_request",
            method=request.method,
            path=request.path,
            status=response.status,
            duration_ms=round(time * 1000, 2),
            remote=request.remote,
        )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    personas = state.personas.current
    ready = len(personas) > 0 and not state.draining
    body = {
        "status": "ready" if ready else "not ready",
        "draining": state.draining,
        "personas": len(personas),
    }
    return web.json_response(body, status=200 if ready else 503)


def public_url_for(state: ServerState, request: web.Request) -> str:
    """The URL Twilio called, rebuilt from PUBLIC_URL: a proxy may have rewritten the rest."""
    url = state.settings.public_url + request.path
    return f"{url}?{request.query_string}" if request.query_string else url


async def signed_form(request: web.Request) -> dict[str, str] | None:
    """The webhook's form fields if Twilio's signature checks out, else None (logged)."""
    state = request.app[STATE]
    form = await request.post()
    signature = request.headers.get("X-Twilio-Signature", "")
    url = public_url_for(state, request)
    if not signature_is_valid(state.settings.twilio_auth_token, url, form, signature):
        log.warning(
            "twilio_signature_invalid",
            path=request.path,
            has_signature=bool(signature),
            call_sid=form.get("CallSid"),
        )
        return None
    return {k: str(v) for k, v in form.items()}


def twiml(text: str) -> web.Response:
    return web.Response(text=text, content_type="text/xml")


async def voice_webhook(request: web.Request) -> web.Response:
    state = request.app[STATE]
    form = await signed_form(request)
    if form is None:
        return web.Response(status=403, text="invalid Twilio signature")
    call_sid, called = form.get("CallSid", ""), form.get("To", "")
    if state.draining:
        # Shutting down: another instance, or the number's fallback URL (on a 5xx), takes it.
        log.info("call_refused_draining", call_sid=call_sid)
        if state.settings.fallback_url:
            return twiml(redirect_twiml(state.settings.fallback_url))
        return web.Response(status=503, text="draining")
    persona = state.personas.current.for_number(called)
    if persona is None:
        log.warning("no_persona_for_number", call_sid=call_sid, to=called)
        return twiml(apology_twiml(NO_PERSONA_APOLOGY))
    if len(state.active_calls) + state.prewarmer.waiting >= state.settings.max_calls:
        log.warning("call_refused_busy", call_sid=call_sid, max_calls=state.settings.max_calls)
        state.metrics.calls.labels("busy").inc()
        return twiml(busy_twiml(persona, called))
    record = state.calls.open(call_sid)
    record.persona, record.caller, record.called = persona.id, form.get("From", ""), called
    log.info("call_incoming", call_sid=call_sid, persona=persona.id, to=called)
    return twiml(connect_to_agent(state, persona, record))


def connect_to_agent(
    state: ServerState, persona: Persona, record: CallRecord, resume: str = ""
) -> str:
    """TwiML connecting the call to a media stream with ``persona``, and the model session
    opened now (pre-warm: the stream claims it on `start`). ``resume`` marks a call coming back
    to the agent."""
    state.prewarmer.start(record.call_sid, session_config(persona))
    parameters = {
        PERSONA_PARAMETER: persona.id,
        TOKEN_PARAMETER: state.stream_token.issue(record.call_sid, persona.id),
        # The instance taking the stream may not be the one answering this webhook.
        CALLER_PARAMETER: record.caller,
        CALLED_PARAMETER: record.called,
    }
    if resume:
        parameters[RESUME_PARAMETER] = resume
    status_url = f"{state.settings.public_url}/twilio/stream-status"
    return connect_stream_twiml(state.settings.stream_url, status_url, parameters)


async def dial_status(request: web.Request) -> web.Response:
    """`<Dial action>`: the person we transferred to answered (the call ends when they hang
    up), or did not (the caller comes back to the agent, who apologises)."""
    state = request.app[STATE]
    form = await signed_form(request)
    if form is None:
        return web.Response(status=403, text="invalid Twilio signature")
    outcome = form.get("DialCallStatus", "")
    record = state.calls.open(form.get("CallSid", ""))
    record.caller = record.caller or request.query.get("from", "")
    record.called = record.called or request.query.get("to", "")
    persona = state.personas.current.personas.get(request.query.get("persona", ""))
    target_name = request.query.get("target", "")
    log.info("transfer_outcome", call_sid=record.call_sid, target=target_name, outcome=outcome)
    if outcome in ("completed", "answered") or persona is None:
        return twiml(hangup_twiml())
    target = persona.transfer.get(target_name)
    if state.publisher is not None and target is not None:
        state.spawn(
            state.publisher.call_transferred(
                persona,
                record,
                target=target.name,
                target_number=target.number,
                outcome="failed",
                at=time.time(),
                error=outcome,
            )
        )
    return twiml(connect_to_agent(state, persona, record, resume=f"{target_name}:{outcome}"))


async def media_stream(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    # The upgrade is signed over the wss:// URL exactly as our TwiML wrote it, with no params.
    signature = request.headers.get("X-Twilio-Signature", "")
    if not signature_is_valid(state.settings.twilio_auth_token, state.settings.stream_url, {},
                              signature):  # fmt: skip
        log.warning("twilio_signature_invalid", path=request.path, has_signature=bool(signature))
        return web.Response(status=403, text="invalid Twilio signature")

    ws = web.WebSocketResponse(max_msg_size=MAX_STREAM_MESSAGE_BYTES)
    await ws.prepare(request)
    try:
        try:
            call, model = await open_call(state, ws)
        except (StreamRefused, TimeoutError) as exc:
            log.warning("stream_refused", reason=str(exc) or "no `start` in time")
            await ws.close()
            return ws
        await run_call(state, ws, call, model)
    finally:
        unbind_call_context()  # bound in `open_call`; the access log line is not the call's
    return ws


async def open_call(state: ServerState, ws: web.WebSocketResponse) -> tuple[Call, ModelSession]:
    start = await read_start(ws)
    persona_id = start.custom_parameters.get(PERSONA_PARAMETER, "")
    token = start.custom_parameters.get(TOKEN_PARAMETER, "")
    bind_call_context(start.call_sid, start.stream_sid, persona_id)
    problem = state.stream_token.check(token, start.call_sid, persona_id)
    if problem:
        raise StreamRefused(problem)
    persona = state.personas.current.personas.get(persona_id)
    if persona is None:
        raise StreamRefused(f"persona {persona_id!r} is no longer configured")
    try:
        model = await state.prewarmer.claim(start.call_sid, session_config(persona))
    except ModelUnavailable as exc:
        log.error("model_unavailable", reason=str(exc), status=exc.status)
        state.metrics.model_failures.labels(str(exc.status or "none")).inc()
        called = start.custom_parameters.get(CALLED_PARAMETER, "")
        if state.handoffs is not None:
            state.spawn(state.handoffs.apologise_for(start.call_sid, persona, called))
        raise StreamRefused("the model is unavailable: the caller hears the apology") from None
    record = state.calls.mark_started(start.call_sid)
    record.persona, record.model_session = persona.id, model.session_id
    record.caller = start.custom_parameters.get(CALLER_PARAMETER, record.caller)
    record.called = start.custom_parameters.get(CALLED_PARAMETER, record.called)
    call = Call(persona, start.stream_sid, start.call_sid, clock=state.clock)
    resume = start.custom_parameters.get(RESUME_PARAMETER, "")
    if resume:  # back from a transfer nobody answered: the agent picks the call up again
        target, _, outcome = resume.partition(":")
        call.history = tuple(record.transcript)
        call.opening = (
            f"You tried to transfer the caller to {target.replace('_', ' ')}, but the call was "
            f"not answered ({outcome}). Apologise briefly, and offer to take a message or to "
            "help another way."
        )
    return call, model


async def run_call(
    state: ServerState, ws: web.WebSocketResponse, call: Call, model: ModelSession
) -> None:
    state.active_calls[call.call_sid] = call
    log.info("call_started", model=model.model, model_session=model.session_id)
    if state.publisher is not None:
        state.spawn(state.publisher.call_started(call.persona, state.calls.open(call.call_sid)))
    try:
        config = session_config(call.persona)
        await CallShell(
            ws,
            model,
            call,
            turn_listeners=state.turn_listeners,
            handoffs=state.handoffs,
            metrics=state.metrics,
            open_model=lambda: state.prewarmer.connector.open(config),
        ).run()
    finally:
        state.active_calls.pop(call.call_sid, None)
        record = state.calls.open(call.call_sid)
        record.ended_at = time.time()
        record.end_reason = call.end_reason.value if call.end_reason else "error"
        record.transcript = call.transcript
        record.stats = call.stats.as_dict()
        state.metrics.record_call_end(record.end_reason, record.stats)
        if record.status == "in-progress":  # Twilio's call-status callback may say more
            record.status = "completed"
        # Transcripts go to the business's webhook, not to the logs.
        log.info(
            "call_ended",
            end_reason=record.end_reason,
            duration_s=round(record.ended_at - (record.started_at or record.ended_at), 1),
            turns=len(record.transcript),
            barge_ins=call.stats.barge_ins,
        )
        if state.publisher is not None:
            state.spawn(state.publisher.call_ended(call.persona, record))


async def status_callback(request: web.Request) -> web.Response:
    state = request.app[STATE]
    form = await signed_form(request)
    if form is None:
        return web.Response(status=403, text="invalid Twilio signature")
    fields = ("CallStatus", "CallDuration", "StreamSid", "StreamEvent", "StreamError", "Timestamp")
    event = {f: form[f] for f in fields if f in form}
    log.info("twilio_status", path=request.path, call_sid=form.get("CallSid"), **event)
    record = state.calls.open(form.get("CallSid", ""))
    record.twilio_events.append(event | {"path": request.path})
    if "CallStatus" in form:
        record.status = form["CallStatus"]
    return web.Response(status=204)


def has_account_credentials(state: ServerState, request: web.Request) -> bool:
    """HTTP Basic with the Twilio account SID and auth token: whoever holds them runs the line."""
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    try:
        given = base64.b64decode(encoded, validate=True) if scheme.lower() == "basic" else b""
    except ValueError:
        return False
    expected = f"{state.settings.twilio_account_sid}:{state.settings.twilio_auth_token}"
    return hmac.compare_digest(given, expected.encode())


async def call_details(request: web.Request) -> web.Response:
    """A call's transcript so far (in progress) or in full (recently ended)."""
    state = request.app[STATE]
    if not has_account_credentials(state, request):
        return web.json_response(
            {"error": "use HTTP Basic with the account SID and auth token"},
            status=401,
            headers={"WWW-Authenticate": 'Basic realm="phoneagent"'},
        )
    call_sid = request.match_info["call_sid"]
    record = state.calls.get(call_sid)
    if record is None:
        return web.json_response({"error": f"no call {call_sid}"}, status=404)
    return web.json_response(record.as_dict())


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(
    settings: Settings,
    personas: PersonaRegistry,
    *,
    reload_interval: float = 1.0,
    connector: ModelConnector | None = None,
    outbox: Outbox | None = None,
    handle_sigterm: bool = False,
) -> web.Application:
    """The application. With an ``outbox``, call events go to the personas' webhooks (the app
    runs the delivery worker and closes the outbox when it stops). ``handle_sigterm``: drain
    on SIGTERM (`phoneagent serve`), see ``drain_then_exit``."""
    connector = connector or ModelConnector(
        url=settings.stepfun_realtime_url,
        api_key=settings.stepfun_api_key,
        model=settings.stepfun_model,
    )
    # Twilio's webhooks are a few kilobytes of form fields; anything much larger is not Twilio.
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    state = ServerState(settings=settings, personas=personas, prewarmer=Prewarmer(connector))
    rest = TwilioCalls(
        settings.twilio_account_sid, settings.twilio_auth_token, settings.twilio_api_base_url
    )
    state.handoffs = TwilioHandoffs(state, rest)
    app[STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/twilio/voice", voice_webhook)
    app.router.add_get("/twilio/stream", media_stream)
    app.router.add_post("/twilio/stream-status", status_callback)
    app.router.add_post("/twilio/call-status", status_callback)
    app.router.add_post("/twilio/dial-status", dial_status)
    app.router.add_get("/calls/{call_sid}", call_details)
    app.router.add_get("/metrics", metrics)

    async def watch_personas(app: web.Application):
        task = asyncio.create_task(personas.watch(reload_interval))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await state.prewarmer.close()
        await rest.close()

    async def deliver_webhooks(app: web.Application):
        assert outbox is not None
        deliveries = state.metrics.webhook_deliveries
        worker = DeliveryWorker(outbox, on_outcome=lambda outcome: deliveries.labels(outcome).inc())
        state.publisher = CallEventPublisher(worker)
        task = asyncio.create_task(worker.run())
        yield
        await asyncio.gather(*state.background)  # events of calls that just ended, committed
        await worker.flush(FLUSH_SECONDS)
        await worker.stop()
        await task
        await outbox.close()

    async def start_draining(app: web.Application) -> None:
        state.draining = True

    async def drain_on_sigterm(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: state.spawn(drain_then_exit(state)))

    if handle_sigterm:
        app.on_startup.append(drain_on_sigterm)
    app.cleanup_ctx.append(watch_personas)
    if outbox is not None:
        app.cleanup_ctx.append(deliver_webhooks)
    app.on_shutdown.append(start_draining)
    return app


async def build_app(
    settings: Settings, personas: PersonaRegistry, **options: Any
) -> web.Application:
    """The application with its outbox opened from ``PHONEAGENT_DATA_DIR``; an unusable outbox
    file raises OutboxError here, before the server accepts a call."""
    outbox = await SQLiteOutbox.in_data_dir(settings.data_dir)
    return create_app(settings, personas, outbox=outbox, **options)


async def drain_then_exit(state: ServerState) -> None:
    """SIGTERM: stop taking calls (readiness turns 503, new calls are refused), let the calls in
    progress finish for up to PHONEAGENT_DRAIN_SECONDS, then shut down as on Ctrl-C: aiohttp
    closes what is left and the outbox gets its last flush."""
    if state.draining:
        return
    state.draining = True
    limit = state.settings.drain_seconds
    log.info("draining", active_calls=len(state.active_calls), drain_seconds=limit)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while state.active_calls and loop.time() < deadline:
        await asyncio.sleep(DRAIN_POLL_SECONDS)
    if state.active_calls:
        log.warning("drain_time_up", active_calls=len(state.active_calls))
    log.info("drained")
    os.kill(os.getpid(), signal.SIGINT)


def run(settings: Settings, personas: PersonaRegistry, host: str, port: int) -> None:
    log.info(
        "server_starting",
        host=host,
        port=port,
        public_url=settings.public_url,
        personas=sorted(personas.current.personas),
        model=settings.stepfun_model,
    )
    web.run_app(
        build_app(settings, personas, handle_sigterm=True),
        host=host,
        port=port,
        access_log_class=AccessLogger,
        print=None,
    )
