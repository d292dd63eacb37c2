"""The persona tools' HTTP client against a business endpoint on loopback: signed requests,
answers read within limits, and every failure turned into a short error for the model with no
URL or secret in it."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
import structlog
from aiohttp import web

from phoneagent.business_tools import MAX_ANSWER_BYTES, BusinessToolClient
from phoneagent.delivery.signing import generate_secret, verify
from phoneagent.personas import BusinessTool
from phoneagent.testing.cookie_setter import CookieSetter
from phoneagent.testing.tool_endpoint import ToolEndpoint, ToolReply
from phoneagent.testing.webhook_sink import LoopbackServer

SECRET_ENV = "SHOP_TOOLS_SECRET"
ARGUMENTS = {"order": "A-1042", "name": "Dana Whitfield"}


def tool(url: str, **options) -> BusinessTool:
    return BusinessTool(
        name="order_status",
        description="Where is an order?",
        parameters={"type": "object", "properties": {"order": {"type": "string"}}},
        url=url,
        **options,
    )


@pytest.fixture
async def client():
    client = BusinessToolClient({SECRET_ENV: SECRET})
    yield client
    await client.close()


SECRET = generate_secret()


async def test_a_signed_request_and_its_json_answer(client):
    async with ToolEndpoint(
        [ToolReply({"status": "shipped", "eta": "Friday"})], secret=SECRET
    ) as biz:
        answer = await client.ask(
            "CA123", "shop", tool(biz.url("/tools/order"), secret_env=SECRET_ENV), ARGUMENTS
        )
    assert (answer.outcome, answer.status) == ("ok", 200)
    assert json.loads(answer.output) == {"status": "shipped", "eta": "Friday"}
    [request] = biz.received
    assert biz.verification_errors == []
    assert verify(request.body, request.headers, SECRET).startswith("tool_")
    assert request.json == {
        "call_sid": "CA123",
        "persona": "shop",
        "tool": "order_status",
        "arguments": ARGUMENTS,
    }
    assert request.headers["User-Agent"].startswith("phoneagent/")


async def test_without_a_secret_the_request_is_not_signed(client):
    async with ToolEndpoint([ToolReply([1, 2, 3])]) as biz:
        answer = await client.ask("CA1", "shop", tool(biz.url("/t")), {})
    assert (answer.outcome, answer.output) == ("ok", "[1,2,3]")
    assert "webhook-signature" not in {k.lower() for k in biz.received[0].headers}


async def test_a_secret_gone_from_the_environment_sends_nothing(client):
    async with ToolEndpoint() as biz:
        answer = await client.ask("CA1", "shop", tool(biz.url("/t"), secret_env="GONE"), {})
    assert answer.outcome == "not_signed"
    assert json.loads(answer.output) == {"error": "the tool is not available"}
    assert biz.received == []


@pytest.mark.parametrize(
    ("reply", "outcome", "error"),
    [
        (ToolReply({"x": 1}, status=500), "http_error", "answered with an error (HTTP 500)"),
        (ToolReply(b"", status=204), "bad_answer", "the answer was not JSON"),
        (ToolReply(b"{'single': 'quotes'}"), "bad_answer", "the answer was not JSON"),
        (ToolReply(b"[" * 200_000 + b"]" * 200_000), "bad_answer", "the answer was too large"),
        (ToolReply(b"[" * 30_000 + b"]" * 30_000), "bad_answer", "the answer was not JSON"),
        (ToolReply({"x": "y" * MAX_ANSWER_BYTES}), "bad_answer", "the answer was too large"),
        (ToolReply({"late": True}, delay=1.0), "timeout", "no answer in time"),
        # JSON Python reads but the model's socket could not carry on (NaN is no JSON; half a
        # character has no UTF-8) or that reads two ways (a key given twice).
        (ToolReply(b'{"price": NaN}'), "bad_answer", "the answer was not JSON"),
        (ToolReply(b'{"price": 1e999}'), "bad_answer", "the answer was not JSON"),
        (ToolReply(b'{"name": "\\ud800"}'), "bad_answer", "the answer was not JSON"),
        (ToolReply(b'{"free": true, "free": false}'), "bad_answer", "the answer was not JSON"),
        (ToolReply(b"\xff\xfe\xfd"), "bad_answer", "the answer was not JSON"),
    ],
)
async def test_every_failure_is_a_short_error(client, reply, outcome, error):
    async with ToolEndpoint([reply]) as biz:
        started = time.monotonic()
        answer = await client.ask("CA1", "shop", tool(biz.url("/t"), timeout_ms=300), {})
        took = time.monotonic() - started
    assert answer.outcome == outcome
    assert json.loads(answer.output)["error"].endswith(error)
    assert took < 0.9  # within the tool's timeout (and a little scheduling)


class Redirecting(LoopbackServer):
    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/t", self.moved)
        return app

    async def moved(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("http://127.0.0.1:9/elsewhere")


async def test_a_redirect_is_not_followed(client):
    async with Redirecting() as server:
        answer = await client.ask("CA1", "shop", tool(server.url("/t")), {})
    assert (answer.outcome, answer.status) == ("http_error", 302)


class Chunked(LoopbackServer):
    """Streams a body with no Content-Length, larger than the limit, then never ends it."""

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/t", self.stream)
        return app

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for _ in range(MAX_ANSWER_BYTES // 4096 + 2):
            await response.write(b" " * 4096)
        await asyncio.sleep(10)
        return response


async def test_an_endless_answer_is_cut_at_the_limit(client):
    async with Chunked() as server:
        answer = await client.ask("CA1", "shop", tool(server.url("/t"), timeout_ms=5000), {})
    assert answer.outcome == "bad_answer"
    assert answer.duration_ms < 4000  # cut at the limit, not at the timeout


async def test_an_unreachable_system_names_no_url_or_secret(client):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://user:hunter2@127.0.0.1:{port}/t?token=s3cr3t-token"
    with structlog.testing.capture_logs() as logs:
        answer = await client.ask("CA1", "shop", tool(url), {"name": "Dana Whitfield"})
    assert answer.outcome == "unreachable"
    assert json.loads(answer.output) == {"error": "the business's system could not be reached"}
    logged = json.dumps(logs)
    assert "business_tool_unreachable" in logged
    for secret in ("hunter2", "s3cr3t-token", "Dana"):
        assert secret not in logged


async def test_a_cookie_of_one_calls_answer_never_goes_with_another_calls_request(client):
    async with CookieSetter() as server:
        for call_sid in ("CA_first_caller", "CA_second_caller"):
            answer = await client.ask(call_sid, "shop", tool(server.named_url("/t")), {})
            assert answer.outcome == "ok"
    assert server.cookies == [None, None]
