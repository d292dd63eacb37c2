"""The fake Twilio REST API's Calls create (outbound calls), driven by the real ``twilio``
client and by raw requests, checked against Twilio's documented sample response
(tests/fixtures/twilio/call-create-response.json) and its documented refusals."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from twilio.base.exceptions import TwilioRestException

from phoneagent.testing.fake_twilio_api import FakeTwilioApi
from phoneagent.testing.twilio_signing import twilio_signature

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "test-auth-token"
FROM, TO = "+14155550100", "+14155550177"
URL = "https://voice.example.com/answer"
SAMPLE = Path(__file__).parent / "fixtures" / "twilio" / "call-create-response.json"
pytestmark = [
    pytest.mark.filterwarnings("ignore:BasicAuth is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The 'auth' parameter is deprecated:DeprecationWarning"),
]


@pytest.fixture
async def api():
    async with FakeTwilioApi(ACCOUNT_SID, AUTH_TOKEN) as fake:
        fake.add_number(FROM)
        yield fake


@pytest.fixture
async def client(api):
    client = api.client()
    yield client
    await client.http_client.close()


async def create(api, form: dict | list, *, auth=(ACCOUNT_SID, AUTH_TOKEN)) -> tuple[int, dict]:
    url = f"{api.base_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=form, auth=aiohttp.BasicAuth(*auth)) as response,
    ):
        return response.status, await response.json()


async def test_the_real_client_creates_a_call_shaped_as_twilio_documents(api, client):
    call = await client.calls.create_async(
        to=TO, from_=FROM, url=URL, status_callback="https://voice.example.com/status",
        status_callback_event=["initiated", "answered"], machine_detection="Enable",
    )  # fmt: skip
    assert call.sid.startswith("CA") and len(call.sid) == 34
    assert (call.status, call.direction, call.to, call._from) == (
        "queued", "outbound-api", TO, FROM
    )  # fmt: skip
    (created,) = api.created
    assert created.status == 201
    assert created.status_callback_events == ["initiated", "answered"]
    assert created.params["MachineDetection"] == "Enable"
    # Every field of Twilio's documented sample, and nothing it does not have.
    status, body = await create(api, {"To": TO, "From": FROM, "Url": URL})
    sample = json.loads(SAMPLE.read_text())
    assert status == 201
    assert set(body) == set(sample)
    assert set(body["subresource_uris"]) == set(sample["subresource_uris"])
    assert body["uri"] == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{body['sid']}.json"


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({"From": FROM, "Url": URL}, 21201),  # no To
        ({"To": TO, "Url": URL}, 21213),  # no From
        ({"To": TO, "From": FROM}, 21205),  # no Url, Twiml or ApplicationSid
        ({"To": TO, "From": FROM, "Url": "/answer"}, 21205),  # not an absolute URL
        ({"To": "4155550177", "From": FROM, "Url": URL}, 21211),  # not E.164
        ({"To": TO, "From": "+1 415 555", "Url": URL}, 21212),
        ({"To": TO, "From": "+14155550999", "Url": URL}, 21210),  # not the account's
        ({"To": TO, "From": FROM, "Url": URL, "Twiml": "<Response/>"}, 21200),
        ({"To": TO, "From": FROM, "Url": URL, "MachineDetection": "Yes"}, 21200),
        ({"To": TO, "From": FROM, "Url": URL, "StatusCallbackEvent": "hangup"}, 21200),
    ],
)
async def test_refusals_are_twilios_codes(api, form, code):
    status, body = await create(api, form)
    assert (status, body["code"]) == (400, code)
    assert body["more_info"] == f"https://www.twilio.com/docs/errors/{code}"
    assert api.calls == {}


async def test_other_endpoints_and_verified_caller_ids_are_accepted(api):
    api.verify_caller_id("+14155550111")
    for to, from_ in (
        ("sip:front@example.com", FROM),
        ("client:alice", FROM),
        (TO, "+14155550111"),
    ):
        status, _ = await create(api, {"To": to, "From": from_, "Twiml": "<Response/>"})
        assert status == 201


async def test_wrong_credentials_are_refused(api):
    status, body = await create(api, {"To": TO, "From": FROM, "Url": URL}, auth=(ACCOUNT_SID, "x"))
    assert (status, body["code"]) == (401, 20003)


async def test_answer_and_finish_call_our_server_signed(api, client):
    """The test controls play Twilio's part: progress callbacks and the Url, signed."""
    seen: list[tuple[str, dict]] = []

    async def record(request: web.Request) -> web.Response:
        form = dict(await request.post())
        url = f"http://{request.host}{request.path_qs}"
        assert request.headers["X-Twilio-Signature"] == twilio_signature(AUTH_TOKEN, url, form)
        seen.append((request.path, form))
        if request.path == "/answer":
            return web.Response(text="<Response><Say>Hi</Say><Hangup/></Response>",
                                content_type="text/xml")  # fmt: skip
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/answer", record)
    app.router.add_post("/status", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        call = await client.calls.create_async(
            to=TO, from_=FROM, url=f"{base}/answer", status_callback=f"{base}/status",
            status_callback_event=["ringing", "answered", "completed"],
            machine_detection="DetectMessageEnd",
        )  # fmt: skip
        async with await api.answer(call.sid, "machine_end_beep") as callee:
            assert callee.answer.says == ["Hi"]
        paths = [(path, form.get("CallStatus"), form.get("AnsweredBy")) for path, form in seen]
        assert paths == [
            ("/status", "ringing", None),
            ("/status", "in-progress", "machine_end_beep"),
            ("/answer", "in-progress", "machine_end_beep"),
            ("/status", "completed", "machine_end_beep"),
        ]
        assert all(form["Direction"] == "outbound-api" for path, form in seen if path == "/status")
        assert seen[2][1]["Direction"] == "outbound-api"
        assert (seen[2][1]["From"], seen[2][1]["To"]) == (FROM, TO)
        assert "CallDuration" in seen[3][1]
        assert api.calls[call.sid].status == "completed"

        busy = await client.calls.create_async(
            to=TO, from_=FROM, url=f"{base}/answer", status_callback=f"{base}/status"
        )
        assert await api.finish(busy.sid, "busy") == 204
        assert seen[-1][1]["CallStatus"] == "busy"
        with pytest.raises(ValueError):
            await api.finish(busy.sid, "ringing")
    finally:
        await runner.cleanup()


async def test_the_client_raises_twilios_error(client):
    with pytest.raises(TwilioRestException) as raised:
        await client.calls.create_async(to="12345", from_=FROM, url=URL)
    assert (raised.value.status, raised.value.code) == (400, 21211)
