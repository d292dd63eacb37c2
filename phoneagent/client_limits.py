"""Slow and unauthenticated clients on the port Twilio reaches: deadlines and a bound.

Twilio sends each webhook request at once (a few kilobytes) and gives up on our answer after
15 s, so a request that trickles in is not Twilio. Three limits keep such sockets cheap and short:

- **The request head** must arrive within ``header_seconds`` of the connection opening (or of
  our previous answer on it). That is aiohttp's own ``keepalive_timeout``: since 3.14 its timer
  starts when the connection opens, is not reset by incoming bytes, and closes the connection
  if no complete request head has arrived when it fires. It also closes idle keep-alive
  connections that soon; clients and proxies simply open a new one (gunicorn and uvicorn keep
  idle connections 2-5 s). aiohttp's parser bounds the head's size (8190-byte lines and fields,
  128 headers).
- **The body** must arrive within ``body_seconds`` of the head, else 408 (``read_body_in_time``).
  aiohttp has no body deadline, hence this middleware.
- **At most ``max_unauthenticated`` Twilio requests at once** may be waiting on their client
  before their signature is checked: a webhook whose body is still arriving after
  ``FAST_BODY_SECONDS``, a media stream until its `start` and token check out (bridge.py gives
  `start` 10 s). A webhook sent at once, as Twilio sends it, never waits on a slot. Past the
  bound a request gets 503 at once (Twilio then uses the number's fallback URL), logged and
  counted. A bound rather than a queue: a queue would hold the sockets it is meant to shed.

Health, readiness and call records are outside the bound: probes must answer under load.

Behind a reverse proxy the client is the address the proxy saw (``real_client``, from
``PHONEAGENT_TRUSTED_PROXIES``: see ``client_address.py``), for every bound and log after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from phoneagent.client_address import Network, forwarded_client
from phoneagent.logs import get_logger

log = get_logger(__name__)

TWILIO_PREFIX = "/twilio/"
# Routes outside /twilio/ that read a body from a client not yet authenticated (the console's
# sign-in): their bodies get the same deadline and bound as Twilio's webhooks.
UNAUTHENTICATED_FORMS = frozenset({"/console/login"})
# After an early answer (408, 413), how long aiohttp keeps reading what the client still sends
# so the answer reaches it; aiohttp's default of 10 s would hold a stalled client that long.
LINGER_SECONDS = 1.0
# Twilio sends a request's head and body at once: a body still arriving this long after its
# head is a slow client, and only then does it count against the bound.
FAST_BODY_SECONDS = 0.5
LOG_EVERY_SECONDS = 10.0  # a flood of refusals makes one warning per period, with a count


#: Set on a request whose client is not its connection's address (for the access log, which
#: aiohttp writes from the request it received, not the one the handlers were given).
CLIENT = "phoneagent.client"


def real_client(trusted: Sequence[Network]) -> Middleware:
    """The middleware that hands every handler its request with ``remote`` = its client."""

    @web.middleware
    async def with_client_address(request: web.Request, handler: Handler) -> web.StreamResponse:
        client = forwarded_client(
            request.remote, request.headers.getall("X-Forwarded-For", ()), trusted
        )
        if client != request.remote:
            request[CLIENT] = client
            request = request.clone(remote=client)
        return await handler(request)

    return with_client_address


def handler_options(header_seconds: float) -> dict[str, Any]:
    """aiohttp request-handler arguments for every listener (``AppRunner``, ``run_app``)."""
    return {"keepalive_timeout": header_seconds, "lingering_time": LINGER_SECONDS}


class Slot:
    """One request counted by the gate until its client is authenticated (or it ends)."""

    def __init__(self, gate: UnauthenticatedGate) -> None:
        self._gate: UnauthenticatedGate | None = gate

    def release(self) -> None:
        if self._gate is not None:
            self._gate.count -= 1
            self._gate = None


class UnauthenticatedGate:
    """Counts requests not yet authenticated; ``enter`` refuses past ``limit()``."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self.limit = limit
        self.count = 0

    def enter(self) -> Slot | None:
        if self.count >= self.limit():
            return None
        self.count += 1
        return Slot(self)


class ThrottledWarning:
    """A warning that is logged at most once per ``every`` seconds, with how many it stands for:
    refusals come in floods, and one line per refused socket would flood the log too."""

    def __init__(self, event: str, every: float = LOG_EVERY_SECONDS) -> None:
        self.event, self.every = event, every
        self.pending = 0
        self.last = -every

    def __call__(self, **fields: Any) -> None:
        self.pending += 1
        now = time.monotonic()
        if now - self.last >= self.every:
            log.warning(self.event, count=self.pending, **fields)
            self.pending, self.last = 0, now


SLOT = web.RequestKey("unauthenticated_slot", Slot)


def unauthenticated_limits(
    gate: UnauthenticatedGate,
    settings: Callable[[], Any],
    refused: Callable[[str], None],
) -> Any:
    """The middleware: the gate and the body deadline for Twilio's routes. ``settings()`` gives
    the current Settings; ``refused(reason)`` counts a refusal (a metric)."""
    too_many = ThrottledWarning("unauthenticated_limit_reached")
    too_slow = ThrottledWarning("request_body_timeout")

    def busy(request: web.Request) -> web.Response:
        refused("unauthenticated_limit")
        too_many(path=request.path, limit=gate.limit(), remote=request.remote)
        response = web.Response(
            status=503, text="too many requests in progress", headers={"Retry-After": "1"}
        )
        response.force_close()
        return response

    async def read_body(request: web.Request) -> web.Response | None:
        """Read the body (aiohttp keeps it: post() and read() reuse it); an answer if it cannot
        be. A body that arrives with its head, as Twilio sends it, needs no slot: only a client
        still sending after FAST_BODY_SECONDS counts against the bound, so slow clients filling
        the bound never turn a real webhook away."""
        reading = asyncio.ensure_future(request.read())
        slot: Slot | None = None
        try:
            await asyncio.wait({reading}, timeout=FAST_BODY_SECONDS)
            if not reading.done():
                slot = gate.enter()
                if slot is None:
                    return busy(request)
                async with asyncio.timeout(settings().body_seconds - FAST_BODY_SECONDS):
                    await asyncio.shield(reading)
            reading.result()
            return None
        except TimeoutError:
            refused("body_timeout")
            too_slow(path=request.path, seconds=settings().body_seconds, remote=request.remote)
            raise web.HTTPRequestTimeout(text="request body too slow") from None
        except ConnectionError:
            # The client went away mid-body: nothing to answer, nothing worth a traceback.
            log.debug("request_body_abandoned", path=request.path, remote=request.remote)
            return web.Response(status=400, text="incomplete body")
        finally:
            if not reading.done():
                reading.cancel()
            if slot is not None:
                slot.release()

    @web.middleware
    async def limit_unauthenticated(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(TWILIO_PREFIX):
            # The console's sign-in form is read before any session exists: without the body
            # deadline a client sending half a form held its socket and handler for ever.
            if (
                request.path in UNAUTHENTICATED_FORMS
                and request.body_exists
                and (answer := await read_body(request)) is not None
            ):
                return answer
            return await handler(request)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            # A media stream counts until its `start` and token check out (it releases the
            # slot itself then), or until it ends.
            slot = gate.enter()
            if slot is None:
                return busy(request)
            request[SLOT] = slot
            try:
                return await handler(request)
            finally:
                slot.release()
        if request.body_exists and (answer := await read_body(request)) is not None:
            return answer
        return await handler(request)  # the signature check follows without waiting again

    return limit_unauthenticated
