"""Which client a request comes from (``client_address.py``): behind a proxy the operator
trusts (``PHONEAGENT_TRUSTED_PROXIES``), the address the proxy gives in ``X-Forwarded-For``, so
one stranger's failures no longer refuse every client behind the same Ingress; without it, or
from anywhere else, the connection's address, whatever the request claims. IPv6 clients are
counted by their /64."""

from __future__ import annotations

import ipaddress

import aiohttp
import pytest
import structlog
from aiohttp import web
from api_kit import bearer, make_key
from conftest import EXAMPLE_PERSONAS
from console_kit import PASSWORD, console_settings

from phoneagent.api.routes import FAILURES_PER_CLIENT, PREFIX
from phoneagent.client_address import bound_key, forwarded_client, parse_trusted_proxies
from phoneagent.client_limits import real_client
from phoneagent.config import ConfigError, load_settings
from phoneagent.console.auth import AttemptLimiter
from phoneagent.testing.stack import LocalStack

INGRESS = parse_trusted_proxies("10.0.0.0/8, fd00::/8")


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        # A request straight from the internet: its own X-Forwarded-For is not believed.
        ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
        # Through the Ingress: the address it appended.
        ("10.1.2.3", ["198.51.100.1"], "198.51.100.1"),
        # What the client wrote itself is further left and is not believed.
        ("10.1.2.3", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),
        # Two trusted hops (a load balancer, then the Ingress), over two header lines.
        ("10.1.2.3", ["6.6.6.6, 198.51.100.1", "10.9.9.9"], "198.51.100.1"),
        # Ports and brackets as some proxies write them; an IPv4-mapped peer.
        ("10.1.2.3", ["198.51.100.1:5060"], "198.51.100.1"),
        ("::ffff:10.1.2.3", ["[2001:db8::7]:443"], "2001:db8::7"),
        ("fd00::1", ["2001:db8::7"], "2001:db8::7"),
        # Not an address where the trusted proxy wrote: the proxy is the client, as without one.
        ("10.1.2.3", ["6.6.6.6, unknown"], "10.1.2.3"),
        ("10.1.2.3", ["6.6.6.6, _hidden, 10.9.9.9"], "10.9.9.9"),
        # Every hop is ours (a health check from inside): the left-most.
        ("10.1.2.3", ["10.4.4.4, 10.9.9.9"], "10.4.4.4"),
        # No header at all: the proxy itself.
        ("10.1.2.3", [], "10.1.2.3"),
    ],
)
def test_the_client_is_the_address_the_trusted_proxies_saw(peer, forwarded, client):
    assert forwarded_client(peer, forwarded, INGRESS) == client


def test_without_trusted_proxies_the_connection_is_the_client():
    assert forwarded_client("10.1.2.3", ["198.51.100.1"], ()) == "10.1.2.3"
    assert forwarded_client(None, ["198.51.100.1"], INGRESS) is None


def test_ipv6_clients_are_counted_by_their_64():
    assert bound_key("2001:db8:1:2:aaaa::1") == bound_key("2001:db8:1:2:bbbb::2")
    assert bound_key("2001:db8:1:2::1") != bound_key("2001:db8:1:3::1")
    assert bound_key("198.51.100.1") == "198.51.100.1" and bound_key("?") == "?"
    limiter = AttemptLimiter(per_client=2)
    for n in range(2):
        limiter.failed(f"2001:db8:1:2::{n + 1}")  # a fresh address each time, the same /64
    assert limiter.wait_seconds("2001:db8:1:2::99") > 0
    assert limiter.wait_seconds("2001:db8:1:3::1") == 0


def test_a_malformed_list_is_a_configuration_error_naming_the_entry(valid_env):
    settings = load_settings(valid_env | {"PHONEAGENT_TRUSTED_PROXIES": " 10.0.0.0/8 ,::1 "})
    assert settings.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1"),
    )
    assert load_settings(valid_env).trusted_proxies == ()
    with pytest.raises(ConfigError) as error:
        load_settings(valid_env | {"PHONEAGENT_TRUSTED_PROXIES": "10.0.0.0/8, ingress.local"})
    assert "PHONEAGENT_TRUSTED_PROXIES" in str(error.value)
    assert "'ingress.local'" in str(error.value)


# --- through the server: this test's client on 127.0.0.1 plays the Ingress ------------------


async def behind(trusted: str, tmp_path):
    settings = console_settings(
        EXAMPLE_PERSONAS, tmp_path / "data", trusted_proxies=parse_trusted_proxies(trusted)
    )
    return LocalStack(EXAMPLE_PERSONAS, settings=settings)


def from_(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": f"6.6.6.6, {address}"}  # the left one the client's own claim


async def api_status(http, key: str, address: str) -> int:
    headers = bearer(key) | from_(address)
    async with http.get(f"{PREFIX}/personas", headers=headers) as response:
        return response.status


async def test_behind_a_trusted_proxy_one_clients_failed_keys_do_not_refuse_the_others(tmp_path):
    async with await behind("127.0.0.1", tmp_path) as stack:
        good = await make_key(stack)
        async with aiohttp.ClientSession(base_url=stack.base_url) as http:
            with structlog.testing.capture_logs() as logs:
                for _ in range(FAILURES_PER_CLIENT):
                    assert await api_status(http, "pa_nope", "198.51.100.1") == 401
            assert await api_status(http, good, "198.51.100.1") == 429  # that client waits
            assert await api_status(http, good, "198.51.100.2") == 200  # the others do not
    refused = [e for e in logs if e["event"] == "api_key_refused"]
    assert {e["remote"] for e in refused} == {"198.51.100.1"}  # the log names the client
    accessed = [e for e in logs if e["event"] == "http_request"]
    assert accessed and {e["remote"] for e in accessed} == {"198.51.100.1"}  # the access log too


async def test_without_trusting_the_proxy_a_forwarded_address_changes_nothing(tmp_path):
    async with await behind("", tmp_path) as stack:
        good = await make_key(stack)
        async with aiohttp.ClientSession(base_url=stack.base_url) as http:
            for n in range(FAILURES_PER_CLIENT):  # each claims another address: one client
                assert await api_status(http, "pa_nope", f"198.51.100.{n}") == 401
            assert await api_status(http, good, "198.51.100.200") == 429


async def test_behind_a_trusted_proxy_the_operator_can_sign_in_while_a_stranger_guesses(tmp_path):
    stack = await behind("127.0.0.0/8", tmp_path)
    async with stack, aiohttp.ClientSession(base_url=stack.base_url) as http:

        async def sign_in(password: str, address: str) -> int:
            form = {"password": password, "next": "/console/lines"}
            async with http.post("/console/login", data=form, headers=from_(address),
                                 allow_redirects=False) as response:  # fmt: skip
                return response.status

        for _ in range(5):
            assert await sign_in("a guess", "198.51.100.66") == 401
        assert await sign_in(PASSWORD, "198.51.100.66") == 429
        assert await sign_in(PASSWORD, "203.0.113.10") == 303


async def test_a_websocket_through_a_trusted_proxy_is_served_with_the_clients_address():
    # Twilio's media stream and the console's talk page are WebSockets: the request handed on
    # (a copy with the client's address) must still upgrade.
    async def echo_remote(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_str(request.remote or "")
        await socket.close()
        return socket

    app = web.Application(middlewares=[real_client(parse_trusted_proxies("127.0.0.1"))])
    app.router.add_get("/ws", echo_remote)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/ws"
            async with http.ws_connect(url, headers=from_("198.51.100.1")) as socket:
                assert await socket.receive_str() == "198.51.100.1"
    finally:
        await runner.cleanup()
