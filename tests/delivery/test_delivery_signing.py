"""Standard Webhooks signing: the spec's test vector, an independent verifier, rotation."""

from __future__ import annotations

import base64

import pytest
from delivery_helpers import KEY, SECRET, spec_signature_ok

from phoneagent.delivery.signing import (
    SigningError,
    VerificationError,
    decode_secrets,
    generate_secret,
    sign,
    signature_headers,
    verify,
)

BODY = b'{"schema":1,"id":"evt_1","type":"call.ended"}'


def test_matches_the_reference_libraries_test_vector():
    # From the standard-webhooks repository's Python tests (test_sign_function).
    signature = sign(
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_headers_verify_with_an_independent_implementation():
    headers = signature_headers("evt_abc", BODY, SECRET, timestamp=1_800_000_000)
    assert headers["webhook-id"] == "evt_abc"
    assert headers["webhook-timestamp"] == "1800000000"
    assert spec_signature_ok(BODY, headers, SECRET)
    assert not spec_signature_ok(BODY + b" ", headers, SECRET)


def test_whsec_secret_is_base64_after_the_prefix_and_padding_is_optional():
    assert decode_secrets(SECRET) == [KEY]
    unpadded = "whsec_" + base64.b64encode(b"k" * 31).decode().rstrip("=")
    assert decode_secrets(unpadded) == [b"k" * 31]


def test_plain_secret_is_used_as_utf8_bytes():
    assert decode_secrets("  correct horse battery staple \n") == [b"correct horse battery staple"]
    # Even when it happens to look like base64: we never guess.
    assert decode_secrets("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw") == [
        b"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    ]


def test_two_whsec_secrets_sign_twice_for_rotation():
    new = generate_secret()
    headers = signature_headers("evt_1", BODY, f"{new} {SECRET}", timestamp=1_800_000_000)
    signatures = headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    # A receiver still on the old secret and one already on the new secret both verify.
    assert spec_signature_ok(BODY, headers, SECRET)
    assert spec_signature_ok(BODY, headers, new)


@pytest.mark.parametrize("bad", ["", "   ", "whsec_", "whsec_not*base64!"])
def test_unusable_secrets_are_refused_without_echoing_them(bad):
    with pytest.raises(SigningError) as excinfo:
        sign("evt_1", 1, BODY, bad)
    assert "not*base64" not in str(excinfo.value)


def test_an_id_with_a_dot_is_refused():
    with pytest.raises(SigningError):
        sign("evt.1", 1, BODY, SECRET)


def test_verify_accepts_a_good_request_and_returns_the_id():
    headers = signature_headers("evt_ok", BODY, SECRET, timestamp=1_800_000_000)
    upper = {k.upper(): v for k, v in headers.items()}
    assert verify(BODY, upper, SECRET, now=1_800_000_100) == "evt_ok"
    # Any of several secrets, and unknown signature versions alongside, are fine.
    headers["webhook-signature"] = "v1a,AAAA " + headers["webhook-signature"]
    assert verify(BODY, headers, [generate_secret(), SECRET], now=1_800_000_000) == "evt_ok"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h, b: (h | {"webhook-id": "evt_other"}, b), "no webhook-signature matches"),
        (lambda h, b: (h, b + b"\n"), "no webhook-signature matches"),
        (lambda h, b: ({k: v for k, v in h.items() if k != "webhook-id"}, b), "missing"),
        (lambda h, b: (h | {"webhook-timestamp": "soon"}, b), "not an integer"),
        (lambda h, b: (h | {"webhook-timestamp": "1799999000"}, b), "replay"),
        (lambda h, b: (h | {"webhook-signature": "v1,%%%"}, b), "no webhook-signature matches"),
    ],
)
def test_verify_refuses(change, message):
    headers = signature_headers("evt_1", BODY, SECRET, timestamp=1_800_000_000)
    headers, body = change(headers, BODY)
    with pytest.raises(VerificationError, match=message):
        verify(body, headers, SECRET, now=1_800_000_000)


def test_verify_refuses_the_wrong_secret():
    headers = signature_headers("evt_1", BODY, SECRET, timestamp=1_800_000_000)
    with pytest.raises(VerificationError):
        verify(BODY, headers, generate_secret(), now=1_800_000_000)
