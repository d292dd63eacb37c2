"""Signing out revokes the session: its cookie, wherever a copy of it is, then gets what a
request without a session gets, on this instance, across a restart and (a shared PostgreSQL
database) on every instance within about a second; "sign out everywhere" revokes every session
issued until then; a console call ends with its session. Through HTTP on real servers."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import re
import time

import aiohttp
import pytest
from conftest import EXAMPLE_PERSONAS
from console_kit import PASSWORD, console_settings
from test_console_calls import DENTAL, SSE, EventReader, eventually
from test_console_routes import console_routes, refused_without_session
from test_console_talk import greeted, page_call, quiet, recorded_end
from test_console_talk import sign_in as sign_in_for_talk
from test_log_secrets import capture_logging

from phoneagent.console.auth import ConsoleKeys
from phoneagent.console.revocation_store import REVOCATIONS_FILENAME, SQLiteRevocations
from phoneagent.console.revocations import (
    FRESH_SECONDS,
    RETRY_MAX_SECONDS,
    RevocationList,
    SessionRevocations,
)
from phoneagent.console.web import COOKIE
from phoneagent.delivery.pg_round_trip import AWAY_SECONDS, ROUND_TRIP_SECONDS
from phoneagent.testing.stack import LocalStack

SECRET = "twilio-auth-token-value"


# --- the list, no I/O -------------------------------------------------------------------------


def test_a_session_is_revoked_by_its_id_or_by_signing_out_everywhere_after_it_was_issued():
    keys = ConsoleKeys(PASSWORD, SECRET)
    first = keys.session(keys.new_session(1000.0), 1000.5)
    second = keys.session(keys.new_session(1000.25), 1000.5)
    later = keys.session(keys.new_session(1000.75), 1000.8)
    assert first and second and later and first.id != second.id
    assert first.token not in first.id and first.id not in first.token  # a hash, not a part
    revoked = RevocationList()
    revoked.revoke(first)
    assert revoked.revoked(first) and not revoked.revoked(second)
    revoked.revoke_all_before(1000.5)  # within the second both were issued in: told apart
    assert revoked.revoked(second) and not revoked.revoked(later)
    revoked.learn(RevocationList({}, 10.0))  # an older "everywhere" read back takes nothing back
    assert revoked.signed_out_before == 1000.5 and revoked.revoked(first)
    revoked.forget_expired(first.expires_at)
    assert first.id not in revoked.sessions


@pytest.fixture
def json_log():
    """``json_log(level)``: the server's log from then on, as JSON lines in a string buffer;
    the root logger is put back as it was after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def capture(at: str) -> io.StringIO:
        output = io.StringIO()
        capture_logging(output, "json", at, secrets=set())
        return output

    yield capture
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_a_revocation_is_kept_in_memory_while_its_file_cannot_be_written(tmp_path):
    keys = ConsoleKeys(PASSWORD, SECRET)
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")  # the data directory is a file: nothing can be written under it
    revocations = SessionRevocations(SQLiteRevocations.in_data_dir(blocked))
    session = keys.session(keys.new_session(time.time()), time.time())
    assert session is not None
    assert await revocations.revoke(session) is False  # not stored…
    assert revocations.revoked(session)  # …but in force here
    await revocations.fresh()  # a read that fails changes nothing
    assert revocations.revoked(session)
    blocked.unlink()
    blocked.mkdir()
    await asyncio.sleep(FRESH_SECONDS)
    await revocations.fresh()  # the store is back: written at the next read
    await revocations.close()
    again = SessionRevocations(SQLiteRevocations.in_data_dir(blocked))
    await again.fresh()
    assert again.revoked(session)
    await again.close()


async def test_another_readers_revocations_are_read_at_most_once_a_second(tmp_path):
    keys = ConsoleKeys(PASSWORD, SECRET)
    now = [100.0]
    here, there = (
        SessionRevocations(SQLiteRevocations.in_data_dir(tmp_path), monotonic=lambda: now[0])
        for _ in range(2)
    )
    session = keys.session(keys.new_session(time.time()), time.time())
    assert session is not None
    await there.fresh()  # read: nothing revoked
    assert await here.revoke(session) is True
    await there.fresh()
    assert not there.revoked(session)  # what it read is less than FRESH_SECONDS old: no read
    now[0] += FRESH_SECONDS
    there.refresh_soon()  # in the background, for a check that cannot wait
    assert not there.revoked(session)
    await eventually(lambda: there.revoked(session), timeout=2)
    await here.close()
    await there.close()


# --- through HTTP -----------------------------------------------------------------------------


async def sign_in(base_url: str) -> tuple[aiohttp.ClientSession, str, str]:
    """A new browser signed in: its client, its session cookie and the session's CSRF token."""
    http = aiohttp.ClientSession(base_url=base_url, cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with http.post(
        "/console/login", data={"password": PASSWORD, "next": "/console/lines"},
        allow_redirects=False,
    ) as response:  # fmt: skip
        assert response.status == 303
        cookie = response.cookies[COOKIE].value
    async with http.get("/console/lines", headers={"Accept": "text/html"}) as response:
        assert response.status == 200
        csrf = re.search(r'name="csrf" value="([^"]+)"', await response.text()).group(1)
    return http, cookie, csrf


async def access(base_url: str, cookie: str) -> tuple[int, int, int]:
    """What a stolen copy of ``cookie`` gets: a page (as a browser asks), data, a WebSocket."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(base_url=base_url, cookie_jar=jar) as thief:
        thief.cookie_jar.update_cookies({COOKIE: cookie}, response_url=thief._base_url)
        async with thief.get(
            "/console/lines", headers={"Accept": "text/html"}, allow_redirects=False
        ) as page:
            statuses = [page.status]
        async with thief.get("/console/lines", allow_redirects=False) as data:
            statuses.append(data.status)
        try:
            async with thief.ws_connect("/console/talk/stream", headers={"Origin": base_url}) as ws:
                await ws.close()
                statuses.append(101)
        except aiohttp.WSServerHandshakeError as exc:
            statuses.append(exc.status)
    return statuses[0], statuses[1], statuses[2]


SIGNED_IN = (200, 200, 101)
SIGNED_OUT = (303, 401, 401)


async def sign_out(http, csrf: str, path: str = "/console/logout") -> None:
    async with http.post(path, data={"csrf": csrf}, allow_redirects=False) as response:
        assert response.status == 303 and response.headers["Location"] == "/console/login"
        assert response.cookies[COOKIE].value == ""  # the browser's copy goes too


@pytest.fixture
async def stack(tmp_path):
    settings = console_settings(EXAMPLE_PERSONAS, tmp_path / "data")
    async with LocalStack(EXAMPLE_PERSONAS, settings=settings) as stack:
        yield stack


async def test_a_signed_out_session_is_refused_even_to_a_copy_of_its_cookie(stack):
    mine, my_cookie, my_csrf = await sign_in(stack.base_url)
    other, other_cookie, _ = await sign_in(stack.base_url)
    try:
        assert await access(stack.base_url, my_cookie) == SIGNED_IN
        await sign_out(mine, my_csrf)
        assert await access(stack.base_url, my_cookie) == SIGNED_OUT
        async with mine.get("/console/lines", allow_redirects=False) as response:
            assert response.status == 401
        # A revoked session cannot act either, with its own CSRF token.
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(base_url=stack.base_url, cookie_jar=jar) as thief:
            thief.cookie_jar.update_cookies({COOKIE: my_cookie}, response_url=thief._base_url)
            async with thief.post(
                "/console/logout-everywhere", data={"csrf": my_csrf}, allow_redirects=False
            ) as response:
                assert response.status == 401
        assert await access(stack.base_url, other_cookie) == SIGNED_IN  # the other session
        # Only the id (a hash) and the expiry are stored: no cookie, not even its random part.
        stored = (stack.settings.data_dir / REVOCATIONS_FILENAME).read_bytes()
        nonce = my_cookie.split(".")[2]
        assert nonce.encode() not in stored and my_cookie.encode() not in stored
    finally:
        await mine.close()
        await other.close()


async def test_no_console_route_answers_a_signed_out_session(stack):
    http, cookie, csrf = await sign_in(stack.base_url)
    await sign_out(http, csrf)
    await http.close()
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(base_url=stack.base_url, cookie_jar=jar) as thief:
        thief.cookie_jar.update_cookies({COOKIE: cookie}, response_url=thief._base_url)
        for method, path in console_routes(stack):
            assert await refused_without_session(thief, method, path) == "401", (method, path)
            if method == "POST":  # with the session's own CSRF token
                async with thief.post(
                    path, data={"csrf": csrf}, headers={"X-CSRF-Token": csrf},
                    allow_redirects=False,
                ) as response:  # fmt: skip
                    assert response.status == 401, (method, path)


async def test_sign_out_everywhere_revokes_every_session_until_then(stack):
    browsers = [await sign_in(stack.base_url) for _ in range(3)]
    try:
        (first, _, csrf), cookies = browsers[0], [cookie for _, cookie, _ in browsers]
        await sign_out(first, csrf, "/console/logout-everywhere")
        for cookie in cookies:
            assert await access(stack.base_url, cookie) == SIGNED_OUT
        again, cookie, _ = await sign_in(stack.base_url)  # signing in again works at once
        await again.close()
        assert await access(stack.base_url, cookie) == SIGNED_IN
    finally:
        for http, _, _ in browsers:
            await http.close()


async def test_sign_out_clicked_twice_at_once_is_no_error(stack):
    http, cookie, csrf = await sign_in(stack.base_url)
    try:

        async def click() -> int:
            async with http.post(
                "/console/logout", data={"csrf": csrf}, allow_redirects=False,
                cookies={COOKIE: cookie},
            ) as response:  # fmt: skip
                return response.status

        statuses = await asyncio.gather(*(click() for _ in range(5)))
        assert set(statuses) <= {303, 401} and 303 in statuses
        assert await access(stack.base_url, cookie) == SIGNED_OUT
    finally:
        await http.close()


async def test_sign_out_everywhere_needs_the_csrf_token(stack):
    http, cookie, _ = await sign_in(stack.base_url)
    try:
        async with http.post(
            "/console/logout-everywhere", data={"csrf": "forged"}, allow_redirects=False
        ) as response:
            assert response.status == 403
        async with http.post(
            "/console/logout-everywhere",
            data={"csrf": "x"},
            headers={"Origin": "https://evil.example"},
            allow_redirects=False,
        ) as response:
            assert response.status == 403
        assert await access(stack.base_url, cookie) == SIGNED_IN
    finally:
        await http.close()


async def test_a_revocation_outlives_a_restart(tmp_path):
    settings = console_settings(EXAMPLE_PERSONAS, tmp_path / "data")
    async with LocalStack(EXAMPLE_PERSONAS, settings=settings) as stack:
        gone, gone_cookie, csrf = await sign_in(stack.base_url)
        kept, kept_cookie, _ = await sign_in(stack.base_url)
        await sign_out(gone, csrf)
        await gone.close()
        await kept.close()
    async with LocalStack(EXAMPLE_PERSONAS, settings=settings) as stack:  # the same settings
        assert await access(stack.base_url, gone_cookie) == SIGNED_OUT
        assert await access(stack.base_url, kept_cookie) == SIGNED_IN


async def test_no_password_cookie_or_token_reaches_the_log(stack, tmp_path, json_log):
    output = json_log("debug")  # nothing to redact by value
    http, cookie, csrf = await sign_in(stack.base_url)
    await sign_out(http, csrf)
    await access(stack.base_url, cookie)
    await http.close()
    again, cookie2, csrf2 = await sign_in(stack.base_url)
    await sign_out(again, csrf2, "/console/logout-everywhere")
    await again.close()
    written = output.getvalue()
    assert "console_signed_out" in written
    for secret in (PASSWORD, cookie, cookie2, csrf, csrf2, cookie.split(".")[2]):
        assert secret not in written


# --- a console call ---------------------------------------------------------------------------


async def test_a_console_call_ends_when_its_session_is_signed_out(stack):
    async with aiohttp.ClientSession(
        base_url=stack.base_url, cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as http:
        csrf = await sign_in_for_talk(http)
        async with page_call(http, csrf, stack.base_url) as caller:
            await greeted(caller)
            assert stack.model.sessions_open == 1
            await caller.play(quiet(200))
            signed_out_at = time.monotonic()
            await sign_out(http, csrf)  # the cookie the socket was opened with is revoked
            await caller.wait_closed(timeout=5)
            assert time.monotonic() - signed_out_at < 2 * FRESH_SECONDS + 1
        ended = caller.messages("console.ended")
        assert [m["reason"] for m in ended] == ["signed_out"]
        record = await recorded_end(stack.state, caller.call_sid)
        assert record.end_reason == "twilio_disconnected"  # as when the page hangs up
        await stack.model.wait_for(lambda: stack.model.sessions_open == 0)
        assert caller.call_sid not in stack.state.active_calls


async def test_a_console_call_ends_when_its_session_expires(stack, monkeypatch):
    monkeypatch.setattr("phoneagent.console.auth.SESSION_SECONDS", 4)  # a working day, shortened
    async with aiohttp.ClientSession(
        base_url=stack.base_url, cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as http:
        csrf = await sign_in_for_talk(http)
        signed_in_at = time.monotonic()
        async with page_call(http, csrf, stack.base_url) as caller:
            await greeted(caller)
            await caller.play(quiet(200))
            await caller.wait_closed(timeout=8)
        assert 4 <= time.monotonic() - signed_in_at < 4 + FRESH_SECONDS + 1
        assert [m["reason"] for m in caller.messages("console.ended")] == ["signed_out"]
        await stack.model.wait_for(lambda: stack.model.sessions_open == 0)


async def test_a_live_calls_event_stream_ends_when_its_session_is_signed_out(stack):
    http, cookie, csrf = await sign_in(stack.base_url)
    try:
        async with stack.caller(to=DENTAL) as caller:
            await caller.dial()
            await caller.connect()
            caller.start_background_silence()
            await eventually(lambda: caller.call_sid in stack.state.active_calls)
            path = f"/console/calls/{caller.call_sid}/events"
            async with http.get(path, headers=SSE) as stream:
                assert stream.status == 200
                events = EventReader(stream)
                await events.next("turn")  # the greeting: the stream follows the call
                async with aiohttp.ClientSession(
                    base_url=stack.base_url, cookie_jar=aiohttp.CookieJar(unsafe=True)
                ) as elsewhere:  # another tab of the same session signs out
                    elsewhere.cookie_jar.update_cookies(
                        {COOKIE: cookie}, response_url=elsewhere._base_url
                    )
                    await sign_out(elsewhere, csrf)
                left = await events.rest(timeout=3)  # closed, though the call goes on
                assert "ended" not in [event["event"] for event in left]
            assert caller.call_sid in stack.state.active_calls
            await caller.hangup()
    finally:
        await http.close()


# --- several instances on one database ---------------------------------------------------------


async def test_a_sign_out_on_one_instance_holds_on_the_other_within_seconds(pg_database, tmp_path):
    shared = console_settings(EXAMPLE_PERSONAS, tmp_path, database_url=pg_database)
    stacks = [  # the same settings (the same Twilio account and console password), each its dir
        LocalStack(EXAMPLE_PERSONAS, settings=dataclasses.replace(shared, data_dir=tmp_path / n))
        for n in ("a", "b")
    ]
    browsers = []
    try:
        for stack in stacks:
            await stack.start()
        a, b = (stack.base_url for stack in stacks)
        browsers = [await sign_in(a) for _ in range(3)]
        (one, one_cookie, one_csrf), (_, two_cookie, _), (_, three_cookie, _) = browsers
        assert await access(b, one_cookie) == SIGNED_IN  # any instance accepts a session
        await sign_out(one, one_csrf)  # on a
        async with asyncio.timeout(2 * FRESH_SECONDS + 1):
            while await access(b, one_cookie) != SIGNED_OUT:
                await asyncio.sleep(0.1)
        assert await access(b, two_cookie) == SIGNED_IN
        # Everywhere, from b: a learns it as fast.
        async with aiohttp.ClientSession(
            base_url=b, cookie_jar=aiohttp.CookieJar(unsafe=True)
        ) as on_b:
            on_b.cookie_jar.update_cookies({COOKIE: two_cookie}, response_url=on_b._base_url)
            async with on_b.get("/console/lines", headers={"Accept": "text/html"}) as page:
                csrf = re.search(r'name="csrf" value="([^"]+)"', await page.text()).group(1)
            await sign_out(on_b, csrf, "/console/logout-everywhere")
        async with asyncio.timeout(2 * FRESH_SECONDS + 1):
            while await access(a, two_cookie) != SIGNED_OUT:
                await asyncio.sleep(0.1)
        assert await access(a, three_cookie) == SIGNED_OUT
        # Restarted, an instance reads the revocations from the database.
        await stacks[0].close()
        stacks[0] = LocalStack(EXAMPLE_PERSONAS, settings=stacks[0].settings)
        await stacks[0].start()
        assert await access(stacks[0].base_url, one_cookie) == SIGNED_OUT
    finally:
        for http, _, _ in browsers:
            await http.close()
        for stack in stacks:
            await stack.close()


async def test_a_database_away_locks_nobody_out_and_lets_no_revoked_session_back(
    stoppable_postgres, tmp_path, json_log
):
    cluster = stoppable_postgres
    shared = console_settings(EXAMPLE_PERSONAS, tmp_path, database_url=cluster.url)
    output = json_log("info")
    stack = LocalStack(
        EXAMPLE_PERSONAS, settings=dataclasses.replace(shared, data_dir=tmp_path / "a")
    )
    browsers = []
    try:
        await stack.start()
        browsers = [await sign_in(stack.base_url) for _ in range(3)]
        (gone, gone_cookie, gone_csrf), (_, kept_cookie, _), (late, late_cookie, late_csrf) = (
            browsers
        )
        await sign_out(gone, gone_csrf)

        cluster.stop()
        await asyncio.sleep(FRESH_SECONDS)  # what was read is stale: the next request reads
        assert await access(stack.base_url, gone_cookie) == SIGNED_OUT  # known: in force
        assert await access(stack.base_url, kept_cookie) == SIGNED_IN  # not locked out
        await sign_out(late, late_csrf)  # cannot be stored: in force here all the same
        assert await access(stack.base_url, late_cookie) == SIGNED_OUT

        cluster.start()
        # The database back, the sign-out made meanwhile is written at the next read: another
        # instance, started now, refuses that session.
        async with asyncio.timeout(15):
            while "console_revocations_readable" not in output.getvalue():
                await access(stack.base_url, kept_cookie)
                await asyncio.sleep(0.2)
        other = LocalStack(
            EXAMPLE_PERSONAS, settings=dataclasses.replace(shared, data_dir=tmp_path / "b")
        )
        async with other:
            assert await access(other.base_url, late_cookie) == SIGNED_OUT
            assert await access(other.base_url, gone_cookie) == SIGNED_OUT
            assert await access(other.base_url, kept_cookie) == SIGNED_IN
    finally:
        for http, _, _ in browsers:
            await http.close()
        await stack.close()
    written = output.getvalue()
    assert written.count("console_revocations_unreadable") == 1  # said once per outage
    assert "console_revocation_kept_in_memory" in written


async def test_sign_out_everywhere_while_the_database_is_away_reaches_the_other_instance_unasked(
    stoppable_postgres, tmp_path, json_log
):
    """After "sign out everywhere" the operator's browser has no cookie: no request need come to
    the instance that made it. Written in the background once the database is back, it holds
    on the other instance, where a stolen copy of the cookie is used, within seconds."""
    cluster = stoppable_postgres
    shared = console_settings(EXAMPLE_PERSONAS, tmp_path, database_url=cluster.url)
    output = json_log("info")
    stacks = [
        LocalStack(EXAMPLE_PERSONAS, settings=dataclasses.replace(shared, data_dir=tmp_path / n))
        for n in ("a", "b")
    ]
    browser = None
    try:
        for stack in stacks:
            await stack.start()
        a, b = (stack.base_url for stack in stacks)
        browser, cookie, csrf = await sign_in(a)
        assert await access(b, cookie) == SIGNED_IN
        cluster.stop()
        await sign_out(browser, csrf, "/console/logout-everywhere")  # on a, kept in its memory
        assert await access(b, cookie) == SIGNED_IN  # b cannot know it yet (and locks no one out)
        cluster.start()
        # Nothing reaches a from now on; b reads the database as requests come to it. Each
        # instance asks the database again AWAY_SECONDS after its last failed round trip at
        # most; then a's next try, then b's next read (measured: 8 s).
        bound = AWAY_SECONDS + RETRY_MAX_SECONDS + FRESH_SECONDS + 2 * ROUND_TRIP_SECONDS + 1
        async with asyncio.timeout(bound):
            while await access(b, cookie) != SIGNED_OUT:
                await asyncio.sleep(0.2)
    finally:
        if browser is not None:
            await browser.close()
        for stack in stacks:
            await stack.close()
    written = output.getvalue()
    assert "console_revocation_kept_in_memory" in written
    assert written.count("console_revocations_stored") == 1  # said once, when it got there
    assert "console_revocations_not_stored" not in written


async def test_a_revocation_kept_in_memory_is_written_at_shutdown(tmp_path):
    keys = ConsoleKeys(PASSWORD, SECRET)
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    revocations = SessionRevocations(SQLiteRevocations.in_data_dir(blocked))
    session = keys.session(keys.new_session(time.time()), time.time())
    assert session is not None
    assert await revocations.revoke(session) is False
    blocked.unlink()
    blocked.mkdir()
    await revocations.close()  # at once: before a retry in the background, and no read
    again = SessionRevocations(SQLiteRevocations.in_data_dir(blocked))
    await again.fresh()
    assert again.revoked(session)
    await again.close()


async def test_a_silent_database_holds_a_console_request_no_longer_than_its_budget(
    stoppable_postgres, tmp_path
):
    cluster = stoppable_postgres
    settings = console_settings(EXAMPLE_PERSONAS, tmp_path / "a", database_url=cluster.url)
    browsers = []
    async with LocalStack(EXAMPLE_PERSONAS, settings=settings) as stack:
        try:
            browsers = [await sign_in(stack.base_url) for _ in range(2)]
            (gone, gone_cookie, gone_csrf), (_, kept_cookie, _) = browsers
            await sign_out(gone, gone_csrf)
            cluster.pause()  # answers nothing: a database host that vanished
            try:
                await asyncio.sleep(FRESH_SECONDS)
                started = time.monotonic()
                assert await access(stack.base_url, kept_cookie) == SIGNED_IN
                assert await access(stack.base_url, gone_cookie) == SIGNED_OUT
                # One round trip's budget at most, once: then the database counts as away.
                assert time.monotonic() - started < ROUND_TRIP_SECONDS + 1
            finally:
                cluster.resume()
        finally:
            for http, _, _ in browsers:
                await http.close()
