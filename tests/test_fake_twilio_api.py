"""The fake Twilio REST API, driven by the real ``twilio`` async client (reference §5.1)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from twilio.base.exceptions import TwilioRestException
from twilio.twiml.voice_response import VoiceResponse

from phoneagent.testing.caller import TwilioCaller
from phoneagent.testing.fake_twilio_api import FakeTwilioApi

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "test-auth-token"
CALL_SID = "CA" + "a" * 32
# twilio 9.x's async client still passes aiohttp's deprecated BasicAuth: not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:BasicAuth is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The 'auth' parameter is deprecated:DeprecationWarning"),
]
DIAL = '<Response><Dial action="https://voice.example.com/dial-done">+15550002222</Dial></Response>'


@pytest.fixture
async def api():
    async with FakeTwilioApi(ACCOUNT_SID, AUTH_TOKEN) as fake:
        yield fake


@pytest.fixture
async def client(api):
    client = api.client()
    yield client
    await client.http_client.close()


async def rest_error(call) -> TwilioRestException:
    with pytest.raises(TwilioRestException) as raised:
        await call
    return raised.value


async def test_the_real_client_replaces_a_calls_twiml(api, client):
    call = await client.calls(CALL_SID).update_async(twiml=DIAL)

    assert (call.sid, call.account_sid, call.status) == (CALL_SID, ACCOUNT_SID, "in-progress")
    assert call.date_created is not None  # RFC 2822 dates parse in the library
    assert call.uri == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{CALL_SID}.json"
    (update,) = api.updates
    assert update.params == {"Twiml": DIAL}
    assert update.ok and update.ends_stream
    assert api.calls[CALL_SID].twiml == DIAL
    assert api.requests[0].path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{CALL_SID}.json"


async def test_completing_a_call_ends_it_and_later_updates_get_21220(api, client):
    call = await client.calls(CALL_SID).update_async(status="completed")
    assert call.status == "completed" and call.end_time is not None

    error = await rest_error(client.calls(CALL_SID).update_async(twiml=DIAL))
    assert (error.status, error.code) == (400, 21220)
    assert "Call is not in-progress" in error.msg
    assert [u.error_code for u in api.updates] == [None, 21220]


async def test_a_call_that_ended_on_twilios_side_refuses_updates(api, client):
    api.add_call(CALL_SID)
    api.end_call(CALL_SID)
    error = await rest_error(client.calls(CALL_SID).update_async(url="https://x.example/t"))
    assert error.code == 21220


async def test_ended_call_error_is_configurable():
    async with FakeTwilioApi(ACCOUNT_SID, AUTH_TOKEN, ended_call_error=None) as api:
        client = api.client()
        api.add_call(CALL_SID, status="completed")
        call = await client.calls(CALL_SID).update_async(status="completed")
        assert call.status == "completed"
        await client.http_client.close()


async def test_fetch_returns_the_call(api, client):
    api.add_call(CALL_SID, from_="+14155550100", to="+15550001111")
    call = await client.calls(CALL_SID).fetch_async()
    assert (call._from, call.to, call.direction) == ("+14155550100", "+15550001111", "inbound")


async def test_wrong_credentials_get_twilios_401(api):
    client = api.client()
    client.password = "not-the-token"
    client.auth = (client.username, client.password)
    error = await rest_error(client.calls(CALL_SID).update_async(twiml=DIAL))
    await client.http_client.close()
    assert (error.status, error.code) == (401, 20003)
    assert api.updates[0].error_code == 20003
    assert CALL_SID not in api.calls


async def test_error_body_has_twilios_json_shape(api):
    url = f"{api.base_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{CALL_SID}.json"
    async with aiohttp.ClientSession() as session, session.post(url, data={"Twiml": DIAL}) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == 'Basic realm="Twilio API"'
        assert await r.json() == {
            "code": 20003,
            "message": "Authenticate",
            "more_info": "https://www.twilio.com/docs/errors/20003",
            "status": 401,
        }


@pytest.mark.parametrize(
    ("options", "code"),
    [
        ({"twiml": DIAL, "url": "https://voice.example.com/next"}, 21200),
        ({"twiml": "<Response><Say>" + "a" * 4000 + "</Say></Response>"}, 32018),
        ({"twiml": '<Response><Dial action="/dial-done">+15550002222</Dial></Response>'}, 15004),
        ({"twiml": "<Response><Dial>"}, 12100),
        ({"status": "paused"}, 20001),
    ],
)
async def test_invalid_updates_are_refused_like_twilio(api, client, options, code):
    error = await rest_error(client.calls(CALL_SID).update_async(**options))
    assert (error.status, error.code) == (400, code)
    assert api.calls[CALL_SID].twiml is None
    assert not api.updates[0].ends_stream


async def test_twiml_of_exactly_4000_characters_is_accepted(api, client):
    twiml = "<Response><Say>" + "a" * (4000 - 32) + "</Say></Response>"
    assert len(twiml) == 4000
    await client.calls(CALL_SID).update_async(twiml=twiml)


async def test_unknown_calls_and_accounts_are_404():
    async with FakeTwilioApi(ACCOUNT_SID, AUTH_TOKEN, auto_create_calls=False) as api:
        client = api.client()
        error = await rest_error(client.calls(CALL_SID).update_async(twiml=DIAL))
        assert (error.status, error.code) == (404, 20404)
        api.add_call(CALL_SID)
        await client.calls(CALL_SID).update_async(twiml=DIAL)
        other = client.api.v2010.accounts("AC" + "9" * 32).calls(CALL_SID)
        error = await rest_error(other.update_async(twiml=DIAL))
        assert error.status == 404
        await client.http_client.close()


async def test_cancel_does_not_touch_an_in_progress_call(api, client):
    call = await client.calls(CALL_SID).update_async(status="canceled")
    assert call.status == "in-progress"
    assert not api.updates[0].ends_stream
    api.add_call("CA" + "b" * 32, status="ringing")
    call = await client.calls("CA" + "b" * 32).update_async(status="canceled")
    assert call.status == "canceled"


async def test_injected_failures_then_recovery(api, client):
    api.fail_next(2, status=503, code=20503, message="Service Unavailable")
    for _ in range(2):
        error = await rest_error(client.calls(CALL_SID).update_async(twiml=DIAL))
        assert (error.status, error.code) == (503, 20503)
    call = await client.calls(CALL_SID).update_async(twiml=DIAL)
    assert call.status == "in-progress"
    assert [u.status for u in api.updates] == [503, 503, 200]


async def test_a_held_request_lets_the_client_time_out(api, client):
    # AsyncTwilioHttpClient(timeout=…) is not applied to its aiohttp requests (twilio 9.x), so
    # a caller must bound REST calls itself, for example with asyncio.timeout.
    api.delay_next(seconds=5.0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await client.calls(CALL_SID).update_async(twiml=DIAL)
    call = await client.calls(CALL_SID).update_async(twiml=DIAL)  # the next one is not held
    assert call.status == "in-progress"


async def test_hooks_see_every_update(api, client):
    seen = []
    api.on_update(CALL_SID, seen.append)
    await client.calls(CALL_SID).update_async(twiml=DIAL)
    await rest_error(client.calls(CALL_SID).update_async(status="paused"))
    await api.settle()
    assert [(u.status, u.ends_stream) for u in seen] == [(200, True), (400, False)]
    assert len(await api.wait_for_updates(2, timeout=1)) == 2


# -- the media stream stops when the TwiML is replaced (§5.1, §7) ------------------------------


class StreamServer:
    """Just enough of a bridge to hold a media stream open and record what Twilio sends."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.closed = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/twilio/voice", self.voice)
        app.router.add_get("/twilio/stream", self.stream)
        return app

    async def voice(self, request: web.Request) -> web.Response:
        response = VoiceResponse()
        response.connect().stream(url=f"ws://{request.host}/twilio/stream")
        return web.Response(text=str(response), content_type="text/xml")

    async def stream(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                self.events.append(json.loads(msg.data)["event"])
        self.closed.set()
        return ws


@pytest.mark.parametrize("update", [{"twiml": DIAL}, {"status": "completed"}])
async def test_attached_caller_gets_stop_then_close(api, client, aiohttp_server, update):
    bridge = StreamServer()
    server = await aiohttp_server(bridge.app())
    async with TwilioCaller(
        str(server.make_url("")), account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, to="+15550001111"
    ) as caller:
        await caller.dial()
        await caller.connect()
        api.attach(caller)

        await client.calls(caller.call_sid).update_async(**update)
        await asyncio.wait_for(bridge.closed.wait(), 10)
        await api.settle()

        assert bridge.events == ["connected", "start", "stop"]
        assert caller.closed and caller.ended_by == "rest_update"
        assert not caller.closed_by_server


async def test_attached_caller_keeps_its_stream_on_a_refused_update(api, client, aiohttp_server):
    bridge = StreamServer()
    server = await aiohttp_server(bridge.app())
    async with TwilioCaller(
        str(server.make_url("")), account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, to="+15550001111"
    ) as caller:
        await caller.dial()
        await caller.connect()
        api.attach(caller)
        await rest_error(client.calls(caller.call_sid).update_async(twiml="<Response>"))
        await api.settle()
        assert not caller.closed


# --- Account and IncomingPhoneNumbers (what `phoneagent doctor` reads) -------------------------


async def test_account_fetch_and_numbers_list_through_the_real_client():
    sid, token = "AC" + "ab" * 16, "token-" + "cd" * 8
    async with FakeTwilioApi(sid, token) as api:
        api.account_type = "Trial"
        api.add_number("+14155550100", voice_url="https://voice.example.com/twilio/voice")
        api.add_number("+14155550142", voice_method="GET")
        client = api.client()
        try:
            account = await client.api.v2010.accounts(sid).fetch_async()
            exact = await client.incoming_phone_numbers.list_async(phone_number="+14155550100")
            # Twilio's filter matches partial numbers, with * for any digit.
            partial = await client.incoming_phone_numbers.list_async(phone_number="55501*")
            none = await client.incoming_phone_numbers.list_async(phone_number="+19999999999")
        finally:
            await client.http_client.close()
    assert (account.sid, account.status, account.type) == (sid, "active", "Trial")
    assert [(n.phone_number, n.voice_url, n.voice_method) for n in exact] == [
        ("+14155550100", "https://voice.example.com/twilio/voice", "POST")
    ]
    assert exact[0].sid.startswith("PN") and exact[0].voice_application_sid is None
    assert sorted(n.phone_number for n in partial) == ["+14155550100", "+14155550142"]
    assert none == []


async def test_account_fetch_with_a_wrong_token_is_401():
    sid = "AC" + "ab" * 16
    async with FakeTwilioApi(sid, "old-token") as api:
        client = api.client()
        api.auth_token = "rotated-token"  # the account's token changed; the client's did not
        try:
            with pytest.raises(TwilioRestException) as caught:
                await client.api.v2010.accounts(sid).fetch_async()
        finally:
            await client.http_client.close()
    assert (caught.value.status, caught.value.code) == (401, 20003)
