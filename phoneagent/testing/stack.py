"""The whole system on loopback: phoneagent's server, and stand-ins for StepFun and Twilio.

Tests, benchmarks and ``phoneagent demo`` share it, so each of them dials the same real server
over real sockets. Example::

    async with LocalStack(personas_dir) as stack:
        async with stack.caller(to="+14155550100") as caller:
            await caller.dial()
            await caller.connect()
            ...
"""

from __future__ import annotations

import dataclasses
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from phoneagent.client_limits import handler_options
from phoneagent.config import Settings
from phoneagent.personas import PersonaRegistry
from phoneagent.realtime.connection import ModelConnector
from phoneagent.server import AccessLogger, build_app, create_app
from phoneagent.state import STATE, ServerState
from phoneagent.testing.caller import TwilioCaller
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.fake_twilio_api import FakeTwilioApi


def demo_credentials() -> tuple[str, str]:
    """A made-up Twilio account SID and auth token, good for loopback only."""
    return "AC" + secrets.token_hex(16), secrets.token_hex(16)


def scaled_clock(speed: float) -> Callable[[], float]:
    """A monotonic clock running ``speed`` times faster: the server's calls then keep time
    with a scripted caller whose call clock runs at the same speed."""
    origin = time.monotonic()
    return lambda: origin + (time.monotonic() - origin) * speed


class LocalStack:
    """Starts the server on 127.0.0.1 (an ephemeral port) with ``PUBLIC_URL`` pointing at it.

    *model*: the fake realtime server to use (started and closed with the stack); when None, a
    default ``FakeRealtimeServer`` is made, unless *settings* name a real model URL and key and
    *use_fake_model* is False. *call_speed*: run the calls' clock this many times faster than
    real time, to match callers with ``speed`` > 1 (playback positions are computed in time).
    *webhooks*: run the webhook outbox and its delivery worker (False: calls publish nothing).
    The server's Twilio REST API is always a fake one (``self.twilio_api``): a test never
    reaches Twilio, and callers made by :meth:`caller` receive `stop` when their call is
    redirected or ended through it, as Twilio does.
    """

    def __init__(
        self,
        personas_dir: Path,
        *,
        model: FakeRealtimeServer | None = None,
        settings: Settings | None = None,
        use_fake_model: bool = True,
        prewarm_ttl: float | None = None,
        call_speed: float = 1.0,
        webhooks: bool = True,
    ) -> None:
        self.personas_dir = personas_dir
        self.model = model if model is not None or not use_fake_model else FakeRealtimeServer()
        account_sid, auth_token = demo_credentials()
        # Without settings, the data (the webhook outbox) goes to a directory of its own.
        self._data_dir = None if settings else tempfile.TemporaryDirectory(prefix="phoneagent-")
        self.settings = settings or Settings(
            twilio_account_sid=account_sid,
            twilio_auth_token=auth_token,
            personas_dir=personas_dir,
            data_dir=Path(self._data_dir.name),
        )
        self.prewarm_ttl = prewarm_ttl
        self.call_speed = call_speed
        self.webhooks = webhooks
        self.twilio_api = FakeTwilioApi(
            self.settings.twilio_account_sid, self.settings.twilio_auth_token
        )
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def __aenter__(self) -> LocalStack:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def start(self) -> None:
        await self.twilio_api.start()
        self.settings = dataclasses.replace(
            self.settings, twilio_api_base_url=self.twilio_api.base_url
        )
        connector = None
        if self.model is not None:
            await self.model.start()
            connector = ModelConnector(
                url=self.model.url,
                api_key=self.model.api_key or "fake-key",
                model=self.settings.stepfun_model,
            )
        registry = PersonaRegistry(self.personas_dir)
        options: dict[str, Any] = {
            "reload_interval": 0.2,
            "connector": connector,
            "metrics_listener": ("127.0.0.1", 0),
        }
        if self.webhooks:
            app = await build_app(self.settings, registry, **options)
        else:
            app = create_app(self.settings, registry, **options)
        if self.prewarm_ttl is not None:
            app[STATE].prewarmer.ttl = self.prewarm_ttl
        if self.call_speed != 1.0:
            app[STATE].clock = scaled_clock(self.call_speed)
        self._runner = web.AppRunner(
            app, access_log_class=AccessLogger, **handler_options(self.settings.header_seconds)
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        # PUBLIC_URL is only known once the port is: the stream URL and signatures use it.
        self.settings = dataclasses.replace(self.settings, public_url=self.base_url, port=port)
        self.state.settings = self.settings

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self.model is not None:
            await self.model.close()
        await self.twilio_api.stop()
        if self._data_dir is not None:
            self._data_dir.cleanup()

    @property
    def metrics_url(self) -> str:
        """The metrics listener's ``/metrics`` (loopback, its own port)."""
        assert self.state.metrics_address is not None, "the stack is not started"
        host, port = self.state.metrics_address
        return f"http://{host}:{port}/metrics"

    @property
    def state(self) -> ServerState:
        assert self._runner is not None, "the stack is not started"
        return self._runner.app[STATE]

    def caller(self, to: str, **options: Any) -> TwilioCaller:
        """A scripted Twilio caller for this server, signing with the stack's credentials."""
        caller = TwilioCaller(
            self.base_url,
            account_sid=self.settings.twilio_account_sid,
            auth_token=self.settings.twilio_auth_token,
            to=to,
            **options,
        )
        self.twilio_api.attach(caller)
        return caller
