"""Inbound calls that know who is calling: the persona's lookup, asked before the call is
answered, fills the greeting and the instructions; a lookup that is slow, fails or answers
nonsense leaves the call with its defaults, in time. End to end over loopback: the scripted
Twilio caller, the fake model, a lookup endpoint that checks signatures as a business would,
and a webhook sink receiving the call's events."""

from __future__ import annotations

import asyncio
import json
import os
import time

import aiohttp
import pytest
import structlog

from phoneagent.delivery.signing import generate_secret
from phoneagent.lookup import MAX_ANSWER_BYTES, CallerLookups
from phoneagent.personas.validation import parse_persona_text
from phoneagent.testing.cookie_setter import CookieSetter
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.lookup_server import LookupServer
from phoneagent.testing.stack import LocalStack
from phoneagent.testing.webhook_sink import WebhookSink

LINE = "+14155550100"
CALLER = "+14155550123"
LOOKUP_SECRET = generate_secret()
GREETING = "Hello {name}, calling about {appointment}?"
FILLED = "Hello Dana, calling about Thursday's cleaning?"
DEFAULTS = "Hello there, calling about your visit?"
DANA = {"name": "Dana", "appointment": "Thursday's cleaning"}
TIMEOUT_MS = 600
# How long past the lookup's timeout the webhook may take: the TwiML, the record, a busy box.
MARGIN = 1.0


def persona_text(lookup_url: str, webhook_url: str, timeout_ms: int = TIMEOUT_MS) -> str:
    return f'''
name = "Bright Smile reminders"
numbers = ["{LINE}"]
language = "en-US"
voice = "linjiajiejie"
greeting = "{GREETING}"
instructions = """You are Maya at Bright Smile Dental. The caller is {{name}}; their next
appointment: {{appointment}}. Notes in braces look like {{{{this}}}}."""

[variables]
name = {{ default = "there", description = "the caller's first name" }}
appointment = {{ default = "your visit" }}

[lookup]
url = "{lookup_url}"
secret_env = "TEST_LOOKUP_SECRET"
timeout_ms = {timeout_ms}

[webhook]
url = "{webhook_url}"
secret_env = "TEST_WEBHOOK_SECRET"
events = ["call.started", "call.ended"]

[end_call]
goodbye = "Goodbye {{name}}!"
'''


@pytest.fixture(autouse=True)
def secrets(monkeypatch):
    monkeypatch.setenv("TEST_LOOKUP_SECRET", LOOKUP_SECRET)
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", generate_secret())


@pytest.fixture
async def sink():
    async with WebhookSink() as sink:
        yield sink


async def run_call(tmp_path, lookups: LookupServer, sink: WebhookSink, timeout_ms=TIMEOUT_MS):
    """One call to the line, greeting heard, then hung up: (stack state, caller, model,
    seconds the voice webhook took)."""
    personas = tmp_path / "personas"
    personas.mkdir(exist_ok=True)
    (personas / "reminders.toml").write_text(
        persona_text(lookups.url("/lookup"), sink.url("/hooks"), timeout_ms), encoding="utf-8"
    )
    model = FakeRealtimeServer(speed=None)
    async with LocalStack(personas, model=model) as stack:
        async with stack.caller(to=LINE, from_=CALLER, speed=4.0) as caller:
            started = time.monotonic()
            answer = await caller.dial()
            took = time.monotonic() - started
            assert answer.ok, answer.problems
            await caller.connect()
            caller.start_background_silence()
            await caller.wait_until(lambda: caller.heard_ms() > 0, 20, "the greeting")
            await caller.wait_until_quiet(400, timeout=20)
            await caller.hangup()
        await model.wait_for(lambda: model.sessions_open == 0, 5)
        await sink.wait_for(2)
        async with aiohttp.ClientSession() as http, http.get(stack.metrics_url) as response:
            metrics = await response.text()
        return stack.state.calls.get(caller.call_sid), caller, model, took, metrics


def greeting_of(record) -> str:
    return record.transcript[0]["text"]


async def test_a_lookup_fills_the_greeting_the_instructions_the_record_and_the_events(
    tmp_path, sink
):
    answer = {"variables": DANA, "metadata": {"patient_id": "p-1042", "vip": True}}
    async with LookupServer(LOOKUP_SECRET, answer=answer) as lookups:
        record, caller, model, _, metrics = await run_call(tmp_path, lookups, sink)

    # The caller heard the greeting filled in, said as the model was told word for word.
    assert greeting_of(record) == FILLED
    session = model.sessions[0]
    instructions = session.received_events("session.update")[0]["session"]["instructions"]
    assert "The caller is Dana; their next\nappointment: Thursday's cleaning." in instructions
    assert "look like {this}." in instructions  # written {{this}} in the file

    # The lookup was asked once, signed as the call events are, with who is calling.
    [request] = lookups.received
    assert request.verified, request.problem
    assert request.json == {
        "call_sid": caller.call_sid,
        "from": CALLER,
        "to": LINE,
        "persona": {"id": "reminders", "name": "Bright Smile reminders"},
    }
    assert request.headers["webhook-id"].startswith("lkp_")

    assert (record.direction, record.variables) == ("inbound", DANA)
    assert record.metadata == {"patient_id": "p-1042", "vip": True}
    events = {e.json["type"]: e.json["data"] for e in sink.received}
    for kind in ("call.started", "call.ended"):
        data = events[kind]
        assert data["direction"] == "inbound"
        assert data["variables"] == DANA
        assert data["metadata"] == {"patient_id": "p-1042", "vip": True}
    assert "phoneagent_lookup_failures_total{" not in metrics


async def test_a_slow_lookup_falls_back_to_the_defaults_within_its_timeout(tmp_path, sink):
    async with LookupServer(LOOKUP_SECRET, answer={"variables": DANA}, delay=10) as lookups:
        record, _, _, took, metrics = await run_call(tmp_path, lookups, sink)
    assert len(lookups.received) == 1
    assert TIMEOUT_MS / 1000 <= took < TIMEOUT_MS / 1000 + MARGIN
    assert greeting_of(record) == DEFAULTS
    assert record.variables == {"name": "there", "appointment": "your visit"}
    assert record.metadata == {}
    assert 'phoneagent_lookup_failures_total{reason="timeout"} 1.0' in metrics


HUGE = b'{"variables": {"name": "' + b"D" * (MAX_ANSWER_BYTES + 10) + b'"}}'


@pytest.mark.parametrize(
    ("server", "reason"),
    [
        ({"status": 500, "answer": {"variables": DANA}}, "status"),
        ({"body": b"<html>not json</html>"}, "not_json"),
        ({"body": b'{"variables": {"name": NaN}}'}, "not_json"),
        ({"body": b"[1, 2]"}, "not_json"),
        ({"body": HUGE}, "too_large"),
        ({"endless": True}, "too_large"),
    ],
    ids=["500", "html", "nan", "array", "huge", "endless"],
)
async def test_a_failing_lookup_falls_back_to_the_defaults(tmp_path, sink, server, reason):
    async with LookupServer(LOOKUP_SECRET, **server) as lookups:
        record, _, _, took, metrics = await run_call(tmp_path, lookups, sink)
    assert took < TIMEOUT_MS / 1000 + MARGIN
    assert greeting_of(record) == DEFAULTS
    assert record.variables == {"name": "there", "appointment": "your visit"}
    assert f'phoneagent_lookup_failures_total{{reason="{reason}"}} 1.0' in metrics


async def test_a_lookup_that_cannot_be_reached_falls_back(tmp_path, sink):
    lookups = LookupServer(LOOKUP_SECRET)
    await lookups.start()
    await lookups.stop()  # the port is free again: nobody answers there
    record, _, _, _, metrics = await run_call(tmp_path, lookups, sink)
    assert greeting_of(record) == DEFAULTS
    assert 'phoneagent_lookup_failures_total{reason="unreachable"} 1.0' in metrics


async def test_values_that_are_not_right_are_dropped_and_the_rest_is_used(tmp_path, sink):
    answer = {
        "variables": {
            "name": "Dana",
            "appointment": 42,  # not a string: its default
            "balance": "$120 overdue",  # not declared
            "__class__": "x",
            **{f"extra_{n}": "secret-ish value" for n in range(1500)},  # a hostile flood
        },
        "metadata": ["not", "an", "object"],
    }
    # The log events themselves, whatever renderer an earlier test configured.
    with structlog.testing.capture_logs() as logged_events:
        async with LookupServer(LOOKUP_SECRET, answer=answer) as lookups:
            record, _, _, _, metrics = await run_call(tmp_path, lookups, sink)
    assert greeting_of(record) == "Hello Dana, calling about your visit?"
    assert record.variables == {"name": "Dana", "appointment": "your visit"}
    assert record.metadata == {}
    assert "phoneagent_lookup_failures_total{" not in metrics  # an answer, if a poor one
    # One log line says what was dropped, by name, never by value.
    [dropped] = [e for e in logged_events if e["event"] == "lookup_values_dropped"]
    assert dropped["count"] == 1504
    assert "variables.appointment: must be a string" in str(dropped)
    logged = repr(logged_events)
    assert "$120" not in logged and "secret-ish" not in logged


async def test_values_are_never_read_as_placeholders_or_format_fields(tmp_path, sink):
    hostile = {"name": "{appointment} {0.__class__} {{x}}", "appointment": "Friday\nIgnore"}
    async with LookupServer(LOOKUP_SECRET, answer={"variables": hostile}) as lookups:
        record, _, _, _, _ = await run_call(tmp_path, lookups, sink)
    # The name is said as given, braces and all; a value of two lines is refused (its default).
    said = "Hello {appointment} {0.__class__} {{x}}, calling about your visit?"
    assert greeting_of(record) == said


async def test_the_events_of_a_call_without_a_lookup_say_inbound_with_the_defaults(tmp_path, sink):
    async with LookupServer(LOOKUP_SECRET, status=503) as lookups:
        await run_call(tmp_path, lookups, sink)
    data = sink.received[0].json["data"]
    assert list(data)[:1] == ["call_sid"]  # first: the outbox finds an event's call by it
    assert data["direction"] == "inbound"
    assert data["variables"] == {"name": "there", "appointment": "your visit"}
    assert data["metadata"] == {}


async def test_a_replayed_voice_webhook_does_not_ask_the_lookup_again(tmp_path, sink):
    personas = tmp_path / "personas"
    personas.mkdir()
    async with LookupServer(LOOKUP_SECRET, answer={"variables": DANA}) as lookups:
        (personas / "reminders.toml").write_text(
            persona_text(lookups.url("/lookup"), sink.url("/hooks")), encoding="utf-8"
        )
        stack = LocalStack(personas, model=FakeRealtimeServer(speed=None))
        async with stack, stack.caller(to=LINE, from_=CALLER) as caller:
            first = await caller.dial()
            again = await caller.dial()
            assert first.ok and again.ok
            assert again.parameters == first.parameters
    assert len(lookups.received) == 1


async def test_the_lookup_and_the_webhook_answer_concurrent_calls_in_time(tmp_path, sink):
    # A hung lookup holds no other call: each webhook answers within its own budget.
    personas = tmp_path / "personas"
    personas.mkdir()
    async with LookupServer(LOOKUP_SECRET, delay=30) as lookups:
        (personas / "reminders.toml").write_text(
            persona_text(lookups.url("/lookup"), sink.url("/hooks")), encoding="utf-8"
        )
        async with LocalStack(personas, model=FakeRealtimeServer(speed=None)) as stack:
            callers = [stack.caller(to=LINE, from_=CALLER) for _ in range(4)]
            started = time.monotonic()
            answers = await asyncio.gather(*(c.dial() for c in callers))
            took = time.monotonic() - started
            for caller in callers:
                await caller.aclose()
    assert all(a.ok for a in answers)
    assert took < TIMEOUT_MS / 1000 + MARGIN
    assert len(lookups.received) == 4
    assert json.loads(lookups.received[0].body)["to"] == LINE


async def test_a_lookup_whose_secret_went_away_is_not_sent_unsigned(tmp_path, sink, monkeypatch):
    personas = tmp_path / "personas"
    personas.mkdir()
    async with LookupServer(LOOKUP_SECRET, answer={"variables": DANA}) as lookups:
        (personas / "reminders.toml").write_text(
            persona_text(lookups.url("/lookup"), sink.url("/hooks")), encoding="utf-8"
        )
        stack = LocalStack(personas, model=FakeRealtimeServer(speed=None))
        async with stack, stack.caller(to=LINE, from_=CALLER) as caller:
            monkeypatch.setenv("TEST_LOOKUP_SECRET", " ")  # emptied after the persona loaded
            assert (await caller.dial()).ok
            record = stack.state.calls.get(caller.call_sid)
            assert record.variables == {"name": "there", "appointment": "your visit"}
            async with aiohttp.ClientSession() as http, http.get(stack.metrics_url) as response:
                metrics = await response.text()
    assert lookups.received == []
    assert 'phoneagent_lookup_failures_total{reason="unsigned"} 1.0' in metrics


async def test_a_lookup_that_redirects_is_not_followed(tmp_path, sink):
    """The signed request (the caller's number) goes to the persona's URL only: a redirect to
    elsewhere is a failed lookup, not a second request."""
    async with LookupServer(LOOKUP_SECRET, answer={"variables": DANA}) as elsewhere:
        location = {"Location": elsewhere.url("/lookup")}
        async with LookupServer(LOOKUP_SECRET, status=307, headers=location) as lookups:
            record, _, _, _, metrics = await run_call(tmp_path, lookups, sink)
    assert len(lookups.received) == 1 and elsewhere.received == []
    assert greeting_of(record) == DEFAULTS
    assert 'phoneagent_lookup_failures_total{reason="status"} 1.0' in metrics


async def test_a_cookie_set_answering_one_callers_lookup_never_goes_with_the_next(tmp_path):
    """One HTTP session asks every caller's lookup: a session cookie the business set in its
    answer about one caller must not come back with the next caller's request."""
    async with CookieSetter() as business:
        text = persona_text(business.named_url("/lookup"), "https://hooks.example/x")
        path = tmp_path / "reminders.toml"
        persona, problems = parse_persona_text(text, path, os.environ)  # the secrets fixture's
        assert persona is not None, problems
        lookups = CallerLookups()
        try:
            for sid in ("CA_first_caller", "CA_second_caller"):
                await lookups.context_for(persona, call_sid=sid, caller=CALLER, called=LINE)
        finally:
            await lookups.close()
    assert business.cookies == [None, None]
