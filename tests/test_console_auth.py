"""The console's door: the password, the session cookie, CSRF, the bound on sign-in attempts,
and that nothing but the sign-in page answers without a session."""

from __future__ import annotations

import re
from collections import OrderedDict

import pytest
from console_kit import PASSWORD

from phoneagent.config import ConfigError, load_settings
from phoneagent.console.auth import AttemptLimiter, ConsoleKeys, hash_password

SERVER_SECRET = "twilio-auth-token-value"


def test_a_session_is_valid_until_it_expires_and_only_with_its_keys():
    keys = ConsoleKeys(PASSWORD, SERVER_SECRET)
    token = keys.new_session(now=1000.0)
    assert keys.session_valid(token, now=1001.0)
    assert not keys.session_valid(token, now=1000.0 + 13 * 3600)
    assert not ConsoleKeys("another password!", SERVER_SECRET).session_valid(token, now=1001.0)
    assert not ConsoleKeys(PASSWORD, "another auth token").session_valid(token, now=1001.0)
    body, _, mac = token.rpartition(".")
    version, issued_ms, nonce = body.split(".")
    longer = f"{version}.{int(issued_ms) + 3600_000}.{nonce}.{mac}"  # a forged issue time
    assert not keys.session_valid(longer, now=1001.0)
    for junk in (
        "",
        "v2.x.y.z",
        "a.b.c",
        "v2.99999999999.n.\udcff",
        "...",
        "v2." + "9" * 99 + ".n.m",
    ):
        assert not keys.session_valid(junk, now=1001.0)


def test_the_password_may_be_configured_as_its_scrypt_hash():
    hashed = hash_password(PASSWORD)
    assert hashed.startswith("scrypt$") and PASSWORD not in hashed
    keys = ConsoleKeys(hashed, SERVER_SECRET)
    assert keys.password_matches(PASSWORD)
    assert not keys.password_matches(PASSWORD + " ")
    assert ConsoleKeys(PASSWORD, SERVER_SECRET).password_matches(PASSWORD)
    assert not ConsoleKeys(PASSWORD, SERVER_SECRET).password_matches("\udcff")


def test_the_csrf_token_is_bound_to_the_session():
    keys = ConsoleKeys(PASSWORD, SERVER_SECRET)
    first, second = keys.new_session(1.0), keys.new_session(1.0)
    assert keys.csrf_valid(first, keys.csrf_token(first))
    assert not keys.csrf_valid(first, keys.csrf_token(second))
    assert not keys.csrf_valid(first, None) and not keys.csrf_valid(first, "é")


def test_sign_in_attempts_are_bounded_per_client_and_overall():
    now = [0.0]
    limiter = AttemptLimiter(per_client=3, overall=5, window=60.0, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.wait_seconds("a") == 0
        limiter.failed("a")
    assert limiter.wait_seconds("a") == 60.0
    assert limiter.wait_seconds("b") == 0
    limiter.failed("b")
    limiter.failed("c")  # five failures in all: everyone waits
    assert limiter.wait_seconds("d") == 60.0
    now[0] = 61.0
    assert limiter.wait_seconds("a") == 0 and limiter.wait_seconds("d") == 0


class _Watched(OrderedDict):
    """The limiter's clients, counting how many of them a call walks through."""

    touched = 0

    def items(self):
        for item in super().items():
            self.touched += 1
            yield item

    def values(self):
        for _, times in self.items():
            yield times


def test_a_check_walks_no_more_clients_however_many_failed():
    now = [0.0]
    clients = _Watched()
    limiter = AttemptLimiter(per_client=3, overall=2**62, window=10_000.0, clock=lambda: now[0],
                             _failures=clients)  # fmt: skip
    for n in range(10_000):  # a spray: 10 000 clients (a /64 each) in the window
        now[0] = float(n)
        limiter.failed(f"2001:db8:{n // 256:x}:{n % 256:x}::1")
    clients.touched = 0
    for _ in range(1_000):
        assert limiter.wait_seconds("198.51.100.7") == 0
    assert clients.touched == 1_000  # one look at the oldest client per check, not 10 000
    now[0] = 19_000.5  # the first 9 001 left the window: dropped once, from the front
    clients.touched = 0
    assert limiter.wait_seconds("198.51.100.7") == 0
    assert len(clients) == 999 and clients.touched == 9_002
    assert limiter.wait_seconds("2001:db8:27:f::1") == 0  # the latest, one failure: it may


def test_past_max_clients_the_one_whose_last_failure_is_oldest_is_forgotten():
    now = [0.0]
    limiter = AttemptLimiter(per_client=2, overall=2**62, window=60.0, clock=lambda: now[0],
                             max_clients=3)  # fmt: skip
    for client in ("a", "a", "b", "b", "c", "c", "a"):  # a failed last: b's failure is oldest
        limiter.failed(client)
        now[0] += 1.0
    assert all(limiter.wait_seconds(c) > 0 for c in "abc")
    limiter.failed("d")
    assert limiter.wait_seconds("b") == 0  # forgotten
    assert limiter.wait_seconds("a") > 0 and limiter.wait_seconds("c") > 0
    spray = AttemptLimiter(overall=2**62)  # the default cap
    for n in range(10_500):
        spray.failed(f"10.1.{n // 256}.{n % 256}")
    assert len(spray._failures) == 10_000


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("tiny-pw1", "too short"),
        ("scrypt$1$2", "malformed"),
        ("scrypt$N$8$1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA", "malformed"),
    ],
)
def test_a_weak_or_malformed_console_password_is_a_configuration_error(valid_env, value, problem):
    with pytest.raises(ConfigError) as error:
        load_settings(valid_env | {"PHONEAGENT_CONSOLE_PASSWORD": value})
    assert problem in str(error.value)
    assert value not in str(error.value) or value.startswith("scrypt")


# --- through HTTP ---------------------------------------------------------------------------

CONSOLE_GETS = ["/console", "/console/lines"]
CONSOLE_POSTS = ["/console/logout"]


async def sign_in(http, password=PASSWORD, **headers):
    return await http.post(
        "/console/login",
        data={"password": password, "next": "/console/lines"},
        allow_redirects=False,
        headers=headers,
    )


async def csrf_of(http) -> str:
    async with http.get("/console/lines", headers={"Accept": "text/html"}) as response:
        return re.search(r'name="csrf" value="([^"]+)"', await response.text()).group(1)


async def test_without_a_session_pages_redirect_and_everything_else_is_401(http):
    for path in CONSOLE_GETS:
        async with http.get(path, allow_redirects=False, headers={"Accept": "text/html"}) as r:
            assert r.status == 303
            assert r.headers["Location"].startswith("/console/")
        async with http.get(path, allow_redirects=False) as r:  # not a browser asking for a page
            assert r.status in (303, 401)
    async with http.get("/console/lines", allow_redirects=False) as r:
        assert r.status == 401
    for path in CONSOLE_POSTS:
        async with http.post(path, allow_redirects=False) as r:
            assert r.status == 401


async def test_a_wrong_password_is_refused_and_the_right_one_opens_a_strict_session(http):
    async with await sign_in(http, "not the password") as response:
        assert response.status == 401
        assert "Wrong password" in await response.text()
        assert "phoneagent_console" not in response.cookies
    async with await sign_in(http) as response:
        assert response.status == 303 and response.headers["Location"] == "/console/lines"
        cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # http://127.0.0.1: the browser is on this machine
    async with http.get("/console/lines", headers={"Accept": "text/html"}) as response:
        assert response.status == 200
        assert "Bright Smile Dental" in await response.text()
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


async def test_a_session_cookie_is_secure_when_the_console_is_reached_by_name(http):
    async with await sign_in(http, Host="voice.example.com") as response:
        assert response.status == 303
        assert "Secure" in response.headers["Set-Cookie"]


async def test_sign_in_from_another_site_is_refused(http):
    async with await sign_in(http, Origin="https://evil.example") as response:
        assert response.status == 403


async def test_state_changes_need_the_sessions_csrf_token_and_this_origin(http):
    async with await sign_in(http):
        pass
    token = await csrf_of(http)
    async with http.post("/console/logout", data={}, allow_redirects=False) as r:
        assert r.status == 403  # no token
    async with http.post("/console/logout", data={"csrf": "forged"}, allow_redirects=False) as r:
        assert r.status == 403
    async with http.post(
        "/console/logout",
        data={"csrf": token},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
    ) as r:
        assert r.status == 403
    async with http.post("/console/logout", data={"csrf": token}, allow_redirects=False) as r:
        assert r.status == 303


async def test_repeated_wrong_passwords_are_slowed_down(http):
    for _ in range(5):
        async with await sign_in(http, "guess") as response:
            assert response.status == 401
    async with await sign_in(http) as response:  # even the right one must wait now
        assert response.status == 429
        assert int(response.headers["Retry-After"]) > 0


async def test_an_open_redirect_after_sign_in_is_not_possible(http):
    for target in ("https://evil.example/", "//evil.example/x", "/console\\..\\x", "/other"):
        async with http.post(
            "/console/login",
            data={"password": PASSWORD, "next": target},
            allow_redirects=False,
        ) as response:
            assert response.headers["Location"] == "/console/lines"


def test_a_cookie_with_undecodable_bytes_in_its_body_is_not_a_session():
    # aiohttp decodes headers with surrogateescape: a cookie's bytes that are not UTF-8 arrive
    # as lone surrogates, anywhere in the token (not only in its signature).
    keys = ConsoleKeys(PASSWORD, SERVER_SECRET)
    for junk in ("v1.99999999999.\udcff.mac", "v1.99999999999.n\udcff.\udcff"):
        assert not keys.session_valid(junk, now=1001.0)


async def test_a_cookie_of_undecodable_bytes_gets_the_sign_in_page_not_a_500(console_stack):
    import asyncio

    port = int(console_stack.base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /console/lines HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/html\r\n"
        b"Cookie: phoneagent_console=v1.99999999999.\xff.x\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 303 "), answer[:200]
