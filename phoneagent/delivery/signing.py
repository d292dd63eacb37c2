"""Standard Webhooks signatures: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``.

The scheme (https://www.standardwebhooks.com, spec version 1.0.0): the signed content is
``{webhook-id}.{webhook-timestamp}.{raw body}``; the signature is ``v1,`` followed by the base64
HMAC-SHA256 of that content; the header holds one or more signatures separated by spaces (two
during a secret rotation). The timestamp is the attempt's, in integer Unix seconds, so a receiver
can refuse replays older than its tolerance; the id is the event's and never changes across
retries, so a receiver can use it as an idempotency key.

Secrets, as held in the persona's ``secret_env`` variable:

- ``whsec_`` + base64 (the spec's serialisation, what the official libraries generate): the key
  is the base64-decoded bytes after the prefix. ``python -m phoneagent.delivery.signing``
  prints a new one (32 random bytes; the spec asks for 24 to 64).
- anything else (a "plain" secret): the key is the UTF-8 bytes of the value as written, the way
  GitHub-style HMAC webhooks use a shared string. We do *not* guess whether a plain value is
  base64: a guess that differs from the receiver's silently breaks every signature. (The official
  Python library base64-decodes unprefixed strings; give it ``secret.encode()`` as bytes, or use
  a ``whsec_`` secret on both sides.)
- several ``whsec_`` secrets separated by whitespace: every one signs, newest first, so a receiver
  can move to the new secret without a window of failed deliveries (zero-downtime rotation).

Written by hand rather than with the ``standardwebhooks`` package: the scheme is a dozen lines of
stdlib ``hmac``, and that package pins its own dependencies (``attrs``, ``httpx``, ``Deprecated``,
``python-dateutil``), which the server has no other use for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping, Sequence

__all__ = [
    "SECRET_PREFIX",
    "SigningError",
    "VerificationError",
    "decode_secrets",
    "generate_secret",
    "sign",
    "signature_headers",
    "verify",
]

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
#: How far a receiver lets ``webhook-timestamp`` stray from its clock (the libraries' default).
DEFAULT_TOLERANCE_SECONDS = 300


class SigningError(ValueError):
    """A signing secret is unusable (empty, or a ``whsec_`` value that is not base64).

    The message names what is wrong but never contains the secret.
    """


class VerificationError(Exception):
    """A request's Standard Webhooks headers do not check out; the message says why."""


def decode_secrets(secret: str | bytes) -> list[bytes]:
    """The HMAC keys a secret value stands for, in signing order (see the module docstring)."""
    if isinstance(secret, bytes):
        if not secret:
            raise SigningError("the signing secret is empty")
        return [secret]
    value = secret.strip()
    if not value:
        raise SigningError("the signing secret is empty")
    parts = value.split()
    if len(parts) > 1 and all(p.startswith(SECRET_PREFIX) for p in parts):
        return [_decode_one(p, i) for i, p in enumerate(parts)]
    return [_decode_one(value, 0)]


def _decode_one(value: str, index: int) -> bytes:
    if not value.startswith(SECRET_PREFIX):
        return value.encode("utf-8")
    encoded = value[len(SECRET_PREFIX) :]
    try:
        # Some generators drop base64 padding; restore it rather than refuse a valid secret.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        which = f"secret #{index + 1}" if index else "the signing secret"
        raise SigningError(
            f"{which} starts with {SECRET_PREFIX!r} but the rest is not valid base64"
        ) from None
    if not key:
        raise SigningError(f"the signing secret is {SECRET_PREFIX!r} with no key after it")
    return key


def generate_secret(nbytes: int = 32) -> str:
    """A new ``whsec_`` secret: ``nbytes`` random bytes, base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(nbytes)).decode("ascii")


def sign(msg_id: str, timestamp: int, body: bytes, secret: str | bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,<base64>`` per key, space-separated."""
    if "." in msg_id:
        # The signed content is dot-delimited; a dot in the id would make it ambiguous.
        raise SigningError(f"a webhook id must not contain '.': {msg_id!r}")
    content = b"%s.%d.%s" % (msg_id.encode("utf-8"), timestamp, body)
    return " ".join(_signature(key, content) for key in decode_secrets(secret))


def _signature(key: bytes, content: bytes) -> str:
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signature_headers(
    msg_id: str, body: bytes, secret: str | bytes, *, timestamp: int | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers for one delivery attempt (timestamp: now)."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(msg_id, ts, body, secret),
    }


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secret: str | bytes | Sequence[str | bytes],
    *,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> str:
    """Check a received webhook; return its ``webhook-id``, or raise :class:`VerificationError`.

    For receivers (and the README): pass the *raw* body bytes, not re-serialised JSON. Header
    names are matched case-insensitively. Any one valid ``v1`` signature made with any of the
    given secrets passes; signatures of other versions are ignored. ``tolerance`` bounds how far
    the timestamp may be from ``now`` (replay protection). Store the returned id to process each
    event once: retries repeat it.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id", "")
    raw_ts = lowered.get("webhook-timestamp", "")
    raw_sigs = lowered.get("webhook-signature", "")
    if not (msg_id and raw_ts and raw_sigs):
        raise VerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(raw_ts)
    except ValueError:
        raise VerificationError(f"webhook-timestamp is not an integer: {raw_ts!r}") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise VerificationError(
            f"webhook-timestamp is {current - timestamp:+.0f} s from now "
            f"(tolerance {tolerance:.0f} s): a replay, or a clock out of sync"
        )
    given_secrets = [secret] if isinstance(secret, str | bytes) else list(secret)
    keys = [key for s in given_secrets for key in decode_secrets(s)]
    content = b"%s.%s.%s" % (msg_id.encode("utf-8"), raw_ts.encode("ascii", "replace"), body)
    expected = [hmac.new(key, content, hashlib.sha256).digest() for key in keys]
    for candidate in raw_sigs.split():
        version, _, encoded = candidate.partition(",")
        if version != SIGNATURE_VERSION:
            continue
        try:
            given = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if any(hmac.compare_digest(given, e) for e in expected):
            return msg_id
    raise VerificationError("no webhook-signature matches the secret")


if __name__ == "__main__":
    print(generate_secret())
