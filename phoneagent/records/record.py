"""A call's record, and the changes the call path makes to it. No I/O.

The voice webhook, the media stream, Twilio's status callbacks and a transfer each change the
record of one call, possibly on different instances. Each change is a value that says what it
sets, so a shared store can apply it where the record lives (one SQL statement) without
overwriting what another instance wrote meanwhile; :func:`apply` is the same change applied to a
record in memory, and the reference for the database's version.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

#: Twilio's CallStatus values after which the call is over: a late write from the call's own
#: path (a stream starting, a call ending) never turns them back into "in-progress".
FINAL_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})


@dataclass
class CallRecord:
    call_sid: str
    persona: str = ""
    model_session: str = ""  # the model's session id: StepFun support asks for it
    caller: str = ""  # Twilio's From
    called: str = ""  # Twilio's To: the business's line
    status: str = "ringing"  # the latest CallStatus Twilio reported, or our own view
    started_at: float | None = None  # Unix time the (latest) media stream started
    ended_at: float | None = None
    end_reason: str | None = None
    # {"target", "number", "reason"} once Twilio took a transfer; "error" (the Dial status)
    # added when nobody answered it and the caller came back to the agent.
    transfer: dict | None = None
    transcript: list[dict] = field(default_factory=list)  # finished turns, whole call once ended
    twilio_events: list[dict] = field(default_factory=list)  # status callbacks, as received
    stats: dict = field(default_factory=dict)  # barge-ins, reaction times, first audio (at end)
    # The call's context (call/context.py), written once by whoever connected the stream:
    # "inbound" or "outbound" ("" until then), its variables' values, the business's metadata.
    direction: str = ""
    variables: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Answered:
    """A webhook named the call's persona and numbers: each fills what is not known yet (the
    stream, which knows better, may have come first on another instance). With a
    ``direction``, it also carries the call's context (``variables``, ``metadata``), set as a
    whole the first time only: a replayed webhook or a transfer's return changes nothing."""

    persona: str = ""
    caller: str = ""
    called: str = ""
    direction: str = ""
    variables: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StreamStarted:
    """A media stream of the call started, with this model session: the call is live (again,
    for a call coming back from a transfer nobody answered)."""

    at: float
    persona: str
    model_session: str
    caller: str = ""  # "": keep what is known
    called: str = ""


@dataclass(frozen=True)
class TurnFinished:
    """A turn became final. An agent's turn the caller then interrupts becomes final again, cut
    to what was heard (the call core's honest transcript): the same turn, by role and start,
    replaces the one recorded."""

    turn: dict


# Status callbacks kept per call, the latest. Twilio sends a handful per stream (call and
# stream statuses); its signature has no timestamp, so a captured callback sent again and again
# would otherwise grow the record (and its every read and rewrite) without bound.
TWILIO_EVENTS_KEPT = 100


@dataclass(frozen=True)
class TwilioReported:
    """A status callback: kept as received; its CallStatus, if any, is the call's status."""

    event: dict


@dataclass(frozen=True)
class Transferred:
    transfer: dict | None  # None: the transfer Twilio was asked for did not happen


@dataclass(frozen=True)
class TransferNotAnswered:
    """Twilio dialled the transfer's target and nobody took the call: ``status`` is the Dial
    status (``no-answer``, ``busy``…). The record keeps the transfer, with the status as its
    ``error`` (as ``call.transferred`` reports it), so the caller's return to the agent does
    not read as a transfer. The same change again changes nothing: the Dial action and the
    returning stream both make it, maybe on different instances."""

    status: str


@dataclass(frozen=True)
class StreamEnded:
    """The stream is over. ``transcript`` is the whole call's so far (an earlier stream's turns
    first), replacing the turns added as they finished."""

    at: float
    end_reason: str
    transcript: list[dict]
    stats: dict


Change = (
    Answered
    | StreamStarted
    | TurnFinished
    | TwilioReported
    | Transferred
    | TransferNotAnswered
    | StreamEnded
)


def apply(record: CallRecord, change: Change) -> None:
    """``change`` made to ``record``, in place."""
    if isinstance(change, (Answered, StreamStarted)):  # texts from Twilio and the model's server
        change = replace(change, **{k: well_formed(v) for k, v in asdict(change).items()})
    match change:
        case Answered():
            record.persona = record.persona or change.persona
            record.caller = record.caller or change.caller
            record.called = record.called or change.called
            if change.direction and not record.direction:
                record.direction = change.direction
                record.variables, record.metadata = change.variables, change.metadata
        case StreamStarted():
            record.started_at = change.at
            record.ended_at = record.end_reason = None
            record.persona, record.model_session = change.persona, change.model_session
            record.caller = change.caller or record.caller
            record.called = change.called or record.called
            if record.status not in FINAL_STATUSES:
                record.status = "in-progress"
        case TurnFinished():
            turn, key = well_formed(dict(change.turn)), _turn_key(change.turn)
            same = [i for i, t in enumerate(record.transcript) if _turn_key(t) == key]
            if same:
                record.transcript[same[-1]] = turn
            else:
                record.transcript.append(turn)
        case TwilioReported():
            record.twilio_events.append(dict(change.event))
            del record.twilio_events[:-TWILIO_EVENTS_KEPT]  # the latest only (see the bound)
            status = change.event.get("CallStatus")
            # Twilio's callbacks may arrive out of order (a late "ringing" after "completed"):
            # a call that is over stays over, whatever a later callback says.
            if status and (record.status not in FINAL_STATUSES or status in FINAL_STATUSES):
                record.status = status
        case Transferred():
            transfer = change.transfer
            record.transfer = well_formed(dict(transfer)) if transfer is not None else None
        case TransferNotAnswered():
            if record.transfer is not None:
                record.transfer = {**record.transfer, "error": well_formed(change.status)}
        case StreamEnded():
            record.ended_at, record.end_reason = change.at, change.end_reason
            record.transcript = [well_formed(dict(turn)) for turn in change.transcript]
            record.stats = dict(change.stats)
            if record.status == "in-progress":  # Twilio's call-status callback may say more
                record.status = "completed"


def transfer_taken(record: CallRecord) -> dict | None:
    """The transfer that took the call from the agent, if the call's latest part ended so: not
    one nobody answered (the caller came back, and what followed ended otherwise)."""
    transfer = record.transfer
    return transfer if transfer is not None and "error" not in transfer else None


def well_formed(value: Any) -> Any:
    """``value`` with its texts made encodable: a model's text split mid-emoji across two
    deltas holds lone surrogates, which no page, JSON answer or database takes as UTF-8 (a 500
    on the call's page). A pair split and joined again is made whole; a lone half is U+FFFD."""
    if isinstance(value, str):
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    if isinstance(value, dict):
        return {well_formed(k): well_formed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [well_formed(v) for v in value]
    return value


def _turn_key(turn: dict) -> tuple:
    return turn.get("role"), turn.get("start_ms")
