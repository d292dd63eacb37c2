"""Event payloads, schema 1: shape, masking, validation."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from delivery_helpers import T0, ended_event

from phoneagent.delivery.events import (
    EVENT_TYPES,
    call_started_event,
    call_transferred_event,
    mask_number,
    new_event_id,
)

PERSONA = {"persona_id": "bright-smile-dental", "persona_name": "Bright Smile Dental front desk"}


def test_call_ended_payload():
    event = ended_event(1, event_id="evt_fixed")
    payload = json.loads(event.body())
    assert payload == {
        "schema": 1,
        "id": "evt_fixed",
        "type": "call.ended",
        "timestamp": "2027-01-15T08:00:00.000Z",
        "data": {
            "call_sid": "CA" + f"{1:032x}",
            "persona": {"id": "bright-smile-dental", "name": "Bright Smile Dental front desk"},
            "from": "+14155550123",
            "from_masked": False,
            "to": "+14155550100",
            "direction": "inbound",
            "variables": {},
            "metadata": {},
            "started_at": "2027-01-15T07:58:24.500Z",
            "ended_at": "2027-01-15T08:00:00.000Z",
            "duration_seconds": 95.5,
            "end_reason": "caller_hung_up",
            "transfer": None,
            "transcript": [
                {"role": "agent", "text": "Bright Smile Dental, how can I help?", "start_ms": 0,
                 "end_ms": 2100, "interrupted": False},
                {"role": "caller", "text": "I'd like to book a cleaning.", "start_ms": 2600,
                 "end_ms": 4300, "interrupted": False},
            ],
        },
    }  # fmt: skip


def test_body_is_compact_utf8_and_stable():
    event = ended_event(transcript=[{"role": "caller", "text": "Grüß Gott", "start_ms": 0,
                                     "end_ms": 900}])  # fmt: skip
    body = event.body()
    assert body == event.body()
    assert "Grüß Gott".encode() in body and b": " not in body


def test_masked_caller():
    data = json.loads(ended_event(mask_caller=True).body())["data"]
    assert data["from"] == "+*******0123" and data["from_masked"] is True
    assert data["to"] == "+14155550100"


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("+14155550123", "+*******0123"),
        ("+442071838750", "+********8750"),
        ("anonymous", "anonymous"),
        ("", ""),
        ("client:alice", "redacted"),
        ("sip:bob@example.com", "redacted"),
    ],
)
def test_mask_number(number, masked):
    assert mask_number(number) == masked


def test_transferred_end_reason_carries_the_target():
    data = json.loads(
        ended_event(
            end_reason="transferred", transfer_target="front_desk", transfer_number="+14155550111"
        ).body()
    )["data"]
    assert data["transfer"] == {"target": "front_desk", "number": "+14155550111", "reason": None}
    reasoned = ended_event(
        end_reason="transferred", transfer_target="front_desk", transfer_number="+14155550111",
        transfer_reason="来电者情绪激动",
    )  # fmt: skip
    assert json.loads(reasoned.body())["data"]["transfer"]["reason"] == "来电者情绪激动"


def test_call_started_and_transferred():
    started = call_started_event(
        call_sid="CA1", from_number="+14155550123", to_number="+14155550100",
        started_at=datetime(2027, 1, 15, 9, 0, tzinfo=timezone(timedelta(hours=1))),
        mask_caller=True, **PERSONA,
    )  # fmt: skip
    payload = json.loads(started.body())
    assert payload["type"] == "call.started"
    assert payload["timestamp"] == payload["data"]["started_at"] == "2027-01-15T08:00:00.000Z"
    assert payload["data"]["from"] == "+*******0123"

    moved = call_transferred_event(
        call_sid="CA1", from_number="+14155550123", to_number="+14155550100",
        target="front_desk", target_number="+14155550111", outcome="failed",
        error="Twilio answered 404", at=T0, **PERSONA,
    )  # fmt: skip
    data = json.loads(moved.body())["data"]
    assert data["target"] == "front_desk" and data["outcome"] == "failed"
    assert data["error"] == "Twilio answered 404"
    assert data["reason"] is None  # no reason given: schema 1's optional field, null
    upset = call_transferred_event(
        call_sid="CA1", from_number="+14155550123", to_number="+14155550100",
        target="patient_relations", target_number="+14155550162", outcome="accepted",
        reason="caller sounds distressed", at=T0, **PERSONA,
    )  # fmt: skip
    assert json.loads(upset.body())["data"]["reason"] == "caller sounds distressed"
    assert {started.type, moved.type, ended_event().type} == set(EVENT_TYPES)


@pytest.mark.parametrize(
    "overrides",
    [
        {"end_reason": "hung_up"},
        {"started_at": datetime(2027, 1, 15)},  # naive
        {"ended_at": T0 - 1000},  # before it started
        {"transcript": [{"role": "system", "text": "x", "start_ms": 0, "end_ms": 1}]},
        {"transcript": [{"role": "agent", "text": "x", "start_ms": -5, "end_ms": 1}]},
        {"transcript": [{"role": "agent", "text": None, "start_ms": 0, "end_ms": 1}]},
    ],
)
def test_bad_values_are_refused_at_the_source(overrides):
    with pytest.raises(ValueError):
        ended_event(**overrides)


def test_bad_transfer_outcome_is_refused():
    with pytest.raises(ValueError, match="outcome"):
        call_transferred_event(
            call_sid="CA1", from_number="+1", to_number="+1", target="t", target_number="+1",
            outcome="ok", at=T0, **PERSONA,
        )  # fmt: skip


def test_event_ids_are_unique_and_dot_free():
    ids = {new_event_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("evt_") and "." not in i for i in ids)
    assert ended_event().id != ended_event().id
    assert datetime.fromtimestamp(T0, UTC).year == 2027
