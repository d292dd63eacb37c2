"""Stream tokens, TwiML and signatures, checked with the real `twilio` library."""

import xml.etree.ElementTree as ET

from twilio.request_validator import HMAC_SHA256, RequestValidator

from phoneagent.twilio.wire.signature import signature_problem
from phoneagent.twilio.wire.token import STREAM_TOKEN_SECONDS, StreamToken
from phoneagent.twilio.wire.twiml import (
    apology_twiml,
    connect_stream_twiml,
    hangup_twiml,
    stream_parameter,
)

NOW = 1_800_000_000.0


def test_token_round_trip_and_its_refusals():
    tokens = StreamToken("auth-token")
    token = tokens.issue("CA1", "dental", now=NOW)
    assert tokens.check(token, "CA1", "dental", now=NOW + 1) == ""
    assert tokens.check(token, "CA2", "dental", now=NOW) == (
        "token does not match this call and persona"
    )
    assert tokens.check(token, "CA1", "pizza", now=NOW) != ""
    assert tokens.check(token, "CA1", "dental", now=NOW + STREAM_TOKEN_SECONDS + 1) == (
        "token expired"
    )
    assert StreamToken("other-token").check(token, "CA1", "dental", now=NOW) != ""
    assert tokens.check("", "CA1", "dental") == "malformed token"
    assert tokens.check("abc.def", "CA1", "dental") == "malformed token"
    # Moving the expiry forward breaks the MAC.
    expires, sig = token.split(".")
    assert tokens.check(f"{int(expires) + 999}.{sig}", "CA1", "dental", now=NOW) != ""


def test_connect_stream_twiml_is_what_twilio_expects():
    text = connect_stream_twiml(
        "wss://voice.example.com/twilio/stream",
        "https://voice.example.com/twilio/stream-status",
        {"persona": "sales & support", "token": "123.abc"},
        "https://voice.example.com/twilio/stream-ended?persona=dental",
    )
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?><Response>')
    root = ET.fromstring(text)
    stream = root.find("./Connect/Stream")
    assert stream.get("url") == "wss://voice.example.com/twilio/stream"
    assert stream.get("statusCallback") == "https://voice.example.com/twilio/stream-status"
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params == {"persona": "sales & support", "token": "123.abc"}
    # Nothing after </Connect>: when the stream ends, Twilio asks the action what comes next.
    assert list(root) == [root.find("Connect")]
    assert root.find("Connect").get("action") == (
        "https://voice.example.com/twilio/stream-ended?persona=dental"
    )


def test_a_stream_parameter_is_read_back_from_our_twiml_only():
    text = connect_stream_twiml(
        "wss://voice.example.com/twilio/stream",
        "https://voice.example.com/twilio/stream-status",
        {"persona": "sales & support", "token": "123.abc"},
        "https://voice.example.com/twilio/stream-ended",
    )
    assert stream_parameter(text, "token") == "123.abc"
    assert stream_parameter(text, "persona") == "sales & support"
    assert stream_parameter(text, "resume") is None
    assert stream_parameter(hangup_twiml(), "token") is None  # not a stream
    assert stream_parameter("<Response><Connect>", "token") is None  # not XML


def test_apology_twiml_says_and_hangs_up():
    root = ET.fromstring(apology_twiml("Sorry."))
    assert [(el.tag, el.text) for el in root] == [("Say", "Sorry."), ("Hangup", None)]


def signature_is_valid(auth_token, url, params, signature, settings="", shared_key=""):
    problem = signature_problem(
        url, params, signature, settings, auth_token=auth_token, shared_key=shared_key
    )
    return problem == ""


def test_signature_checked_like_twilio():
    url = "https://voice.example.com/twilio/voice"
    params = {"CallSid": "CA1", "To": "+14155550100"}
    good = RequestValidator("secret").compute_signature(url, params)
    assert signature_is_valid("secret", url, params, good)
    assert not signature_is_valid("secret", url, params | {"To": "+1"}, good)
    assert not signature_is_valid("wrong", url, params, good)
    assert not signature_is_valid("secret", url, params, "")
    ws_url = "wss://voice.example.com/twilio/stream"
    assert signature_is_valid(
        "secret", ws_url, {}, RequestValidator("secret").compute_signature(ws_url, {})
    )


SETTINGS_256 = "key=webhooks_sharedkey_123,algorithm=HMAC_SHA256"


def test_a_webhook_rule_signature_is_checked_with_the_shared_key():
    url = "https://voice.example.com/twilio/voice"
    params = {"CallSid": "CA1"}
    by_key = RequestValidator("shared").compute_signature(url, params, HMAC_SHA256)
    by_token = RequestValidator("token").compute_signature(url, params)

    def problem(signature, settings, shared_key="shared"):
        return signature_problem(
            url, params, signature, settings, auth_token="token", shared_key=shared_key
        )

    assert problem(by_key, SETTINGS_256) == ""
    assert problem(by_token, "") == ""  # no rule matched: the auth token, as ever
    assert problem(by_key, "") == "twilio_signature_invalid"
    assert problem(by_token, SETTINGS_256) == "twilio_signature_invalid"
    assert problem(by_key, SETTINGS_256, shared_key="other") == "twilio_signature_invalid"
    assert problem(by_key, SETTINGS_256, shared_key="") == "twilio_signature_shared_key_missing"
    sha1_by_key = RequestValidator("shared").compute_signature(url, params)
    assert problem(sha1_by_key, "key=webhooks_sharedkey_123,algorithm=HMAC_SHA1") == ""
    assert problem(by_key, "key=k,algorithm=HMAC_SHA512") == (
        "twilio_signature_algorithm_unsupported"
    )
