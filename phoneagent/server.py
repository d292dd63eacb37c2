"""The aiohttp application: its routes, health, readiness and call details, the metrics
listener, and startup and shutdown (persona reloads, the delivery worker, draining on SIGTERM).

The Twilio-facing routes are in ``twilio/routes/``; what the instance holds while it runs is
``state.ServerState``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import os
import signal
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from phoneagent.api.key_store import api_key_store
from phoneagent.api.routes import OUTBOUND, mount_api
from phoneagent.business_tools import BusinessToolClient
from phoneagent.client_limits import CLIENT, handler_options, real_client, unauthenticated_limits
from phoneagent.config import Settings
from phoneagent.console.pages import mount_console
from phoneagent.console.revocation_store import revocation_store
from phoneagent.delivery.outbox import Outbox
from phoneagent.delivery.publisher import CallEventPublisher
from phoneagent.delivery.stores import (
    call_records,
    instance_liveness,
    open_outbox,
    replay_guard,
)
from phoneagent.delivery.worker import DeliveryWorker
from phoneagent.logs import get_logger
from phoneagent.metrics import CONTENT_TYPE_LATEST
from phoneagent.outbound.dialer import ApiDialer, Dialer
from phoneagent.outbound.routes import DIALER
from phoneagent.outbound.routes import add_routes as add_outbound_routes
from phoneagent.personas import PersonaRegistry
from phoneagent.realtime.connection import ModelConnector, Prewarmer
from phoneagent.records import CallRecords
from phoneagent.records.store import CallRecordStore
from phoneagent.state import STATE, ServerState
from phoneagent.twilio.rest.calls import TwilioCalls
from phoneagent.twilio.rest.handoffs import TwilioHandoffs
from phoneagent.twilio.routes.media_stream import media_stream
from phoneagent.twilio.routes.webhooks import (
    dial_status,
    status_callback,
    stream_ended,
    voice_webhook,
)
from phoneagent.twilio.wire.replay import ReplayGuard

log = get_logger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
FLUSH_SECONDS = 5.0  # at shutdown, time given to deliver what is due before exiting
DRAIN_POLL_SECONDS = 0.2
# The end of a drain: calls still going get this long to say goodbye (a goodbye is a few
# seconds; a mute model gets Call's handoff deadline), and once cut, this long to close.
DRAIN_GOODBYE_SECONDS = 15.0
DRAIN_CLOSE_SECONDS = 3.0
# Once the calls are over, aiohttp waits at most this long for what is left (it would wait a
# minute by default, past Kubernetes' grace period).
SHUTDOWN_SECONDS = 5.0


class AccessLogger(AbstractAccessLogger):
    """One structured line per request. Query strings are left out: they may carry tokens."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        get_logger("phoneagent.access").info(
            "http_request",
            method=request.method,
            path=request.path,
            status=response.status,
            duration_ms=round(time * 1000, 2),
            remote=request.get(CLIENT) or request.remote,  # behind a proxy: the client
        )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    personas = state.personas.current
    problems = state.readiness_problems()
    ready = len(personas) > 0 and not state.draining and not problems
    body: dict[str, Any] = {
        "status": "ready" if ready else "not ready",
        "draining": state.draining,
        "personas": len(personas),
    }
    if problems:  # what the operator must fix (the outbox), in words
        body["problems"] = problems
    return web.json_response(body, status=200 if ready else 503)


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
    record = await state.calls.fetch(call_sid)  # any instance's, with a shared database
    if record is None:
        return web.json_response({"error": f"no call {call_sid}"}, status=404)
    # UTF-8 as it is: a Chinese transcript reads as Chinese, not as \u escapes.
    return web.json_response(record.as_dict(), dumps=_json_as_written)


def _json_as_written(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def has_bearer_token(request: web.Request, token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # Bytes: compare_digest refuses non-ASCII str, and a client may send anything.
    # surrogateescape: aiohttp hands undecodable header bytes over as surrogates.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.encode()
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus' scrape, on the metrics listener only; with PHONEAGENT_METRICS_TOKEN set, only
    for a request bearing it."""
    state = request.app[STATE]
    token = state.settings.metrics_token
    if token and not has_bearer_token(request, token):
        has_token = request.headers.get("Authorization", "").lower().startswith("bearer ")
        log.warning("metrics_unauthorized", remote=request.remote, had_token=has_token)
        return web.json_response(
            {"error": "use a bearer token: PHONEAGENT_METRICS_TOKEN"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="phoneagent-metrics"'},
        )
    body = state.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_metrics_app(state: ServerState) -> web.Application:
    """``GET /metrics`` alone: served on its own listener, never on the port Twilio reaches."""
    app = web.Application(client_max_size=1024)  # a scrape is a GET
    app[STATE] = state
    app.router.add_get("/metrics", metrics)
    return app


def create_app(
    settings: Settings,
    personas: PersonaRegistry,
    *,
    reload_interval: float = 1.0,
    connector: ModelConnector | None = None,
    outbox: Outbox | None = None,
    replay: ReplayGuard | None = None,
    shared_records: CallRecordStore | None = None,
    handle_sigterm: bool = False,
    metrics_listener: tuple[str, int] | None = None,
) -> web.Application:
    """The application. With an ``outbox``, call events go to the personas' webhooks (the app
    runs the delivery worker and closes the outbox when it stops). ``handle_sigterm``: drain
    on SIGTERM (`phoneagent serve`), see ``drain_then_exit``. ``replay``: where stream claims
    and answered webhooks are kept (default: this instance's memory); ``shared_records``: where
    call records are shared (default: nowhere, each instance its own). ``metrics_listener``: (host,
    port) where the app serves ``/metrics`` while it runs (port 0: any free port, see
    ``state.metrics_address``); the app itself never serves it. The keys of ``/api/v1`` are in
    the outbox's database when it is PostgreSQL, else in ``PHONEAGENT_DATA_DIR``."""
    connector = connector or ModelConnector(
        url=settings.stepfun_realtime_url,
        api_key=settings.stepfun_api_key,
        model=settings.stepfun_model,
    )
    state = ServerState(settings=settings, personas=personas, prewarmer=Prewarmer(connector))
    if replay is not None:
        state.replay = replay
    if shared_records is not None:
        state.calls = CallRecords(
            shared_records, on_unshared=lambda: state.metrics.call_records_unshared.inc()
        )
        state.metrics.call_records_pending.set_function(lambda: state.calls.pending)
    limits = unauthenticated_limits(
        state.unauthenticated,
        settings=lambda: state.settings,
        refused=lambda reason: state.metrics.http_refused.labels(reason).inc(),
    )
    # Twilio's webhooks are a few kilobytes of form fields; anything much larger is not Twilio.
    # The client's address first: every bound and log after it sees the client behind a proxy.
    middlewares = [real_client(settings.trusted_proxies)] if settings.trusted_proxies else []
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[*middlewares, limits])
    rest = TwilioCalls(
        settings.twilio_account_sid, settings.twilio_auth_token, settings.twilio_api_base_url
    )
    state.handoffs = TwilioHandoffs(
        rest,
        state.calls,
        spawn=state.spawn,
        publish_transfer=state.publish_transfer,
        count_transfer=lambda outcome: state.metrics.transfers.labels(outcome).inc(),
        public_url=lambda: state.settings.public_url,
    )
    tool_client = state.business_tools = BusinessToolClient(os.environ)
    app[STATE] = state
    app[DIALER] = dialer = Dialer(
        persona=state.persona,
        calls=state.calls,
        rest=rest,
        public_url=lambda: state.settings.public_url,
        count=lambda outcome: state.metrics.outbound_calls.labels(outcome).inc(),
        our_lines=lambda: state.personas.current.by_number,
    )
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/twilio/voice", voice_webhook)
    app.router.add_get("/twilio/stream", media_stream)
    app.router.add_post("/twilio/stream-status", status_callback)
    app.router.add_post("/twilio/call-status", status_callback)
    app.router.add_post("/twilio/dial-status", dial_status)
    app.router.add_post("/twilio/stream-ended", stream_ended)
    app.router.add_get("/calls/{call_sid}", call_details)
    add_outbound_routes(app)  # the answer and status callbacks of calls the personas place
    # /console, when PHONEAGENT_CONSOLE_PASSWORD is set; signed-out sessions where API keys are
    mount_console(app, state, revocation_store(outbox, settings.data_dir))
    mount_api(app, api_key_store(outbox, settings.data_dir))  # /api/v1
    app[OUTBOUND].dialer = ApiDialer(dialer)  # POST /api/v1/calls places calls with it

    async def watch_personas(app: web.Application):
        task = asyncio.create_task(personas.watch(reload_interval))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await state.prewarmer.close()
        await rest.close()
        await tool_client.close()
        await state.lookups.close()

    async def deliver_webhooks(app: web.Application):
        assert outbox is not None
        m = state.metrics
        worker = DeliveryWorker(
            outbox,
            on_outcome=lambda outcome: m.webhook_deliveries.labels(outcome).inc(),
            on_outbox_error=m.outbox_errors.inc,
        )
        publisher = state.publisher = CallEventPublisher(
            worker,
            on_write_failure=m.outbox_write_failures.inc,
            on_lost=lambda reason: m.events_lost.labels(reason).inc(),
        )
        m.events_spooled.set_function(lambda: publisher.spool.held)
        m.outbox_ok.set_function(lambda: 0 if publisher.problems() else 1)
        liveness = instance_liveness(publisher, on_adopted=m.lost_calls_closed.inc)
        if liveness is None:
            # Before the first call: a run killed mid-call left calls open; end each for its
            # business.
            m.lost_calls_closed.inc(await publisher.close_lost_calls(now=time.time()))
        else:
            # A shared database: this run is alive before its first call, and any instance's
            # lost calls are adopted as their runs go silent (this one's previous run's too).
            await liveness.start()
            m.heartbeat_age.set_function(liveness.heartbeat_age)
        task = asyncio.create_task(worker.run())
        yield
        await asyncio.gather(*state.background)  # events of calls that just ended, committed
        await publisher.spool.close()  # one last try for events held in memory; the rest is logged
        await state.calls.close(FLUSH_SECONDS)  # call records on their way to the shared store
        await worker.flush(FLUSH_SECONDS)
        await worker.stop()
        await task
        if liveness is not None:  # last: the calls it held are over, their events committed
            await liveness.stop()
        await outbox.close()

    async def start_draining(app: web.Application) -> None:
        state.draining = True

    async def drain_on_sigterm(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: state.spawn(drain_then_exit(state)))

    async def serve_metrics(app: web.Application):
        assert metrics_listener is not None
        host, port = metrics_listener
        runner = web.AppRunner(
            create_metrics_app(state),
            access_log_class=AccessLogger,
            **handler_options(settings.header_seconds),
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                exc.errno, f"cannot listen for metrics on {host}:{port}: {exc.strerror}"
            ) from None
        state.metrics_address = (host, runner.addresses[0][1])
        log.info("metrics_listening", host=host, port=state.metrics_address[1],
                 token_required=bool(settings.metrics_token))  # fmt: skip
        yield
        await runner.cleanup()

    if handle_sigterm:
        app.on_startup.append(drain_on_sigterm)
    if metrics_listener is not None:
        # First in, last out: metrics stay up through a drain and while the rest shuts down.
        app.cleanup_ctx.append(serve_metrics)
    app.cleanup_ctx.append(watch_personas)
    if outbox is not None:
        app.cleanup_ctx.append(deliver_webhooks)
    app.on_shutdown.append(start_draining)
    return app


async def build_app(
    settings: Settings, personas: PersonaRegistry, **options: Any
) -> web.Application:
    """The application with its outbox opened: the PostgreSQL database of
    ``PHONEAGENT_DATABASE_URL`` when set, else the file in ``PHONEAGENT_DATA_DIR``. An unusable
    outbox (a damaged file, a database that is down) raises OutboxError here, before the server
    accepts a call."""
    outbox = await open_outbox(
        settings.data_dir, settings.database_url, instance_name=settings.instance_name
    )
    return create_app(
        settings,
        personas,
        outbox=outbox,
        replay=replay_guard(outbox),
        shared_records=call_records(outbox),
        **options,
    )


async def drain_then_exit(state: ServerState) -> None:
    """SIGTERM: stop taking calls (readiness turns 503, new calls are refused) and let the calls
    in progress finish, all within PHONEAGENT_DRAIN_SECONDS (Kubernetes kills the pod after its
    grace period): near the end the agents say goodbye and hang up, at the end what is left is
    cut (Twilio's `<Connect action>` then reaches another instance, which apologises). Then
    shut down as on Ctrl-C: the ended calls' events get the outbox's last flush."""
    if state.draining:
        return
    state.draining = True
    limit = state.settings.drain_seconds
    log.info("draining", active_calls=len(state.active_calls), drain_seconds=limit)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    goodbyes_at = deadline - min(DRAIN_GOODBYE_SECONDS, limit / 2)
    await _calls_ended_by(state, goodbyes_at)
    if state.active_calls:
        log.warning("drain_goodbyes", active_calls=len(state.active_calls))
        await asyncio.gather(*(shell.drain() for shell in list(state.active_calls.values())))
        await _calls_ended_by(state, deadline)
    if state.active_calls:
        log.warning("drain_time_up", active_calls=len(state.active_calls))
        await asyncio.gather(*(shell.shut_down() for shell in list(state.active_calls.values())))
        await _calls_ended_by(state, loop.time() + DRAIN_CLOSE_SECONDS)
    log.info("drained")
    os.kill(os.getpid(), signal.SIGINT)


async def _calls_ended_by(state: ServerState, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    while state.active_calls and loop.time() < deadline:
        await asyncio.sleep(DRAIN_POLL_SECONDS)


def run(settings: Settings, personas: PersonaRegistry, host: str, port: int) -> None:
    log.info(
        "server_starting",
        host=host,
        port=port,
        metrics_host=settings.metrics_host,
        metrics_port=settings.metrics_port,
        public_url=settings.public_url,
        personas=sorted(personas.current.personas),
        model=settings.stepfun_model,
    )
    metrics_listener = (settings.metrics_host, settings.metrics_port)
    web.run_app(
        build_app(settings, personas, handle_sigterm=True, metrics_listener=metrics_listener),
        host=host,
        port=port,
        access_log_class=AccessLogger,
        print=None,
        shutdown_timeout=SHUTDOWN_SECONDS,
        **handler_options(settings.header_seconds),
    )
