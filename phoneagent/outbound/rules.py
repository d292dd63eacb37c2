"""The decisions of outbound calls, free of I/O: whether a call may be placed now, what
Twilio's answering machine detection means for the call, and how a call nobody answered is
reported. The dialer and the routes (the shells) ask here and do what they are told."""

from __future__ import annotations

import enum
import time
from collections.abc import Collection
from datetime import datetime
from zoneinfo import ZoneInfo

from phoneagent.call.context import OUTBOUND, CallContext, ContextProblem, given_context
from phoneagent.personas import OutboundSettings, Persona
from phoneagent.personas.model import WEEKDAYS
from phoneagent.personas.numbers import E164
from phoneagent.records import CallRecord
from phoneagent.records.record import FINAL_STATUSES

# How long a placed call counts against its persona's limit if Twilio never says it ended (a
# lost status callback): the ring time Twilio allows (60 s by default) and the longest call.
RING_SECONDS = 60


class OutboundRefused(Exception):
    """A call that is not placed: ``code`` for machines, ``message`` for people, the request
    ``field`` at fault (None: the request as a whole), and the HTTP status an API answers.
    The codes are the API's (``api/errors.py``): ``invalid_request`` (422) for a value that is
    wrong, with its field; ``outside_calling_hours`` (409), ``too_many_calls`` (429) and
    ``twilio_refused`` (502) for a request that is right but cannot be placed now."""

    def __init__(
        self, code: str, message: str, *, field: str | None = None, status: int = 422
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.status = status

    def as_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "field": self.field}


def invalid(field: str, message: str) -> OutboundRefused:
    return OutboundRefused(INVALID, message, field=field)


INVALID = "invalid_request"


def check_request(
    persona_id: str,
    persona: Persona | None,
    to: str,
    from_: str | None,
    variables: object,
    metadata: object,
) -> tuple[OutboundSettings, CallContext]:
    """The persona's outbound settings and the call's context (its variables resolved with
    the persona's defaults) if the request is well formed; else OutboundRefused."""
    if persona is None:
        raise invalid("persona", f"no persona {persona_id!r}")
    if persona.outbound is None:
        raise invalid(
            "persona", f"persona {persona_id!r} has no [outbound] section: it only answers calls"
        )
    if not isinstance(to, str) or not E164.fullmatch(to):
        raise invalid("to", "'to' is not an E.164 number (+, country code, number)")
    if from_ is not None and (not isinstance(from_, str) or not E164.fullmatch(from_)):
        raise invalid("from", "'from' is not an E.164 number (+, country code, number)")
    if from_ is not None and from_ not in caller_ids(persona):
        # Twilio takes any number of the account (every persona's, every verified caller ID):
        # a key limited to this persona must not call as another business's line.
        raise invalid("from", f"'from' must be one of the persona's own numbers: "
                              f"{', '.join(caller_ids(persona))}")  # fmt: skip
    if to == (from_ or persona.outbound.from_number):
        raise invalid("to", "'to' is the caller ID itself")
    try:
        context = given_context(persona, OUTBOUND, variables, metadata)
    except ContextProblem as problem:
        raise invalid(problem.field, problem.reason) from None
    return persona.outbound, context


def check_not_our_line(to: str, our_lines: Collection[str]) -> None:
    """OutboundRefused when ``to`` is a number one of our personas answers: the agent would
    call itself, two lines held until the time limit (a loop an API client could start)."""
    if to in our_lines:
        raise invalid("to", "'to' is a number a persona of this server answers: "
                            "the agent would be calling itself")  # fmt: skip


def caller_ids(persona: Persona) -> tuple[str, ...]:
    """The numbers a persona's calls may show: its ``[outbound] from`` and its own numbers."""
    assert persona.outbound is not None
    return tuple(dict.fromkeys((persona.outbound.from_number, *persona.numbers)))


def check_calling_hours(persona_id: str, outbound: OutboundSettings, now: datetime) -> None:
    """OutboundRefused (409) when ``now`` (aware) is outside the persona's calling hours, in
    its time zone."""
    local = now.astimezone(ZoneInfo(outbound.timezone))
    day = WEEKDAYS[local.weekday()]
    minute = local.hour * 60 + local.minute
    hours = outbound.calling_hours
    if day in outbound.days and (hours is None or hours[0] <= minute < hours[1]):
        return
    window = f"{_hhmm(hours[0])}-{_hhmm(hours[1])}" if hours else "any time"
    raise OutboundRefused(
        "outside_calling_hours",
        f"persona {persona_id!r} calls {', '.join(outbound.days)} {window} "
        f"({outbound.timezone}); it is {day} {local:%H:%M} there",
        status=409,
    )


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def check_concurrency(persona_id: str, outbound: OutboundSettings, active: int) -> None:
    """OutboundRefused (429) when the persona already has its limit of calls under way."""
    if active >= outbound.max_concurrent_calls:
        raise OutboundRefused(
            "too_many_calls",
            f"persona {persona_id!r} already has {active} outbound calls under way "
            f"(max_concurrent_calls = {outbound.max_concurrent_calls}); try again when one ends",
            status=429,
        )


def counting_window(persona: Persona) -> float:
    """Seconds a placed call may count as under way at most (see RING_SECONDS)."""
    return RING_SECONDS + persona.max_call_seconds


def under_way(record: CallRecord) -> bool:
    """A call we placed that has not ended (as far as its record knows)."""
    return (
        record.direction == OUTBOUND
        and record.status not in FINAL_STATUSES
        and record.ended_at is None
    )


def machine_detection(outbound: OutboundSettings) -> str:
    """Twilio's ``MachineDetection``: with a voicemail message to leave, wait for the end of the
    machine's greeting (the beep) so the message is recorded whole; else tell at once."""
    return "DetectMessageEnd" if outbound.voicemail_message else "Enable"


class Answer(enum.Enum):
    AGENT = "agent"  # a person (or nobody could tell): the agent talks
    VOICEMAIL = "voicemail"  # an answering machine: the voicemail message, or hang up
    HANG_UP = "hang_up"  # a fax machine


def answer_for(answered_by: str) -> Answer:
    """What Twilio's ``AnsweredBy`` means: ``human`` and ``unknown`` (and no detection at all)
    get the agent, ``machine_start`` / ``machine_end_beep`` / ``machine_end_silence`` /
    ``machine_end_other`` the voicemail message, ``fax`` a hang-up."""
    if answered_by.startswith("machine_"):
        return Answer.VOICEMAIL
    if answered_by == "fax":
        return Answer.HANG_UP
    return Answer.AGENT


#: A person answered a placed call, but the server could take no more calls (PHONEAGENT_MAX_CALLS):
#: they heard the persona's apology. Recorded so; ``call.ended`` reads "error".
NO_CAPACITY = "no_capacity"

#: Twilio's CallStatus of a call that never reached anyone, as ``call.ended`` reports it.
UNANSWERED = {"busy": "busy", "no-answer": "no_answer", "failed": "failed", "canceled": "canceled"}


def end_reason_without_agent(call_status: str, record: CallRecord | None, answered: str) -> str:
    """How a placed call that ended without a media stream ends, by its last CallStatus and
    who answered; "" when the call is not over, or the stream reports its own end."""
    if call_status in UNANSWERED:
        return UNANSWERED[call_status]
    if call_status != "completed" or (record is not None and record.started_at is not None):
        return ""
    kind = answer_for(answered)
    if kind is Answer.VOICEMAIL:
        return "voicemail"
    if kind is Answer.HANG_UP:
        return "fax"
    return ""  # a person answered: the stream reports the end (see hung_up_before_the_agent)


def hung_up_before_the_agent(call_status: str, record: CallRecord | None, answered: str) -> bool:
    """A person answered (or nobody could tell) and the call is over with no stream in the
    record: they hung up between the agent's TwiML and the stream's start, unless a stream did
    start whose record is not in yet (another instance's). The routes tell the two apart by the
    stream token: whoever claims it first, the stream or the end's report, is the only one to
    report the call."""
    started = record is not None and record.started_at is not None
    return call_status == "completed" and not started and answer_for(answered) is Answer.AGENT


def now_utc() -> datetime:
    return datetime.fromtimestamp(time.time()).astimezone()
