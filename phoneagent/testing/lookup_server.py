"""A business's lookup endpoint on loopback: it checks each request's signature as a receiver
would (``delivery.signing.verify``), records it, and answers as scripted (a JSON answer, an
error status, bytes that are not JSON, a slow answer)::

    async with LookupServer(secret, answer={"variables": {"name": "Dana"}}) as lookups:
        persona_file_with(lookup_url=lookups.url("/lookup"))
        ...
        [request] = lookups.received
        assert request.verified and request.json["from"] == caller.from_
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from phoneagent.delivery.signing import VerificationError, verify
from phoneagent.testing.webhook_sink import LoopbackServer

__all__ = ["LookupRequest", "LookupServer"]


@dataclass(frozen=True)
class LookupRequest:
    headers: dict[str, str]
    body: bytes
    json: Any
    verified: bool  # the Standard Webhooks signature checked out with the server's secret
    problem: str  # why not, when it did not
    at: float  # time.monotonic()


class LookupServer(LoopbackServer):
    """``answer``: the JSON value answered (or ``body``: raw bytes); ``status``: the HTTP
    status; ``headers``: more response headers (a ``Location``); ``delay``: seconds before
    answering (a slow or hung business); ``endless``: a body that never ends, sent in chunks
    without a length (a hostile or broken business)."""

    def __init__(
        self,
        secret: str,
        *,
        answer: Any = None,
        body: bytes | None = None,
        status: int = 200,
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
        endless: bool = False,
    ) -> None:
        super().__init__()
        self.headers = dict(headers or {})
        self.endless = endless
        self.secret = secret
        self.answer, self.body, self.status, self.delay = answer, body, status, delay
        self.received: list[LookupRequest] = []

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        problem = ""
        try:
            verify(body, request.headers, self.secret)
        except VerificationError as exc:
            problem = str(exc)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        at = time.monotonic()
        self.received.append(
            LookupRequest(dict(request.headers), body, parsed, not problem, problem, at)
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.endless:
            response = web.StreamResponse(status=self.status)
            response.content_type = "application/json"
            await response.prepare(request)
            chunk = b'{"variables": {"name": "' + b"a" * 16384
            while True:  # until the client gives up and the connection closes
                await response.write(chunk)
                await asyncio.sleep(0)
        if self.body is not None:
            return web.Response(status=self.status, body=self.body, headers=self.headers,
                                content_type="application/json")  # fmt: skip
        return web.json_response(self.answer or {}, status=self.status, headers=self.headers)
