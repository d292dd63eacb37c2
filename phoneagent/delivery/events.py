"""Call events, schema 1: what a business's webhook receives.

Every event is one JSON object, the envelope the Standard Webhooks spec recommends::

    {"schema": 1, "id": "evt_…", "type": "call.ended", "timestamp": "…Z", "data": {…}}

``id`` is also the ``webhook-id`` header, unchanged across retries: receivers deduplicate on it.
``timestamp`` is when the event happened (not when it was sent). ``data`` depends on ``type``
(see the README for a full example). Schema 1 only grows by adding keys or values; anything a
receiver could break on gets a new schema number.

The builders take plain values so the call path, tests and benchmarks need no persona object or
``Call`` to make an event; they validate what they are given (a typo'd end reason fails at the
source, not in a customer's CRM).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "DEFAULT_WEBHOOK_EVENTS",
    "DIRECTIONS",
    "END_REASONS",
    "EVENT_TYPES",
    "OUTBOUND_END_REASONS",
    "SCHEMA_VERSION",
    "TRANSFER_OUTCOMES",
    "Event",
    "call_ended_event",
    "call_started_event",
    "call_transferred_event",
    "mask_number",
    "new_event_id",
]

SCHEMA_VERSION = 1

CALL_STARTED = "call.started"
CALL_TRANSFERRED = "call.transferred"
CALL_ENDED = "call.ended"
EVENT_TYPES = (CALL_STARTED, CALL_TRANSFERRED, CALL_ENDED)
#: What a persona's webhook receives when it does not list ``events``: the transcript.
DEFAULT_WEBHOOK_EVENTS = (CALL_ENDED,)

#: Why a call ended, as ``call.ended`` reports it. ``server_lost``: the instance running the
#: call stopped without ending it (killed, crashed, power lost); the next start reports it.
#: How an outbound call the agent never talked in ends: Twilio's CallStatus ``busy``,
#: ``no-answer``, ``failed``, ``canceled``; ``voicemail`` (an answering machine took the
#: persona's voicemail message, or was hung up on) or ``fax``.
OUTBOUND_END_REASONS = ("busy", "no_answer", "failed", "canceled", "voicemail", "fax")
END_REASONS = (
    "caller_hung_up", "agent_hung_up", "transferred", "error", "time_limit", "server_lost",
    "server_shutdown", *OUTBOUND_END_REASONS,
)  # fmt: skip
#: ``accepted``: Twilio took the transfer and is dialling the target; ``failed``: it refused
#: (the call stayed with the agent or ended; ``error`` says why).
TRANSFER_OUTCOMES = ("accepted", "failed")
ROLES = ("caller", "agent")
#: A call's direction (call/context.py): answered, or placed by the business.
DIRECTIONS = ("inbound", "outbound")

_E164 = re.compile(r"\+[1-9]\d{6,14}")
# What Twilio sends in From when the caller withheld their number: nothing to mask.
_WITHHELD = frozenset({"", "anonymous", "restricted", "unknown", "unavailable", "private"})
MASK_KEEP_DIGITS = 4


@dataclass(frozen=True)
class Event:
    """One event, ready for the outbox. ``body()`` is the exact bytes that are signed and sent."""

    id: str
    type: str
    timestamp: str  # ISO 8601, UTC, millisecond precision
    data: Mapping[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "id": self.id,
            "type": self.type,
            "timestamp": self.timestamp,
            "data": dict(self.data),
        }

    def body(self) -> bytes:
        # Compact and UTF-8: the spec recommends minified JSON, and the bytes are serialised
        # once (stored in the outbox) so every retry sends exactly what was signed.
        return json.dumps(self.payload(), ensure_ascii=False, separators=(",", ":")).encode()


def new_event_id() -> str:
    """``evt_`` + 24 random hex digits: unique, and free of '.' (the signature's delimiter)."""
    return "evt_" + secrets.token_hex(12)


def mask_number(number: str) -> str:
    """A caller's number with all but its last four digits hidden: ``+*******0123``.

    Withheld numbers (``anonymous``…) pass unchanged, they identify nobody; anything else that
    is not an E.164 number (a SIP URI, ``client:alice``) is replaced whole, since we cannot tell
    which part identifies the caller.
    """
    if number.strip().lower() in _WITHHELD:
        return number
    if _E164.fullmatch(number):
        digits = number[1:]
        return "+" + "*" * (len(digits) - MASK_KEEP_DIGITS) + digits[-MASK_KEEP_DIGITS:]
    return "redacted"


Timestamp = datetime | float  # an aware datetime, or Unix seconds


def call_started_event(
    *,
    call_sid: str,
    persona_id: str,
    persona_name: str,
    from_number: str,
    to_number: str,
    started_at: Timestamp,
    mask_caller: bool = False,
    event_id: str | None = None,
    **context: Any,
) -> Event:
    """``call.started``: the media stream is connected and the persona is answering.
    ``context`` (each builder's): the call's ``direction``, ``variables`` and ``metadata``."""
    started = _utc(started_at, "started_at")
    return Event(
        id=event_id or new_event_id(),
        type=CALL_STARTED,
        timestamp=_iso(started),
        data={
            **_call_fields(
                call_sid, persona_id, persona_name, from_number, to_number, mask_caller, **context
            ),
            "started_at": _iso(started),
        },
    )


def call_transferred_event(
    *,
    call_sid: str,
    persona_id: str,
    persona_name: str,
    from_number: str,
    to_number: str,
    target: str,
    target_number: str,
    outcome: str,
    at: Timestamp,
    error: str | None = None,
    reason: str | None = None,
    mask_caller: bool = False,
    event_id: str | None = None,
    **context: Any,
) -> Event:
    """``call.transferred``: the agent handed the call to a transfer target of the persona.
    ``reason``: why, as the model said it when it asked for the transfer ("caller sounds
    distressed"), or the keypad digit the caller pressed; None when unknown."""
    if outcome not in TRANSFER_OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(TRANSFER_OUTCOMES)}, not {outcome!r}")
    when = _utc(at, "at")
    return Event(
        id=event_id or new_event_id(),
        type=CALL_TRANSFERRED,
        timestamp=_iso(when),
        data={
            **_call_fields(
                call_sid, persona_id, persona_name, from_number, to_number, mask_caller, **context
            ),
            "target": target,
            "target_number": target_number,
            "outcome": outcome,
            "error": error,
            "reason": reason or None,
        },
    )


def call_ended_event(
    *,
    call_sid: str,
    persona_id: str,
    persona_name: str,
    from_number: str,
    to_number: str,
    started_at: Timestamp,
    ended_at: Timestamp,
    end_reason: str,
    transcript: Iterable[Mapping[str, Any]],
    transfer_target: str | None = None,
    transfer_number: str | None = None,
    transfer_reason: str | None = None,
    mask_caller: bool = False,
    event_id: str | None = None,
    **context: Any,
) -> Event:
    """``call.ended``, with the transcript.

    ``transcript``: turns in call order, each a mapping with ``role`` (``caller`` or ``agent``),
    ``text``, ``start_ms`` and ``end_ms`` (offsets from the start of the call) and optionally
    ``interrupted`` (the caller talked over this agent turn; its text is what the caller heard).
    ``Call.transcript`` produces exactly this. ``transfer_target``/``transfer_number``: where
    the call went, when ``end_reason`` is ``transferred``; ``transfer_reason``: why (see
    :func:`call_transferred_event`).
    """
    if end_reason not in END_REASONS:
        raise ValueError(f"end_reason must be one of {', '.join(END_REASONS)}, not {end_reason!r}")
    started = _utc(started_at, "started_at")
    ended = _utc(ended_at, "ended_at")
    if ended < started:
        raise ValueError(f"ended_at ({_iso(ended)}) is before started_at ({_iso(started)})")
    transfer = (
        {"target": transfer_target, "number": transfer_number, "reason": transfer_reason or None}
        if transfer_target is not None
        else None
    )
    return Event(
        id=event_id or new_event_id(),
        type=CALL_ENDED,
        timestamp=_iso(ended),
        data={
            **_call_fields(
                call_sid, persona_id, persona_name, from_number, to_number, mask_caller, **context
            ),
            "started_at": _iso(started),
            "ended_at": _iso(ended),
            "duration_seconds": round((ended - started).total_seconds(), 3),
            "end_reason": end_reason,
            "transfer": transfer,
            "transcript": [_turn(turn, i) for i, turn in enumerate(transcript)],
        },
    )


def _call_fields(
    call_sid: str,
    persona_id: str,
    persona_name: str,
    from_number: str,
    to_number: str,
    mask_caller: bool,
    *,
    direction: str = "inbound",
    variables: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The fields every event has. ``call_sid`` stays first: the outbox finds an event's call
    by the body's start (pg_outbox, migration step 6). ``direction``, ``variables`` and
    ``metadata``: the call's context (call/context.py), metadata as the business gave it."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")
    return {
        "call_sid": call_sid,
        "persona": {"id": persona_id, "name": persona_name},
        "from": mask_number(from_number) if mask_caller else from_number,
        "from_masked": mask_caller,
        "to": to_number,
        "direction": direction,
        "variables": dict(variables or {}),
        "metadata": dict(metadata or {}),
    }


def _turn(turn: Mapping[str, Any], index: int) -> dict[str, Any]:
    role = turn.get("role")
    if role not in ROLES:
        raise ValueError(f"transcript[{index}].role must be 'caller' or 'agent', not {role!r}")
    text = turn.get("text", "")
    if not isinstance(text, str):
        raise ValueError(f"transcript[{index}].text must be a string, not {type(text).__name__}")
    start_ms, end_ms = turn.get("start_ms"), turn.get("end_ms")
    for key, value in (("start_ms", start_ms), ("end_ms", end_ms)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"transcript[{index}].{key} must be a whole number of ms ≥ 0")
    return {
        "role": role,
        "text": text,
        "start_ms": start_ms,
        # A turn cut at barge-in before any of it was heard can end "before" it started.
        "end_ms": max(start_ms, end_ms),
        "interrupted": bool(turn.get("interrupted", False)),
    }


def _utc(value: Timestamp, name: str) -> datetime:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{name} must be timezone-aware (a naive datetime is ambiguous)")
        return value.astimezone(UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    raise TypeError(f"{name} must be a datetime or Unix seconds, not {type(value).__name__}")


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
