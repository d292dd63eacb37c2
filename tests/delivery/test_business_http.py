"""Requests to a business's systems (business_http.py): through the proxy the environment
names unless NO_PROXY exempts the host, and never with credentials from ``~/.netrc``."""

from __future__ import annotations

import pytest
from aiohttp import web
from delivery_helpers import ENV, SECRET_ENV, T0, ended_event

from phoneagent.business_http import proxy_for
from phoneagent.delivery.outbox import OutboxItem
from phoneagent.delivery.sender import WebhookSender
from phoneagent.delivery.status import DeliveryStatus
from phoneagent.testing.webhook_sink import LoopbackServer, WebhookSink


class ForwardProxy(LoopbackServer):
    """A plain HTTP proxy's first half: notes each request it is asked to forward (an
    absolute URL as its target) and answers 200 itself."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[str, str | None]] = []  # (target URL, Authorization)

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        return app

    async def forward(self, request: web.Request) -> web.Response:
        self.asked.append((str(request.url), request.headers.get("Authorization")))
        return web.Response(status=200)


async def post_once(url: str) -> int | None:
    sender = WebhookSender(timeout=5.0, concurrency=1, environ=ENV)
    event = ended_event()
    item = OutboxItem(
        event.id, event.type, url, url.rsplit("/", 1)[0], SECRET_ENV, event.body(),
        DeliveryStatus.PENDING, 0, T0, T0, None, None, None, None, None,
    )  # fmt: skip
    try:
        return (await sender.post(item, now=T0)).status
    finally:
        await sender.close()


def no_proxy_env(monkeypatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


async def test_requests_go_through_the_environments_proxy_unless_no_proxy_names_the_host(
    monkeypatch,
):
    no_proxy_env(monkeypatch)
    async with ForwardProxy() as proxy, WebhookSink() as business:
        monkeypatch.setenv("HTTP_PROXY", proxy.url(""))
        target = "http://business.example/hooks"
        assert proxy_for(target) == proxy.url("")
        assert await post_once(target) == 200
        assert [url for url, _ in proxy.asked] == [target]
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert proxy_for(business.url("/hooks")) is None
        assert await post_once(business.url("/hooks")) == 200
        assert len(business.received) == 1 and len(proxy.asked) == 1  # straight there


async def test_a_netrc_password_never_goes_to_a_business(monkeypatch, tmp_path):
    no_proxy_env(monkeypatch)
    netrc = tmp_path / ".netrc"
    netrc.write_text("default login operator password s3cret-netrc\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    async with WebhookSink() as business:
        assert await post_once(business.url("/hooks")) == 200
    assert "Authorization" not in business.received[0].headers


@pytest.mark.parametrize(
    ("configured", "used"),
    [
        ("proxy.corp:3128", "http://proxy.corp:3128"),  # no scheme: http, as curl takes it
        ("HTTP://proxy.corp:3128", "http://proxy.corp:3128"),
        ("http://user:pw@proxy.corp:3128", "http://user:pw@proxy.corp:3128"),
        ("socks5://proxy.corp:1080", None),  # aiohttp cannot use it: skipped, with a warning
    ],
)
def test_the_proxy_is_read_as_curl_reads_it(monkeypatch, configured, used):
    no_proxy_env(monkeypatch)
    monkeypatch.setenv("HTTPS_PROXY", configured)
    assert proxy_for("https://business.example/hooks") == used
