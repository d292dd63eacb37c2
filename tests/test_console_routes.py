"""Every console route, found on the running app (so routes added later are covered too): none
answers without a session, in any form (a page, data, an event stream, a WebSocket), and none
that changes state does so without the session's CSRF token from this origin."""

from __future__ import annotations

import re

import aiohttp
import pytest
from aiohttp import web
from console_kit import PASSWORD

from phoneagent.console.web import PREFIX

OPEN = {f"{PREFIX}/login"}  # the one route that answers without a session (besides static files)
# Values for a route's {placeholders}: the first the route's pattern accepts is used.
SAMPLES = ("CA" + "0" * 32, "evt_" + "0" * 24, "bright-smile-dental", "1", "x")
SAFE = {"GET", "HEAD", "OPTIONS"}


def console_routes(stack) -> list[tuple[str, str]]:
    """(method, path) of every console route of the running app, placeholders filled in."""
    app: web.Application = stack._runner.app
    found = []
    for resource in app.router.resources():
        if isinstance(resource, web.StaticResource):
            continue
        info = resource.get_info()
        path = info.get("path") or _filled(info)
        if not path.startswith(PREFIX) or path in OPEN:
            continue
        for route in resource:
            # A route for any method ("*") is tried as a read and as a change.
            methods = ("GET", "POST") if route.method == "*" else (route.method,)
            found += [(method, path) for method in methods if method != "HEAD"]
    return sorted(set(found))


def _filled(info: dict) -> str:
    pattern: re.Pattern = info["pattern"]
    formatter: str = info["formatter"]
    names = re.findall(r"{(\w+)}", formatter)
    for sample in SAMPLES:
        path = formatter.format(**dict.fromkeys(names, sample))
        if pattern.fullmatch(path):
            return path
    raise AssertionError(f"no sample value fits {formatter}: add one to SAMPLES")


async def sign_in(http) -> None:
    async with http.post(
        "/console/login", data={"password": PASSWORD, "next": "/console/lines"},
        allow_redirects=False,
    ) as response:  # fmt: skip
        assert response.status == 303


async def refused_without_session(http, method: str, path: str, **headers) -> str:
    """How the route refused: "401", or "sign-in" for a redirect (possibly via the console's
    home) to the sign-in page. Anything else fails the test."""
    for _ in range(3):
        async with http.request(method, path, allow_redirects=False, headers=headers) as r:
            if r.status == 401:
                return "401"
            assert r.status in (302, 303, 307), f"{method} {path}: {r.status} without a session"
            location = r.headers["Location"]
            if location.startswith(f"{PREFIX}/login"):
                return "sign-in"
            assert location.startswith(f"{PREFIX}/"), f"{method} {path} sent to {location}"
            method, path = "GET", location
    raise AssertionError(f"{method} {path}: redirected in circles")


async def test_the_route_list_is_found_on_the_app(console_stack):
    routes = console_routes(console_stack)
    for expected in [
        ("GET", "/console/lines"),
        ("GET", "/console/deliveries"),
        ("POST", "/console/deliveries/redeliver"),
        ("POST", "/console/logout"),
        ("POST", "/console/logout-everywhere"),
    ]:
        assert expected in routes


async def test_no_console_route_answers_without_a_session(console_stack, http):
    for method, path in console_routes(console_stack):
        if method in SAFE:
            # A browser asking for a page is sent to sign in; data and event streams get 401.
            page = await refused_without_session(http, method, path, Accept="text/html")
            assert page in ("401", "sign-in")
            for accept in ("text/event-stream", "application/json", "*/*"):
                assert await refused_without_session(http, method, path, Accept=accept) in (
                    "401",
                    "sign-in",
                )
            # And a WebSocket handshake is refused before any upgrade.
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with http.ws_connect(path):
                    pass
            assert refused.value.status in (401, 303), f"WebSocket {path}: {refused.value}"
        else:
            assert await refused_without_session(http, method, path) == "401"
            forged = {"csrf": "x", "id": "evt_0"}
            async with http.request(method, path, data=forged, allow_redirects=False) as r:
                assert r.status == 401, f"{method} {path} with a form, no session: {r.status}"


async def test_a_forged_or_expired_session_cookie_opens_nothing(console_stack, http):
    keys_from_elsewhere = "v1.99999999999.0123456789abcdef01234567.c2lnbmF0dXJl"
    http.cookie_jar.update_cookies({"phoneagent_console": keys_from_elsewhere})
    for method, path in console_routes(console_stack):
        assert await refused_without_session(http, method, path) == "401"


async def test_no_state_change_without_the_sessions_csrf_token_from_this_origin(
    console_stack, http
):
    await sign_in(http)
    async with http.get("/console/lines", headers={"Accept": "text/html"}) as response:
        assert response.status == 200
        token = re.search(r'name="csrf" value="([^"]+)"', await response.text()).group(1)
    changing = [(m, p) for m, p in console_routes(console_stack) if m not in SAFE]
    assert changing
    for method, path in changing:
        attempts = {
            "no token": ({}, {}),
            "a forged token": ({"csrf": "forged"}, {}),
            "a forged header": ({}, {"X-CSRF-Token": "forged"}),
            "another origin": ({"csrf": token}, {"Origin": "https://evil.example"}),
            "another referer": ({"csrf": token}, {"Referer": "https://evil.example/console"}),
            "a null origin": ({"csrf": token}, {"Origin": "null"}),
        }
        for what, (form, headers) in attempts.items():
            data = form | {"id": "evt_0"}
            async with http.request(
                method, path, data=data, headers=headers, allow_redirects=False
            ) as r:
                assert r.status == 403, f"{method} {path} with {what}: {r.status}"
    # Still signed in: the refusals were the CSRF check's, not a lost session.
    async with http.get("/console/lines", allow_redirects=False) as response:
        assert response.status == 200
