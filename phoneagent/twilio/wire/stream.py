"""Twilio Media Streams messages ⇄ typed events. No I/O.

Inbound messages are parsed into small frozen dataclasses; anything malformed raises
``MalformedMessage`` with a reason, so the shell can log and skip it without ending the call.
Outbound messages carry exactly the documented fields: Twilio warns (31951) and drops a message
with a missing or extra field (reference/twilio-media-streams.md, section 3).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from dataclasses import dataclass, field
from typing import Any


class MalformedMessage(ValueError):
    """A message from Twilio that cannot be understood; the call goes on without it."""


@dataclass(frozen=True)
class Connected:
    protocol: str


@dataclass(frozen=True)
class Start:
    stream_sid: str
    call_sid: str
    account_sid: str
    custom_parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Media:
    timestamp_ms: int  # presentation time since the stream started; gaps happen
    payload: bytes  # raw μ-law 8 kHz, any length


@dataclass(frozen=True)
class Mark:
    name: str  # the echo of a mark we sent: the audio queued before it has played (or was cleared)


@dataclass(frozen=True)
class Dtmf:
    digit: str


@dataclass(frozen=True)
class Stop:
    call_sid: str


TwilioEvent = Connected | Start | Media | Mark | Dtmf | Stop


def parse_message(text: str | bytes) -> TwilioEvent:
    """Parse one WebSocket text message from Twilio."""
    try:
        message = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: deeply nested arrays fit well within the message size cap.
        raise MalformedMessage(f"not JSON: {type(exc).__name__}") from None
    if not isinstance(message, dict):
        raise MalformedMessage("not a JSON object")
    event = message.get("event")
    parser = _PARSERS.get(event) if isinstance(event, str) else None
    if parser is None:
        raise MalformedMessage(f"unknown event {event!r}"[:120])
    try:
        return parser(message)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, binascii.Error) as exc:
        # OverflowError: a timestamp of Infinity or 1e999 is valid JSON.
        raise MalformedMessage(f"bad {event!r} message: {type(exc).__name__}: {exc}") from None


def _parse_start(message: dict[str, Any]) -> Start:
    start = message["start"]
    params = start.get("customParameters") or {}
    if not isinstance(params, dict):
        raise ValueError("customParameters is not an object")
    return Start(
        stream_sid=_text(start.get("streamSid") or message["streamSid"]),
        call_sid=_text(start["callSid"]),
        account_sid=_text(start.get("accountSid", "")),
        custom_parameters={str(k): str(v) for k, v in params.items()},
    )


def _parse_media(message: dict[str, Any]) -> Media:
    media = message["media"]
    # Twilio sends numbers as strings; accept either, since the docs are loose about it.
    return Media(
        timestamp_ms=int(media.get("timestamp", 0)),
        payload=base64.b64decode(media["payload"], validate=True),
    )


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


_PARSERS = {
    "connected": lambda m: Connected(protocol=str(m.get("protocol", ""))),
    "start": _parse_start,
    "media": _parse_media,
    "mark": lambda m: Mark(name=_text(m["mark"]["name"])),
    "dtmf": lambda m: Dtmf(digit=_text(m["dtmf"]["digit"])),
    "stop": lambda m: Stop(call_sid=str((m.get("stop") or {}).get("callSid", ""))),
}


# The two messages of every agent frame are put together directly: the same text as
# json.dumps of the dict (its default separators and escaping, field order), at a third of the
# cost; only the strings are JSON-quoted, the call's stream SID once per call.


def media_message(stream_sid: str, payload: bytes) -> str:
    payload_b64 = base64.b64encode(payload).decode("ascii")
    return (
        f'{{"event": "media", "streamSid": {_quoted_sid(stream_sid)}, '
        f'"media": {{"payload": "{payload_b64}"}}}}'
    )


def mark_message(stream_sid: str, name: str) -> str:
    return (
        f'{{"event": "mark", "streamSid": {_quoted_sid(stream_sid)}, '
        f'"mark": {{"name": {json.dumps(name)}}}}}'
    )


@functools.lru_cache(maxsize=1024)
def _quoted_sid(stream_sid: str) -> str:
    return json.dumps(stream_sid)


def clear_message(stream_sid: str) -> str:
    return json.dumps({"event": "clear", "streamSid": stream_sid})
