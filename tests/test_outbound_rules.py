"""The outbound decisions, without I/O: calling hours in the persona's time zone (daylight
saving included), the concurrency limit, what AnsweredBy means, how a call ends without the
agent, and which records count as calls under way."""

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from phoneagent.call.context import CallContext
from phoneagent.outbound.context import PLACED, placed_for
from phoneagent.outbound.rules import (
    Answer,
    OutboundRefused,
    answer_for,
    check_calling_hours,
    check_concurrency,
    end_reason_without_agent,
    hung_up_before_the_agent,
    machine_detection,
    under_way,
)
from phoneagent.personas import OutboundSettings
from phoneagent.records import CallRecord, StreamEnded, StreamStarted, TwilioReported
from phoneagent.records.record import apply

BERLIN = OutboundSettings(
    greeting="Hallo", calling_hours=(9 * 60, 18 * 60), days=("mon", "tue", "wed", "thu", "fri"),
    timezone="Europe/Berlin",
)  # fmt: skip


@pytest.mark.parametrize(
    ("utc", "allowed"),
    [
        (datetime(2026, 12, 7, 8, 0, tzinfo=UTC), True),  # Monday 09:00 in Berlin (CET, +1)
        (datetime(2026, 12, 7, 7, 59, tzinfo=UTC), False),  # 08:59
        (datetime(2026, 12, 7, 16, 59, tzinfo=UTC), True),  # 17:59
        (datetime(2026, 12, 7, 17, 0, tzinfo=UTC), False),  # 18:00: the end is excluded
        (datetime(2026, 7, 6, 16, 30, tzinfo=UTC), False),  # Monday 18:30 in summer (CEST, +2)
        (datetime(2026, 7, 6, 15, 30, tzinfo=UTC), True),  # 17:30
        (datetime(2026, 12, 12, 10, 0, tzinfo=UTC), False),  # a Saturday
        (datetime(2026, 12, 6, 23, 30, tzinfo=UTC), False),  # Sunday in UTC, Monday 00:30 there
    ],
)
def test_calling_hours_are_the_personas_own(utc, allowed):
    if allowed:
        check_calling_hours("line", BERLIN, utc)
        return
    with pytest.raises(OutboundRefused) as refused:
        check_calling_hours("line", BERLIN, utc)
    assert (refused.value.code, refused.value.status, refused.value.field) == (
        "outside_calling_hours", 409, None
    )  # fmt: skip
    local = utc.astimezone(ZoneInfo("Europe/Berlin"))
    assert f"{local:%H:%M} there" in refused.value.message


def test_any_time_of_the_listed_days_without_hours():
    weekends = OutboundSettings(greeting="Hi", days=("sat", "sun"))
    check_calling_hours("line", weekends, datetime(2026, 12, 12, 23, 59, tzinfo=UTC))
    with pytest.raises(OutboundRefused, match="calls sat, sun any time"):
        check_calling_hours("line", weekends, datetime(2026, 12, 11, 12, 0, tzinfo=UTC))


def test_the_concurrency_limit():
    two = OutboundSettings(greeting="Hi", max_concurrent_calls=2)
    check_concurrency("line", two, 1)
    with pytest.raises(OutboundRefused) as refused:
        check_concurrency("line", two, 2)
    assert (refused.value.code, refused.value.status) == ("too_many_calls", 429)


@pytest.mark.parametrize(
    ("answered_by", "answer"),
    [
        ("human", Answer.AGENT), ("unknown", Answer.AGENT), ("", Answer.AGENT),
        ("machine_start", Answer.VOICEMAIL), ("machine_end_beep", Answer.VOICEMAIL),
        ("machine_end_silence", Answer.VOICEMAIL), ("machine_end_other", Answer.VOICEMAIL),
        ("fax", Answer.HANG_UP),
    ],
)  # fmt: skip
def test_what_answered_by_means(answered_by, answer):
    assert answer_for(answered_by) is answer


def test_machine_detection_waits_for_the_beep_only_to_leave_a_message():
    assert machine_detection(OutboundSettings(greeting="Hi")) == "Enable"
    with_message = OutboundSettings(greeting="Hi", voicemail_message="Call us back")
    assert machine_detection(with_message) == "DetectMessageEnd"


def placed(status="queued") -> CallRecord:
    record = CallRecord("CA1", persona="line")
    # As the dialer records a call it placed: its context, then Twilio's answer.
    apply(record, CallContext("outbound").answered("line", "+14155550100", "+14155550177"))
    apply(record, TwilioReported({"path": PLACED, "CallStatus": status}))
    return record


def test_how_a_call_ends_without_the_agent():
    for status, reason in (("busy", "busy"), ("no-answer", "no_answer"), ("failed", "failed"),
                           ("canceled", "canceled")):  # fmt: skip
        assert end_reason_without_agent(status, placed(), "") == reason
    assert end_reason_without_agent("completed", placed(), "machine_end_beep") == "voicemail"
    assert end_reason_without_agent("completed", placed(), "fax") == "fax"
    assert end_reason_without_agent("completed", placed(), "human") == ""
    assert end_reason_without_agent("ringing", placed(), "") == ""
    talked = placed()
    apply(talked, StreamStarted(1.0, "line", "s1"))
    assert end_reason_without_agent("completed", talked, "human") == ""  # the stream reports


def test_a_person_gone_before_the_stream_is_told_apart():
    assert hung_up_before_the_agent("completed", placed(), "human")
    assert hung_up_before_the_agent("completed", placed(), "")  # no detection: a person
    assert hung_up_before_the_agent("completed", None, "unknown")
    assert not hung_up_before_the_agent("in-progress", placed(), "human")
    assert not hung_up_before_the_agent("completed", placed(), "machine_end_beep")
    assert not hung_up_before_the_agent("completed", placed(), "fax")
    talked = placed()
    apply(talked, StreamStarted(1.0, "line", "s1"))
    assert not hung_up_before_the_agent("completed", talked, "human")  # the stream reports


def test_calls_under_way():
    assert under_way(placed("queued"))
    assert not under_way(placed("busy"))
    ended = placed("in-progress")
    apply(ended, StreamEnded(2.0, "caller_hung_up", [], {}))
    assert not under_way(ended)
    assert not under_way(CallRecord("CA2", persona="line", status="in-progress"))  # inbound


def test_which_records_an_answer_may_belong_to():
    assert placed_for(None, "line")
    assert placed_for(placed(), "line")
    assert not placed_for(placed(), "other")
    inbound = CallRecord("CA3", persona="line")
    assert not placed_for(inbound, "line")
    progress = CallRecord("CA4")
    apply(progress, TwilioReported({"CallStatus": "ringing", "path": "/twilio/outbound/status"}))
    assert placed_for(progress, "line")
    apply(
        progress, TwilioReported({"StreamEvent": "stream-started", "path": "/twilio/stream-status"})
    )
    assert not placed_for(progress, "line")


def test_variables_and_metadata_are_checked_against_the_persona():
    from phoneagent.outbound.rules import check_request
    from phoneagent.personas import Persona
    from phoneagent.personas.variables import Variable

    persona = Persona(
        id="line", name="Line", numbers=("+14155550100",), instructions="x", greeting="Hi",
        voice="v", language="en-US", goodbye="Bye", outbound=OutboundSettings(greeting="Hi",
        from_number="+14155550100"),
        variables={"name": Variable("name"), "day": Variable("day", "soon")},
    )  # fmt: skip
    ok = ("line", persona, "+14155550177", None)
    _, context = check_request(*ok, {"name": "Dana"}, {"booking": {"id": 42}})
    assert context == CallContext(
        "outbound", {"name": "Dana", "day": "soon"}, {"booking": {"id": 42}}
    )
    code = "invalid_request"
    cases = [
        ({"name": 3}, {}, code, "variables.name"),
        ({"name": "x" * 501}, {}, code, "variables.name"),
        ({"name": "two\nlines"}, {}, code, "variables.name"),
        ({"name": "Dana", "nickname": "D"}, {}, code, "variables.nickname"),  # undeclared
        ({"day": "Monday"}, {}, code, "variables.name"),  # required, missing
        ({f"v{i}": "x" for i in range(51)}, {}, code, "variables"),
        (["Dana"], {}, code, "variables"),
        ({"name": "Dana"}, {"x": "y" * 5000}, code, "metadata"),
        ({"name": "Dana"}, {"x": float("nan")}, code, "metadata"),
        ({"name": "Dana"}, {"x": object()}, code, "metadata"),
        ({"name": "Dana"}, ["not", "an", "object"], code, "metadata"),
    ]
    for variables, metadata, code, field in cases:
        with pytest.raises(OutboundRefused) as refused:
            check_request(*ok, variables, metadata)
        assert (refused.value.code, refused.value.field, refused.value.status) == (code, field, 422)
    with pytest.raises(OutboundRefused) as refused:
        check_request("line", persona, "+14155550100", None, {"name": "Dana"}, {})
    assert (refused.value.code, refused.value.field) == ("invalid_request", "to")


def test_the_caller_id_is_one_of_the_personas_own_numbers():
    """Twilio places a call from any number of the account: another persona's line, or any
    verified caller ID. A request (an API key limited to this persona) cannot show those."""
    from phoneagent.outbound.rules import check_request
    from phoneagent.personas import Persona

    persona = Persona(
        id="line", name="Line", numbers=("+14155550100", "+14155550101"), instructions="x",
        greeting="Hi", voice="v", language="en-US", goodbye="Bye",
        outbound=OutboundSettings(greeting="Hi", from_number="+14155550200"),
    )  # fmt: skip
    for own in ("+14155550200", "+14155550100", "+14155550101", None):
        check_request("line", persona, "+14155550177", own, {}, {})
    with pytest.raises(OutboundRefused) as refused:
        check_request("line", persona, "+14155550177", "+14155550999", {}, {})
    assert (refused.value.code, refused.value.field, refused.value.status) == (
        "invalid_request", "from", 422
    )  # fmt: skip
    assert "+14155550200, +14155550100, +14155550101" in refused.value.message


@pytest.mark.parametrize("to", ["+1911", "+911", "+112", "+44999", "+110", "+33112", "+262966"])
def test_emergency_numbers_and_short_codes_are_never_called(to):
    from phoneagent.outbound.rules import check_request
    from phoneagent.personas import Persona

    persona = Persona(
        id="line", name="Line", numbers=("+14155550100",), instructions="x", greeting="Hi",
        voice="v", language="en-US", goodbye="Bye", outbound=OutboundSettings(greeting="Hi",
        from_number="+14155550100"),
    )  # fmt: skip
    with pytest.raises(OutboundRefused) as refused:
        check_request("line", persona, to, None, {}, {})
    assert (refused.value.code, refused.value.field) == ("invalid_request", "to")
