"""Twilio's request signatures (§4 of ``shared/reference/twilio-media-streams.md``): the one
helper every fake in the kit uses to sign, forge or leave out ``X-Twilio-Signature``.

The ``twilio`` library computes the signature: it is the reference implementation of §4.1.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from twilio.request_validator import HMAC_SHA256, SIGNATURE_SETTINGS_HEADER, RequestValidator

__all__ = ["SharedKey", "Signature", "signature_headers", "twilio_signature"]


class Signature(enum.Enum):
    """How to sign a request: honestly, with the wrong key, or not at all (security tests)."""

    VALID = "valid"
    WRONG = "wrong"
    MISSING = "missing"


@dataclass(frozen=True)
class SharedKey:
    """A Webhook Rule's SharedKey: Twilio signs matching webhooks with its secret, in the
    rule's algorithm, and says so in ``X-Twilio-Webhooks-Signature-Settings:
    key=<sid>,algorithm=<algorithm>``; the signed string is the same as with the auth token
    (twilio-python ``request_validator.py`` 9.13; twilio-node
    ``examples/WebhookSignatureValidation.md``)."""

    sid: str
    secret: str = field(repr=False)
    algorithm: str = HMAC_SHA256

    @property
    def settings_header(self) -> str:
        return f"key={self.sid},algorithm={self.algorithm}"


def twilio_signature(
    auth_token: str,
    url: str,
    params: Mapping[str, str] | None = None,
    *,
    algorithm: str | None = None,
) -> str:
    """``X-Twilio-Signature`` for ``url`` and the POST ``params``, computed by the twilio library.

    ``auth_token`` is the secret (a SharedKey's, with its ``algorithm``, default HMAC-SHA1).
    The library is the reference implementation of §4.1; using it keeps the fake honest.
    """
    return RequestValidator(auth_token).compute_signature(url, dict(params or {}), algorithm)


def signature_headers(
    signature: Signature | str,
    auth_token: str,
    url: str,
    params: Mapping[str, str] | None = None,
    *,
    header: str = "X-Twilio-Signature",
    shared_key: SharedKey | None = None,
) -> dict[str, str]:
    """The signature headers for a request, or a forged/absent signature.

    ``signature`` may also be a literal header value, for example one computed over a different
    URL to prove the server checks the URL it published. With ``shared_key``, Twilio signs with
    the key instead of ``auth_token`` and adds the settings header (lowercase names, like
    ``header``, on a WebSocket: §4.3).
    """
    headers = {}
    if shared_key is not None:
        settings_name = SIGNATURE_SETTINGS_HEADER.lower() if header.islower() else None
        headers[settings_name or SIGNATURE_SETTINGS_HEADER] = shared_key.settings_header
    if isinstance(signature, str):
        return headers | {header: signature}
    if signature is Signature.MISSING:
        return headers
    secret = shared_key.secret if shared_key is not None else auth_token
    secret = secret if signature is Signature.VALID else secret + "-wrong"
    algorithm = shared_key.algorithm if shared_key is not None else None
    return headers | {header: twilio_signature(secret, url, params, algorithm=algorithm)}
