"""Twilio Media Streams messages, from the examples in the reference (section 2 and 3)."""

import base64
import json

import pytest

from phoneagent.twilio.wire.stream import (
    Connected,
    Dtmf,
    MalformedMessage,
    Mark,
    Media,
    Start,
    Stop,
    clear_message,
    mark_message,
    media_message,
    parse_message,
)

PAYLOAD = base64.b64encode(b"\xff" * 160).decode()


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            {"event": "connected", "protocol": "Call", "version": "1.0.0"},
            Connected(protocol="Call"),
        ),
        (
            {
                "event": "start",
                "sequenceNumber": "1",
                "streamSid": "MZ1",
                "start": {
                    "streamSid": "MZ1",
                    "accountSid": "AC1",
                    "callSid": "CA1",
                    "tracks": ["inbound"],
                    "customParameters": {"persona": "dental", "token": "t"},
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            },
            Start("MZ1", "CA1", "AC1", {"persona": "dental", "token": "t"}),
        ),
        (
            {
                "event": "media",
                "sequenceNumber": "4",
                "streamSid": "MZ1",
                "media": {"track": "inbound", "chunk": "2", "timestamp": "5", "payload": PAYLOAD},
            },
            Media(timestamp_ms=5, payload=b"\xff" * 160),
        ),
        (
            {"event": "mark", "sequenceNumber": "4", "streamSid": "MZ1", "mark": {"name": "m1"}},
            Mark("m1"),
        ),
        (
            {
                "event": "dtmf",
                "streamSid": "MZ1",
                "sequenceNumber": "5",
                "dtmf": {"track": "inbound_track", "digit": "1"},
            },
            Dtmf("1"),
        ),
        (
            {"event": "stop", "sequenceNumber": "5", "streamSid": "MZ1",
             "stop": {"accountSid": "AC1", "callSid": "CA1"}},
            Stop("CA1"),
        ),
    ],
)  # fmt: skip
def test_documented_messages_parse(message, expected):
    assert parse_message(json.dumps(message)) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "not JSON: DecodeError: JSON is malformed"),
        ("[1, 2]", "bad message: Expected `object`, got `array`"),
        ('{"event": "dance"}', r"Invalid value 'dance' - at `\$.event`"),
        ('{"no": "event"}', "missing required field `event`"),
        ('{"event": "media", "media": {"payload": "***"}}', r"Invalid base64 .* `\$.media.payload"),
        ('{"event": "media", "media": {"payload": "AAA"}}', r"Invalid base64 .* `\$.media.payload"),
        ('{"event": "media", "media": {"payload": "AA A"}}', r"Invalid base64 .* `\$.media.paylo"),
        ('{"event": "media", "media": {"timestamp": "x", "payload": ""}}', r"`\$.media.timestamp`"),
        ('{"event": "media", "media": {"timestamp": 1e999, "payload": ""}}', "out of range"),
        ('{"event": "media", "media": {"timestamp": 5.5, "payload": ""}}', "Expected `int`"),
        ('{"event": "media", "media": {"timestamp": NaN, "payload": ""}}', "not JSON"),
        ('{"event": "media"}', "missing required field `media`"),
        ('{"event": "start", "start": {"streamSid": "MZ1"}}', r"`callSid` - at `\$.start`"),
        ('{"event": "start", "start": {"callSid": "CA1", "accountSid": "AC1"}}', "no streamSid"),
        ('{"event": "start", "streamSid": "MZ1", "start": {"callSid": "CA1", "accountSid": "AC1",'
         ' "customParameters": ["a"]}}', r"`\$.start.customParameters`"),
        ('{"event": "mark", "mark": {}}', r"missing required field `name` - at `\$.mark`"),
        ('{"event": "mark", "mark": "m1"}', r"Expected `object`, got `str` - at `\$.mark`"),
        ('{"event": "dtmf", "dtmf": {"digit": ""}}', r"length >= 1 - at `\$.dtmf.digit`"),
        ('{"event": "stop", "stop": {"callSid": 7}}', r"`\$.stop.callSid`"),
        ('{"event": "mark", "mark": {"name": "\ud800"}}', "not JSON: UnicodeEncodeError"),
        ('{"event": "media", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "RecursionError"),
    ],
)  # fmt: skip
def test_malformed_messages_raise_with_a_reason(text, reason):
    with pytest.raises(MalformedMessage, match=reason):
        parse_message(text)


def test_a_malformed_message_s_reason_is_short_whatever_it_holds():
    """The reason is logged: an unknown event's name of 60 KiB is not."""
    with pytest.raises(MalformedMessage, match="Invalid value 'xxx") as raised:
        parse_message(json.dumps({"event": "x" * 60_000}))
    assert len(str(raised.value)) <= 200


def test_a_reason_quotes_no_control_character_of_the_message():
    """An unknown event's name is quoted in the logged reason: a newline or a terminal escape
    in it is written as an escape (a console log would print it raw)."""
    with pytest.raises(MalformedMessage) as raised:
        parse_message(json.dumps({"event": "a\nforged line\u001b[31m\u2028"}))
    reason = str(raised.value)
    assert "forged line" in reason and reason.isprintable()
    assert "\\n" in reason and "\\x1b" in reason


def test_numbers_as_numbers_or_strings_and_unused_fields_ignored():
    """The documents write numbers as strings; a number is taken too, and fields the call has
    no use for (or a future version adds) are skipped whatever they hold."""
    message = {
        "event": "media",
        "sequenceNumber": 4,
        "media": {"track": "inbound", "chunk": 2, "timestamp": 5, "payload": PAYLOAD, "new": [{}]},
        "extra": {"nested": [1, 2, None]},
    }
    assert parse_message(json.dumps(message)) == Media(timestamp_ms=5, payload=b"\xff" * 160)
    start = {
        "event": "start",
        "streamSid": "MZ1",
        "start": {"callSid": "CA1", "accountSid": "AC1", "customParameters": {"n": 7}},
    }
    assert parse_message(json.dumps(start)) == Start("MZ1", "CA1", "AC1", {"n": "7"})
    assert parse_message('{"event": "stop"}') == Stop("")


def test_media_of_any_size_and_a_missing_timestamp():
    payload = base64.b64encode(b"\x00" * 7).decode()
    event = parse_message(json.dumps({"event": "media", "media": {"payload": payload}}))
    assert event == Media(timestamp_ms=0, payload=b"\x00" * 7)


def test_outbound_messages_have_exactly_the_documented_fields():
    assert json.loads(media_message("MZ1", b"\x01\x02")) == {
        "event": "media",
        "streamSid": "MZ1",
        "media": {"payload": "AQI="},
    }
    assert json.loads(mark_message("MZ1", "m7")) == {
        "event": "mark",
        "streamSid": "MZ1",
        "mark": {"name": "m7"},
    }
    assert json.loads(clear_message("MZ1")) == {"event": "clear", "streamSid": "MZ1"}
