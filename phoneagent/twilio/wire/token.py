"""The stream token: the voice webhook's answer vouches for the media stream that follows."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

STREAM_TOKEN_SECONDS = 120  # Twilio opens the stream right after the TwiML; two minutes is ample


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
