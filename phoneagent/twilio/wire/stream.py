"""Twilio Media Streams messages ⇄ typed events. No I/O.

Inbound messages are parsed into small frozen dataclasses; anything malformed raises
``MalformedMessage`` with a reason, so the shell can log and skip it without ending the call.
Outbound messages carry exactly the documented fields: Twilio warns (31951) and drops a message
with a missing or extra field (reference/twilio-media-streams.md, section 3).
"""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec


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


# Twilio's messages as they come over the wire (reference section 2), decoded by msgspec in
# one pass: the JSON, the checks and the base64 payload in C. A media frame arrives 50 times a
# second per call, and json.loads, then base64 and the checks in Python, cost four times as
# much. Fields the call does not use are skipped; a field the call uses that is missing or of
# the wrong type makes the message malformed.
_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class _ConnectedMessage(msgspec.Struct, tag_field="event", tag="connected"):
    protocol: str = ""


class _StartBody(msgspec.Struct):
    callSid: _NonEmpty  # Twilio's names, as in the messages
    accountSid: _NonEmpty
    streamSid: str = ""
    customParameters: dict[str, Any] | None = None


class _StartMessage(msgspec.Struct, tag_field="event", tag="start"):
    start: _StartBody
    streamSid: str = ""


class _MediaBody(msgspec.Struct):
    payload: bytes  # base64 in the message: decoded, and refused if it is not base64
    # Twilio sends numbers as strings ("timestamp": "5"); the decoder is not strict about it,
    # since the documents are loose about it.
    timestamp: int = 0


class _MediaMessage(msgspec.Struct, tag_field="event", tag="media"):
    media: _MediaBody


class _MarkBody(msgspec.Struct):
    name: _NonEmpty


class _MarkMessage(msgspec.Struct, tag_field="event", tag="mark"):
    mark: _MarkBody


class _DtmfBody(msgspec.Struct):
    digit: _NonEmpty


class _DtmfMessage(msgspec.Struct, tag_field="event", tag="dtmf"):
    dtmf: _DtmfBody


class _StopBody(msgspec.Struct):
    callSid: str = ""


class _StopMessage(msgspec.Struct, tag_field="event", tag="stop"):
    stop: _StopBody | None = None


_DECODER = msgspec.json.Decoder(
    _MediaMessage | _MarkMessage | _StartMessage | _ConnectedMessage | _DtmfMessage | _StopMessage,
    strict=False,  # numbers as strings
)
_REASON_CHARS = 200  # the reason is logged; the message can be 64 KiB of anything


def _loggable(reason: str) -> str:
    """The reason as it may be logged: bounded, and what it quotes of the message (an unknown
    event's name) with its control characters escaped, so a sender cannot forge log lines
    or send terminal escapes."""
    reason = reason[:_REASON_CHARS]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in reason)


def parse_message(text: str | bytes) -> TwilioEvent:
    """Parse one WebSocket text message from Twilio."""
    try:
        message = _DECODER.decode(text)
    except msgspec.ValidationError as exc:  # JSON, but not a message of Twilio's
        raise MalformedMessage(_loggable(f"bad message: {exc}")) from None
    except (msgspec.DecodeError, UnicodeError, RecursionError) as exc:
        # UnicodeError: a lone surrogate in a text (no UTF-8); RecursionError: deeply nested
        # arrays fit well within the message size cap.
        raise MalformedMessage(_loggable(f"not JSON: {type(exc).__name__}: {exc}")) from None
    match message:
        case _MediaMessage(media):
            return Media(timestamp_ms=media.timestamp, payload=media.payload)
        case _MarkMessage(mark):
            return Mark(name=mark.name)
        case _StartMessage(start):
            return _start(start, message.streamSid)
        case _ConnectedMessage(protocol):
            return Connected(protocol=protocol)
        case _DtmfMessage(dtmf):
            return Dtmf(digit=dtmf.digit)
        case _StopMessage(stop):
            return Stop(call_sid=stop.callSid if stop is not None else "")
    raise AssertionError(f"no event for {message!r}")  # every decoded type is matched above


def _start(start: _StartBody, message_stream_sid: str) -> Start:
    stream_sid = start.streamSid or message_stream_sid
    if not stream_sid:
        raise MalformedMessage("bad message: no streamSid in `start`")
    params = start.customParameters or {}
    return Start(
        stream_sid=stream_sid,
        call_sid=start.callSid,
        account_sid=start.accountSid,
        custom_parameters={key: str(value) for key, value in params.items()},
    )


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
