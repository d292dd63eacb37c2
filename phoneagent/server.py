"""The aiohttp application: health, readiness, and the Twilio-facing routes."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from phoneagent.config import Settings
from phoneagent.logs import get_logger
from phoneagent.personas import PersonaRegistry

log = get_logger(__name__)


@dataclass
class ServerState:
    settings: Settings
    personas: PersonaRegistry
    draining: bool = False


STATE = web.AppKey("state", ServerState)


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


async def not_implemented(request: web.Request) -> web.Response:
    # Reserved routes: they exist so deployments and Twilio consoles can be pointed at them now.
    return web.json_response({"error": f"{request.path} is not implemented yet"}, status=501)


def create_app(
    settings: Settings, personas: PersonaRegistry, *, reload_interval: float = 1.0
) -> web.Application:
    app = web.Application()
    app[STATE] = ServerState(settings=settings, personas=personas)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/twilio/voice", not_implemented)
    app.router.add_get("/twilio/stream", not_implemented)
    app.router.add_post("/twilio/stream-status", not_implemented)
    app.router.add_post("/twilio/call-status", not_implemented)
    app.router.add_get("/metrics", not_implemented)

    async def watch_personas(app: web.Application):
        task = asyncio.create_task(personas.watch(reload_interval))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def start_draining(app: web.Application) -> None:
        app[STATE].draining = True

    app.cleanup_ctx.append(watch_personas)
    app.on_shutdown.append(start_draining)
    return app


def run(settings: Settings, personas: PersonaRegistry, host: str, port: int) -> None:
    app = create_app(settings, personas)
    log.info(
        "server_starting",
        host=host,
        port=port,
        public_url=settings.public_url,
        personas=sorted(personas.current.personas),
        model=settings.stepfun_model,
    )
    web.run_app(app, host=host, port=port, access_log_class=AccessLogger, print=None)
