"""Voice webhook pieces: Twilio signatures, the stream token, and the TwiML we answer with.

Signatures are checked with the ``twilio`` library's validator against the configured public
URL, never against the URL as a proxy may have rewritten it (twilio reference, section 4).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass

from twilio.request_validator import (
    HMAC_SHA1,
    HMAC_SHA256,
    RequestValidator,
    get_signature_algorithm,
)
from twilio.twiml.voice_response import VoiceResponse

from phoneagent.personas import Persona

STREAM_TOKEN_SECONDS = 120  # Twilio opens the stream right after the TwiML; two minutes is ample
PERSONA_PARAMETER = "persona"
TOKEN_PARAMETER = "token"
CALLER_PARAMETER = "from"
CALLED_PARAMETER = "to"
RESUME_PARAMETER = "resume"  # "<target>:<DialCallStatus>": back from an unanswered transfer


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


@dataclass(frozen=True)
class StreamToken:
    """A short-lived HMAC binding a CallSid to a persona.

    It travels as a ``<Parameter>`` and comes back in the stream's ``start`` message, so any
    instance can take the WebSocket, and nobody can open a stream without a webhook Twilio
    signed. The key is derived from the auth token, which every instance has.
    """

    auth_token: str

    def _key(self) -> bytes:
        return hashlib.sha256(b"phoneagent stream token\x00" + self.auth_token.encode()).digest()

    def _sign(self, call_sid: str, persona_id: str, expires: int) -> str:
        message = f"{call_sid}\x00{persona_id}\x00{expires}".encode()
        digest = hmac.new(self._key(), message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def issue(self, call_sid: str, persona_id: str, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + STREAM_TOKEN_SECONDS)
        return f"{expires}.{self._sign(call_sid, persona_id, expires)}"

    def check(self, token: str, call_sid: str, persona_id: str, now: float | None = None) -> str:
        """'' when the token is good, otherwise why not (for the log, never for the caller)."""
        expires_text, _, signature = token.partition(".")
        if not expires_text.isdigit() or not signature:
            return "malformed token"
        expected = self._sign(call_sid, persona_id, int(expires_text))
        if not hmac.compare_digest(expected, signature):
            return "token does not match this call and persona"
        if int(expires_text) < (time.time() if now is None else now):
            return "token expired"
        return ""

    @staticmethod
    def expiry(token: str) -> float:
        """When a token that passed ``check`` expires (Unix time)."""
        return float(token.partition(".")[0])


def connect_stream_twiml(
    stream_url: str, status_callback_url: str, parameters: Mapping[str, str], action_url: str
) -> str:
    """``<Connect action><Stream>``: a bidirectional media stream. When we close the stream
    while the caller is still on the line, Twilio asks ``action`` what to do next (the call
    would end there otherwise): the apology and the fallback are answered from there, so they
    never race the stream's end (twilio reference, sections 1.3 and 7)."""
    response = VoiceResponse()
    connect = response.connect(action=action_url)
    stream = connect.stream(url=stream_url, status_callback=status_callback_url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    return str(response)


def say_then_hand_on_twiml(message: str, persona: Persona, called: str) -> str:
    """Twilio says ``message`` in the persona's language, then dials the persona's fallback
    target if it has one, else hangs up: a caller never sits in silence."""
    response = VoiceResponse()
    response.say(message, language=persona.language)
    target = persona.transfer.get(persona.fallback_target)
    if target is not None:
        response.dial(target.number, caller_id=target.caller_id or called or None,
                      timeout=target.ring_seconds)  # fmt: skip
    response.hangup()
    return str(response)


def busy_twiml(persona: Persona, called: str) -> str:
    return say_then_hand_on_twiml(persona.busy_message, persona, called)


def redirect_twiml(url: str) -> str:
    response = VoiceResponse()
    response.redirect(url, method="POST")
    return str(response)


def hangup_twiml() -> str:
    response = VoiceResponse()
    response.hangup()
    return str(response)


def apology_twiml(message: str) -> str:
    response = VoiceResponse()
    response.say(message)
    response.hangup()
    return str(response)
