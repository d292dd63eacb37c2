"""Twilio signatures over real sockets: the URL as Twilio wrote it, and Webhook Rule SharedKeys.

The test kit signs with the real ``twilio`` library, over the URL exactly as written (twilio
reference, section 4.1); the server checks with the same library.
"""

import dataclasses
import json
import logging

import aiohttp
import pytest
from conftest import EXAMPLE_PERSONAS
from multidict import MultiDict
from twilio.request_validator import RequestValidator
from yarl import URL

from phoneagent.logs import configure_logging
from phoneagent.testing.caller import StreamRejected
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.stack import LocalStack
from phoneagent.testing.twilio_signing import SharedKey, Signature, twilio_signature

DENTAL = "+14155550100"
SHARED_SECRET = "shared-key-secret-value-0123456789"
KEY = SharedKey("webhooks_sharedkey_0123456789abcdef", SHARED_SECRET)


@pytest.fixture
async def model():
    return FakeRealtimeServer(speed=None, script=["Sure."])


@pytest.fixture
async def stack(model):
    async with LocalStack(EXAMPLE_PERSONAS, model=model, webhooks=False) as stack:
        yield stack


def configure_shared_key(stack, secret: str) -> None:
    stack.settings = dataclasses.replace(stack.settings, twilio_webhook_shared_key=secret)
    stack.state.settings = stack.settings


@pytest.fixture
def logs(caplog):
    """The server's log events so far, as the dicts structlog renders."""
    configure_logging("json", "info")

    def read() -> list[dict]:
        return [r.msg for r in caplog.records if isinstance(r.msg, dict)]

    yield read
    logging.getLogger().handlers.clear()


# --- the URL Twilio signed is the one it requested, still percent-encoded ----------------------


@pytest.mark.parametrize(
    "query",
    [
        "from=client%3Aalice&to=%2B14155550100",  # as urlencode writes a <Dial action>
        "from=sip%3Abob%40example.com&persona=bright-smile-dental",
        "reason=call+me+back&note=a%20b%2Bc",  # '+' for a space, an encoded space, an encoded '+'
        "target=front_desk&target=billing&target=front_desk",  # a repeated key
        "x=%7e%7E&y=%C3%A9t%C3%A9",  # lower- and upper-case escapes, UTF-8
    ],
)
async def test_a_query_is_checked_as_twilio_wrote_it(stack, query):
    async with stack.caller(to=DENTAL, speed=0) as caller:
        params = caller.webhook_params("completed")
        path = f"/twilio/call-status?{query}"
        assert (await caller.post_signed(path, params))[0] == 204
        # A signature over the query as aiohttp decodes it is not Twilio's: refused.
        public = stack.state.settings.public_url
        decoded = f"{public}/twilio/call-status?{URL('/?' + query).query_string}"
        if decoded != public + path:
            forged = twilio_signature(stack.settings.twilio_auth_token, decoded, params)
            assert (await caller.post_signed(path, params, forged))[0] == 403


async def test_repeated_form_fields_are_all_signed(stack):
    url = stack.base_url + "/twilio/call-status"
    form = MultiDict([("CallSid", "CA" + "0" * 32), ("Digits", "1 2"), ("Digits", "3+4")])
    signature = RequestValidator(stack.settings.twilio_auth_token).compute_signature(url, form)
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=form, headers={"X-Twilio-Signature": signature}) as r:
            assert r.status == 204
        dropped = MultiDict(list(form.items())[:2])  # the second Digits left out
        async with http.post(url, data=dropped, headers={"X-Twilio-Signature": signature}) as r:
            assert r.status == 403


# --- Webhook Rules: SharedKey signatures -------------------------------------------------------


async def test_a_whole_call_signed_with_a_shared_key(stack, model, logs):
    configure_shared_key(stack, SHARED_SECRET)
    async with stack.caller(to=DENTAL, speed=0, shared_key=KEY) as caller:
        answer = await caller.dial()
        assert answer.ok and answer.stream_url
        assert await caller.post_stream_status("stream-started") == 204
        await caller.connect()
        await caller.wait_until_heard_ms(200, timeout=10)  # the greeting
        await caller.hangup()
    await model.wait_for(lambda: model.sessions_open == 0, 5)  # the call ran to its end
    assert model.sessions_opened == 1
    assert [e["StreamEvent"] for e in stack.state.calls.get(caller.call_sid).twilio_events] == [
        "stream-started"
    ]
    assert SHARED_SECRET not in json.dumps(logs(), default=str)


async def test_the_auth_token_still_signs_beside_a_shared_key(stack):
    configure_shared_key(stack, SHARED_SECRET)
    async with stack.caller(to=DENTAL, speed=0) as caller:  # no Webhook Rule matched
        assert (await caller.dial()).ok
        await caller.connect()
        await caller.wait_until_heard_ms(200, timeout=10)
        await caller.hangup()


async def test_a_shared_key_signature_without_the_key_configured_is_refused(stack, model, logs):
    async with stack.caller(to=DENTAL, speed=0, shared_key=KEY) as caller:
        assert (await caller.dial()).status == 403
        status, _, _ = await caller.post_signed("/twilio/call-status", caller.webhook_params())
        assert status == 403
    async with stack.caller(to=DENTAL, speed=0) as caller:
        await caller.dial()
        caller.shared_key = KEY  # the stream's upgrade signed by a Webhook Rule
        with pytest.raises(StreamRejected):
            await caller.connect()
        assert caller.handshake_status == 403
    events = [e for e in logs() if e["event"] == "twilio_signature_shared_key_missing"]
    assert {e["path"] for e in events} == {
        "/twilio/voice",
        "/twilio/call-status",
        "/twilio/stream",
    }
    assert all("TWILIO_WEBHOOK_SHARED_KEY" in e["fix"] for e in events)
    assert all(KEY.sid in e["signature_settings"] for e in events)
    assert model.sessions_opened == 1  # only the auth-token-signed call


@pytest.mark.parametrize("signature", [Signature.WRONG, Signature.MISSING])
async def test_a_wrong_shared_key_signature_is_refused(stack, model, signature, logs):
    configure_shared_key(stack, SHARED_SECRET)
    async with stack.caller(to=DENTAL, speed=0, shared_key=KEY) as caller:
        assert (await caller.dial(signature=signature)).status == 403
        await caller.dial()  # genuine, so there is a stream to forge
        with pytest.raises(StreamRejected):
            await caller.connect(signature=signature)
        assert caller.handshake_status == 403
    # The auth token in place of the shared key is no better.
    by_token = dataclasses.replace(KEY, secret=stack.settings.twilio_auth_token)
    async with stack.caller(to=DENTAL, speed=0, shared_key=by_token) as caller:
        assert (await caller.dial()).status == 403
    events = [e["event"] for e in logs() if e["event"].startswith("twilio_signature")]
    assert events == ["twilio_signature_invalid"] * 3
    assert SHARED_SECRET not in json.dumps(logs(), default=str)


async def test_an_unknown_signature_algorithm_is_refused(stack, model, logs):
    configure_shared_key(stack, SHARED_SECRET)
    sha512 = dataclasses.replace(KEY, algorithm="HMAC_SHA512")
    async with stack.caller(to=DENTAL, speed=0, shared_key=sha512) as caller:
        signature = twilio_signature(
            SHARED_SECRET, stack.base_url + "/twilio/voice", caller.webhook_params()
        )  # a signature of some kind: the algorithm is what is refused
        assert (await caller.dial(signature=signature)).status == 403
    [event] = [e for e in logs() if e["event"].startswith("twilio_signature")]
    assert event["event"] == "twilio_signature_algorithm_unsupported"
    assert "HMAC_SHA512" in event["signature_settings"]
    assert model.sessions_opened == 0
