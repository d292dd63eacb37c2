"""Twilio's request signatures: is this request Twilio's?

Checked with the ``twilio`` library's validator against the configured public URL, never
against the URL as a proxy may have rewritten it (twilio reference, section 4).
"""

from __future__ import annotations

from collections.abc import Mapping

from twilio.request_validator import (
    HMAC_SHA1,
    HMAC_SHA256,
    RequestValidator,
    get_signature_algorithm,
)

# Why a request's signature was refused: the log event names.
SIGNATURE_INVALID = "twilio_signature_invalid"
SHARED_KEY_MISSING = "twilio_signature_shared_key_missing"
ALGORITHM_UNSUPPORTED = "twilio_signature_algorithm_unsupported"


def signature_problem(
    url: str,
    params: Mapping[str, str] | object,
    signature: str,
    signature_settings: str,
    *,
    auth_token: str,
    shared_key: str = "",
) -> str:
    """'' when ``signature`` is Twilio's for ``url`` and the form ``params``, else why not (a
    log event name).

    Without the ``X-Twilio-Webhooks-Signature-Settings`` header Twilio signed with the auth
    token (HMAC-SHA1). With it, a Webhook Rule matched and Twilio signed with the rule's
    SharedKey secret, in the header's algorithm; only the key changes, not the signed string.
    ``params`` may be aiohttp's MultiDictProxy: the validator reads repeated keys from it.
    """
    secret, algorithm = auth_token, HMAC_SHA1
    if signature_settings.strip():
        algorithm = get_signature_algorithm(signature_settings)
        if algorithm.upper() not in (HMAC_SHA1, HMAC_SHA256):
            return ALGORITHM_UNSUPPORTED
        if not shared_key:
            return SHARED_KEY_MISSING
        secret = shared_key
    if not signature or not RequestValidator(secret).validate(url, params, signature, algorithm):
        return SIGNATURE_INVALID
    return ""
