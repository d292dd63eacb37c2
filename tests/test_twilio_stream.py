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
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"event": "dance"}', "unknown event 'dance'"),
        ('{"no": "event"}', "unknown event None"),
        ('{"event": "media", "media": {"payload": "***"}}', "bad 'media' message"),
        ('{"event": "media", "media": {"timestamp": "x", "payload": ""}}', "bad 'media'"),
        ('{"event": "start", "start": {"streamSid": "MZ1"}}', "bad 'start' message"),
        ('{"event": "mark", "mark": {}}', "bad 'mark' message"),
        ('{"event": "mark", "mark": "m1"}', "bad 'mark' message"),
        ('{"event": "dtmf", "dtmf": {"digit": ""}}', "bad 'dtmf' message"),
    ],
)
def test_malformed_messages_raise_with_a_reason(text, reason):
    with pytest.raises(MalformedMessage, match=reason):
        parse_message(text)


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
