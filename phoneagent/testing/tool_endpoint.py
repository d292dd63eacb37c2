"""A business's tool endpoint on loopback: records every request and answers scripted replies.

It stands in for the HTTPS endpoint a persona tool (``[[tools]]``) calls during a call: a JSON
answer, an error status, garbage, an answer too large, or one too slow. With a ``secret`` it
checks the Standard Webhooks signature as a business would, and answers 401 when it does not
verify::

    async with ToolEndpoint([ToolReply({"free": True})], secret=secret) as business:
        ...  # a persona tool with url = business.url("/tools/check")
        [request] = await business.wait_for(1)
        assert request.json["arguments"] == {"guests": 2}
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from phoneagent.delivery.signing import VerificationError, verify
from phoneagent.testing.webhook_sink import LoopbackServer, ReceivedWebhook, wait_for_count

__all__ = ["ToolEndpoint", "ToolReply"]


@dataclass(frozen=True)
class ToolReply:
    """One answer: ``body`` is JSON-encoded unless it is bytes (sent as they are)."""

    body: Any = None
    status: int = 200
    delay: float = 0.0  # seconds before answering (a slow system, client timeouts)
    content_type: str = "application/json"

    def encoded(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return b"" if self.body is None else json.dumps(self.body).encode()


class ToolEndpoint(LoopbackServer):
    """Answers each request with the next reply of ``replies`` (the last one repeats)."""

    def __init__(
        self,
        replies: Iterable[ToolReply] = (ToolReply({"ok": True}),),
        *,
        secret: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.secret = secret
        self.received: list[ReceivedWebhook] = []
        self.verification_errors: list[str] = []
        self._changed = asyncio.Condition()
        self.script(replies)

    def script(self, replies: Iterable[ToolReply]) -> None:
        self._replies = list(replies) or [ToolReply({"ok": True})]
        self._next = 0

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedWebhook]:
        await wait_for_count(self.received, count, self._changed, timeout, "tool requests")
        return self.received

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        reply = self._replies[min(self._next, len(self._replies) - 1)]
        self._next += 1
        status = reply.status
        if self.secret is not None:
            try:
                verify(body, request.headers, self.secret)
            except VerificationError as exc:
                self.verification_errors.append(str(exc))
                status = 401
        self.received.append(ReceivedWebhook.of(request, body, status))
        async with self._changed:
            self._changed.notify_all()
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if status == 401:
            return web.Response(status=401, text="bad signature")
        return web.Response(
            status=status, body=reply.encoded(), headers={"Content-Type": reply.content_type}
        )
