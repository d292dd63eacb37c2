"""A webhook receiver on loopback: records every request and answers a scripted status sequence.

It stands in for the business's transcript endpoint in delivery tests: answer ``[503, 503, 200]``
to exercise retries, add ``Retry-After``, stop it to play a receiver that is down, and start it
again on the same port::

    async with WebhookSink([503, 200], retry_after=1) as sink:
        deliver_to(sink.url("/hooks/calls"))
        (first, second) = await sink.wait_for(2, timeout=30)
        assert second.json["type"] == "call.ended"

This module also holds :class:`LoopbackServer`, the start/stop/restart plumbing shared with the
fake Twilio REST API.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import web

__all__ = ["LoopbackServer", "ReceivedWebhook", "WebhookSink"]


class LoopbackServer:
    """An aiohttp application served on loopback, which can be stopped and started again.

    ``port=0`` picks a free port on the first start; later starts reuse it, so a client that
    keeps the URL sees the server go down and come back up.
    """

    #: In-flight requests get this long to finish when the server stops (then are cancelled):
    #: a stopped fake must look down at once, not linger for aiohttp's default minute.
    shutdown_timeout = 0.5

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    def build_app(self) -> web.Application:
        """The application to serve; subclasses add their routes."""
        raise NotImplementedError

    async def start(self) -> Self:
        """Start serving (again); returns self."""
        if self._runner is not None:
            return self
        runner = web.AppRunner(
            self.build_app(), access_log=None, shutdown_timeout=self.shutdown_timeout
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self._runner = runner
        return self

    async def stop(self) -> None:
        """Stop serving: new connections are refused until :meth:`start` is called again."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def base_url(self) -> str:
        """``http://host:port``, without a trailing slash."""
        return f"http://{self.host}:{self.port}"

    def url(self, path: str = "/") -> str:
        return self.base_url + path

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def wait_for_count(
    items: list[Any], count: int, changed: asyncio.Condition, timeout: float, what: str
) -> None:
    """Wait until ``items`` holds ``count`` entries (``changed`` is notified on each append)."""
    try:
        async with asyncio.timeout(timeout), changed:
            await changed.wait_for(lambda: len(items) >= count)
    except TimeoutError:
        raise TimeoutError(f"waited {timeout} s for {count} {what}; got {len(items)}") from None


@dataclass(frozen=True)
class ReceivedWebhook:
    """One request the sink received, and the status it answered."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes
    json: Any  # the parsed body, or None if it is not JSON
    at: float  # time.monotonic()
    status: int

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    @classmethod
    def of(cls, request: web.Request, body: bytes, status: int) -> ReceivedWebhook:
        """``request`` (its ``body`` read) as received now, answered with ``status``."""
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        return cls(
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=dict(request.headers),
            body=body,
            json=parsed,
            at=time.monotonic(),
            status=status,
        )


Reply = int | tuple[int, int | str | None]


class WebhookSink(LoopbackServer):
    """Records every request; answers each with the next status of ``statuses``.

    :param statuses: statuses to answer in turn, e.g. ``[503, 503, 200]``; the last one repeats.
        An item may be ``(status, retry_after)`` to set ``Retry-After`` on that answer only.
    :param retry_after: ``Retry-After`` value (seconds or HTTP date) on every non-2xx answer
        that does not set its own.
    :param delay: seconds to wait before answering (slow receiver, client timeouts).
    """

    def __init__(
        self,
        statuses: Iterable[Reply] = (200,),
        *,
        retry_after: int | str | None = None,
        delay: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.received: list[ReceivedWebhook] = []
        self.delay = delay
        self._changed = asyncio.Condition()
        self.script(statuses, retry_after=retry_after)

    def script(self, statuses: Iterable[Reply], *, retry_after: int | str | None = None) -> None:
        """Replace the answers still to come (the sequence restarts from its first item)."""
        self._replies = list(statuses) or [200]
        self._retry_after = retry_after
        self._next = 0

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.delay:
            await asyncio.sleep(self.delay)
        status, retry_after = self._take_reply()
        self.received.append(ReceivedWebhook.of(request, body, status))
        async with self._changed:
            self._changed.notify_all()
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        return web.Response(status=status, headers=headers)

    def _take_reply(self) -> tuple[int, int | str | None]:
        reply = self._replies[min(self._next, len(self._replies) - 1)]
        self._next += 1
        status, retry_after = reply if isinstance(reply, tuple) else (reply, None)
        if retry_after is None and not 200 <= status < 300:
            retry_after = self._retry_after
        return status, retry_after

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedWebhook]:
        """Wait until ``count`` requests have arrived in all; return all received so far."""
        await wait_for_count(self.received, count, self._changed, timeout, "webhook requests")
        return self.received
