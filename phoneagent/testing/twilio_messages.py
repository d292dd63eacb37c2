"""Media Streams message shapes (§2, §3 of ``shared/reference/twilio-media-streams.md``): the
one place in the kit that knows what Twilio sends and what it accepts from a server.

What Twilio accepts is checked as strictly as Twilio does: a frame it would reject is reported
with the warning code Twilio logs for it (§3, §7).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

__all__ = [
    "BYTES_PER_MS",
    "DTMF_DIGITS",
    "FRAME_BYTES",
    "FRAME_MS",
    "MAX_BUFFERED_MS",
    "MULAW_SILENCE",
    "OUTBOUND_SHAPES",
    "WARNING_BINARY_FRAME",
    "WARNING_BUFFER_FULL",
    "WARNING_INVALID_MESSAGE",
    "check_outbound",
    "outbound_clear",
    "outbound_mark",
    "outbound_media",
]

BYTES_PER_MS = 8  # μ-law 8 kHz mono: one byte per sample (§2, §9)
FRAME_MS = 20  # observed inbound frame: 20 ms = 160 bytes (§2)
FRAME_BYTES = FRAME_MS * BYTES_PER_MS
MULAW_SILENCE = b"\xff"  # μ-law silence byte (§9)
MAX_BUFFERED_MS = 10 * 60 * 1000  # Twilio stops accepting outbound audio past 10 min (§3, 31931)
DTMF_DIGITS = frozenset("0123456789*#")

WARNING_BINARY_FRAME = 31950  # §3, §7
WARNING_INVALID_MESSAGE = 31951  # §3, §7
WARNING_BUFFER_FULL = 31931  # §3, §7

#: Server → Twilio messages: event → the one key of its body object (None: no body). §3 says
#: to send exactly these fields; anything missing or extra is warning 31951.
OUTBOUND_SHAPES: dict[str, tuple[str, str] | None] = {
    "media": ("media", "payload"),
    "mark": ("mark", "name"),
    "clear": None,
}


def outbound_media(stream_sid: str, mulaw: bytes) -> str:
    """A server→Twilio ``media`` message, exactly as §3 allows (for server-role test apps)."""
    payload = base64.b64encode(mulaw).decode("ascii")
    return json.dumps({"event": "media", "streamSid": stream_sid, "media": {"payload": payload}})


def outbound_mark(stream_sid: str, name: str) -> str:
    """A server→Twilio ``mark`` message (§3)."""
    return json.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def outbound_clear(stream_sid: str) -> str:
    """A server→Twilio ``clear`` message (§3)."""
    return json.dumps({"event": "clear", "streamSid": stream_sid})


def check_outbound(text: str, stream_sid: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """Parse a server→Twilio text frame; return ``(message, None)`` or ``(None, reason)``.

    ``stream_sid`` is None before ``start`` was sent: nothing is valid then, because the
    streamSid the server must echo does not exist yet (§3).
    """
    if stream_sid is None:
        return None, "message sent before start"
    try:
        message = json.loads(text)
    except ValueError:
        return None, "invalid JSON"
    if not isinstance(message, dict):
        return None, "not a JSON object"
    event = message.get("event")
    if event not in OUTBOUND_SHAPES:
        return None, f"unknown event {event!r}"
    shape = OUTBOUND_SHAPES[event]
    problem = _key_problem(message, {"event", "streamSid"} | ({shape[0]} if shape else set()))
    if problem:
        return None, f"{event}: {problem}"
    if message["streamSid"] != stream_sid:
        return None, f"{event}: wrong streamSid {message['streamSid']!r}"
    if shape:
        body_key, field_name = shape
        body = message[body_key]
        if not isinstance(body, dict):
            return None, f"{event}: {body_key} is not an object"
        problem = _key_problem(body, {field_name})
        if problem:
            return None, f"{event}.{body_key}: {problem}"
        if not isinstance(body[field_name], str):
            return None, f"{event}.{body_key}.{field_name} is not a string"
        if event == "media":
            try:
                base64.b64decode(body["payload"], validate=True)
            except (binascii.Error, ValueError):
                return None, "media.payload is not base64"
    return message, None


def _key_problem(obj: Mapping[str, Any], expected: set[str]) -> str | None:
    missing, extra = expected - obj.keys(), obj.keys() - expected
    if missing:
        return f"missing field(s) {sorted(missing)}"
    if extra:
        return f"extra field(s) {sorted(extra)}"
    return None
