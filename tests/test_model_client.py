"""The model connection's socket (aiohttp's client WebSocket) against the fake StepFun server:
one HTTP session for every call and no cap on concurrent sessions, a session lost or closed,
frames the model should not send, proxies from the environment, and the HTTP session closed
when the server stops."""

import asyncio
import json

import pytest
from aiohttp import web
from conftest import EXAMPLE_PERSONAS

from phoneagent.realtime import connection
from phoneagent.realtime.base import AppendAudio, SessionConfig
from phoneagent.realtime.connection import (
    ModelConnectionLost,
    ModelConnector,
    ModelUnavailable,
    Prewarmer,
    model_proxy,
)
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.stack import LocalStack

CONFIG = SessionConfig("Be brief.", "linjiajiejie", 600, 300, 1000)
PROXY_VARIABLES = ("http_proxy", "https_proxy", "ws_proxy", "wss_proxy", "all_proxy", "no_proxy")


@pytest.fixture
async def fake():
    async with FakeRealtimeServer() as fake:
        yield fake


@pytest.fixture
def no_proxy_env(monkeypatch):
    """No proxy variable from the machine running the tests, in either case."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def connector_for(fake, **overrides):
    options = {"url": fake.url, "api_key": "test-key", "model": "stepaudio-2.5-realtime"}
    return ModelConnector(**(options | overrides))


async def test_150_sessions_open_at_once_through_one_http_session(fake):
    """aiohttp's default connector allows 100 connections: the 101st call would wait for one
    to end. The connector has no such cap, and makes one HTTP session for all of them."""
    connector = connector_for(fake)
    async with asyncio.timeout(30):
        sessions = await asyncio.gather(*(connector.open(CONFIG) for _ in range(150)))
    http = connector._http
    assert http is not None and fake.sessions_open == 150
    assert len({s.session_id for s in sessions}) == 150
    await sessions[0].send(AppendAudio(b"\x00" * 960))  # all usable, the first included
    await asyncio.gather(*(s.close() for s in sessions))
    await fake.wait_for(lambda: fake.sessions_open == 0, 10)
    assert connector._http is http  # the same HTTP session throughout
    await connector.close()
    assert http.closed and connector._http is None


async def test_a_closed_connector_opens_again_with_a_new_http_session(fake):
    connector = connector_for(fake)
    await (await connector.open(CONFIG)).close()
    await connector.close()
    session = await connector.open(CONFIG)
    assert not session.closed
    await session.close()
    await connector.close()


async def test_a_session_the_model_drops_ends_events_quietly_and_refuses_sends(fake):
    connector = connector_for(fake)
    session = await connector.open(CONFIG)
    [fake_session] = fake.sessions
    fake_session.drop()  # TCP aborted, no close frame
    async with asyncio.timeout(5):
        assert [e async for e in session.events()] == []
    assert session.closed
    with pytest.raises(ModelConnectionLost):
        await session.send(AppendAudio(b"\x00" * 960))
    await connector.close()


async def test_a_session_the_model_closes_ends_events_quietly(fake):
    connector = connector_for(fake)
    session = await connector.open(CONFIG)
    # Every session closed with 1001, going away. The fake waits for our answer to its close,
    # which the session gives as it reads (as a call's pump does, all along).
    closing = asyncio.create_task(fake.close())
    async with asyncio.timeout(5):
        assert [e async for e in session.events()] == []
        await closing
    assert session.closed
    with pytest.raises(ModelConnectionLost):
        await session.send(AppendAudio(b"\x00" * 960))
    await connector.close()


async def test_sending_on_a_session_we_closed_is_a_lost_session(fake):
    """ModelConnectionLost is a ConnectionError: the shell's way of hearing the model left."""
    connector = connector_for(fake)
    session = await connector.open(CONFIG)
    await session.close()
    assert session.closed
    with pytest.raises(ConnectionError):
        await session.send(AppendAudio(b"\x00" * 960))
    await connector.close()


async def test_a_model_that_ignores_our_close_is_cut_after_close_seconds(fake, monkeypatch):
    monkeypatch.setattr(connection, "CLOSE_SECONDS", 0.3)
    connector = connector_for(fake)
    session = await connector.open(CONFIG)
    [fake_session] = fake.sessions
    fake_session._ws.transport.pause_reading()  # the fake hears nothing more: no close answer
    started = asyncio.get_running_loop().time()
    await session.close()
    assert asyncio.get_running_loop().time() - started < 1
    assert session.closed
    await connector.close()
    fake_session._ws.transport.resume_reading()  # the fake hears the cut: it closes at once


async def test_a_set_up_cancelled_cuts_the_connection_at_once(aiohttp_server):
    """The set-up budget ran out (Prewarmer.claim cancels the open): the connection is cut, not
    closed with a handshake the silent model would never answer (nor left open)."""
    gone = asyncio.Event()

    async def silent_model(request):  # upgrades, then says nothing: no session.created
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            async for _ in ws:
                pass
        finally:  # the handler may also be cancelled when the connection is lost
            gone.set()
        return ws

    app = web.Application()
    app.router.add_get("/v1/realtime", silent_model)
    server = await aiohttp_server(app)
    connector = ModelConnector(str(server.make_url("/v1/realtime")), "k", "stepaudio-2.5-realtime")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await connector.open(CONFIG)
    async with asyncio.timeout(0.5):  # well within CLOSE_SECONDS
        await gone.wait()
    await connector.close()


async def test_a_binary_frame_holding_json_is_decoded_as_a_text_one(fake):
    """StepFun's events are JSON text frames; a binary one is decoded as UTF-8 JSON, as the
    websockets client did."""
    connector = connector_for(fake)
    session = await connector.open(CONFIG)
    [fake_session] = fake.sessions
    event = {"type": "input_audio_buffer.speech_started", "item_id": "i1", "audio_start_ms": 40}
    await fake_session._ws.send(json.dumps(event).encode())  # bytes: a binary frame
    await fake_session._ws.send(b"\xff\xfe not json")  # malformed: logged and skipped
    await fake_session._ws.send(json.dumps(event | {"item_id": "i2"}))
    events = session.events()
    async with asyncio.timeout(5):
        first, second = await anext(events), await anext(events)
    assert (first.item_id, second.item_id) == ("i1", "i2")
    await events.aclose()
    await session.close()
    await connector.close()


async def test_a_message_over_the_size_limit_ends_the_session(fake, monkeypatch):
    monkeypatch.setattr(connection, "MAX_MESSAGE_BYTES", 64 * 1024)
    connector = connector_for(fake)
    session = await connector.open(CONFIG)
    [fake_session] = fake.sessions
    big = {"type": "response.audio.delta", "item_id": "i1", "delta": "AAAA" * 20_000}
    await fake_session._ws.send(json.dumps(big))
    async with asyncio.timeout(5):
        assert [e async for e in session.events()] == []
    assert session.closed
    await fake.wait_for(lambda: fake.sessions_open == 0)
    assert fake_session.close_code == 1009  # message too big
    await connector.close()


async def test_the_prewarmer_closes_its_connectors_http_session(fake):
    prewarmer = Prewarmer(connector_for(fake))
    prewarmer.start("CA1", CONFIG)
    session = await prewarmer.claim("CA1", CONFIG)
    http = prewarmer.connector._http
    await session.close()
    await prewarmer.close()
    assert http is not None and http.closed


async def test_the_server_closes_the_model_http_session_when_it_stops():
    stack = LocalStack(EXAMPLE_PERSONAS, model=FakeRealtimeServer(speed=None))
    async with stack, stack.caller(to="+14155550100", speed=0) as caller:
        await caller.dial()
        await caller.connect()
        await caller.wait_for_event("media", timeout=10)
        connector = stack.state.prewarmer.connector
        http = connector._http
        assert http is not None and not http.closed
        await caller.hangup()
    assert http.closed


# -- proxies, as the websockets client read them from the environment ----------------------------


@pytest.mark.parametrize(
    ("url", "env", "expected"),
    [
        ("wss://api.stepfun.com/v1/realtime", {}, None),
        ("wss://api.stepfun.com/v1/realtime", {"https_proxy": "http://p:3128"}, "http://p:3128"),
        ("wss://api.stepfun.com/v1/realtime", {"http_proxy": "http://p:3128"}, None),
        (
            "wss://api.stepfun.com/v1/realtime",
            {"https_proxy": "http://p:3128", "wss_proxy": "http://w:3128"},
            "http://w:3128",
        ),
        ("ws://127.0.0.1:9/v1/realtime", {"http_proxy": "http://p:3128"}, "http://p:3128"),
        (
            "ws://127.0.0.1:9/v1/realtime",
            {"ws_proxy": "http://w:1", "http_proxy": "http://p:2"},
            "http://w:1",
        ),
        (
            "wss://api.stepfun.com/v1/realtime",
            {"https_proxy": "http://p:3128", "no_proxy": ".stepfun.com"},
            None,
        ),
    ],
)
def test_the_proxy_comes_from_the_environment(no_proxy_env, url, env, expected):
    for name, value in env.items():
        no_proxy_env.setenv(name, value)
    assert model_proxy(url) == expected


def test_a_socks_proxy_is_refused_rather_than_bypassed(no_proxy_env):
    no_proxy_env.setenv("https_proxy", "socks5h://p:1080")
    with pytest.raises(ValueError, match="SOCKS"):
        model_proxy("wss://api.stepfun.com/v1/realtime")


async def test_the_environments_proxy_is_used_and_no_proxy_is_honoured(fake, no_proxy_env):
    no_proxy_env.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    connector = connector_for(fake, open_timeout=3)
    with pytest.raises(ModelUnavailable, match="cannot connect"):
        await connector.open(CONFIG)
    assert fake.handshakes == []  # the model was not reached around the proxy
    no_proxy_env.setenv("no_proxy", "127.0.0.1")
    session = await connector.open(CONFIG)
    await session.close()
    await connector.close()


async def test_a_socks_proxy_makes_the_model_unavailable_with_a_clear_reason(fake, no_proxy_env):
    no_proxy_env.setenv("all_proxy", "socks5://127.0.0.1:1080")  # getproxies() names it "all"
    no_proxy_env.setenv("ws_proxy", "socks5://127.0.0.1:1080")
    connector = connector_for(fake)
    with pytest.raises(ModelUnavailable, match="SOCKS"):
        await connector.open(CONFIG)
    await connector.close()
