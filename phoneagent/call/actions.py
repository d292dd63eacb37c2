"""What the ``Call`` asks its shell to do, and why a call ended. No I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from phoneagent.personas import BusinessTool, TransferTarget
from phoneagent.realtime.base import ModelCommand


class EndReason(enum.Enum):
    """Why a call ended: the one vocabulary from the core to the records and event payloads
    (``delivery.publisher`` maps it to the public schema's ``end_reason``)."""

    CALLER_HUNG_UP = "caller_hung_up"  # Twilio sent `stop`
    AGENT_HUNG_UP = "agent_hung_up"  # the agent said goodbye and ended the call
    TRANSFERRED = "transferred"  # the call went to a person; the stream ended with it
    TWILIO_DISCONNECTED = "twilio_disconnected"  # the media socket closed without `stop`
    MODEL_DISCONNECTED = "model_disconnected"  # the model socket closed and did not come back
    TIME_LIMIT = "time_limit"  # the persona's max_call_seconds ran out; the agent said goodbye
    # The instance was stopping: the agent said goodbye and ended the call (a hang-up, like
    # TIME_LIMIT), or the drain time ran out and the call was cut (the caller is still on the
    # line: Twilio's `<Connect action>` answers the apology). Both read "server_shutdown" in the
    # public payload (delivery.publisher); only the stream-ended route tells them apart.
    DRAIN_GOODBYE = "drain_goodbye"
    SERVER_SHUTDOWN = "server_shutdown"


@dataclass(frozen=True)
class SendMedia:
    payload: bytes  # μ-law 8 kHz: 20 ms frames, up to FRAMES_PER_MESSAGE of them


@dataclass(frozen=True)
class SendMark:
    name: str


@dataclass(frozen=True)
class SendClear:
    pass


@dataclass(frozen=True)
class ToModel:
    command: ModelCommand


@dataclass(frozen=True)
class EndCall:
    reason: EndReason


@dataclass(frozen=True)
class TurnFinished:
    """A turn's text is final (for live transcripts); its end time may still move."""

    turn: dict


@dataclass(frozen=True)
class TransferCall:
    """Ask Twilio to dial ``target`` for this caller; answer with ``Call.on_transfer_result``.
    ``reason``: why, as the model gave it (or the keypad digit), for the call's records."""

    target: TransferTarget
    reason: str = ""


@dataclass(frozen=True)
class HangUpCall:
    """Ask Twilio to end the call; answer with ``Call.on_hang_up_result``."""


@dataclass(frozen=True)
class RenewModelSession:
    """Open a new model session and switch to it; answer with ``Call.on_model_reconnected``,
    or ``Call.on_model_renewal_failed``."""


@dataclass(frozen=True)
class ReconnectModel:
    """The model session dropped: after ``after_s``, open a new one and switch to it; answer
    with ``Call.on_model_reconnected``, or ``Call.on_model_reconnect_failed``."""

    after_s: float


@dataclass(frozen=True)
class AskBusinessTool:
    """POST the model's ``arguments`` to the persona tool's URL (signed, within its timeout);
    answer with ``Call.on_tool_answer(call_id, ToolAnswer)``, always, whatever happened."""

    call_id: str
    tool: BusinessTool
    arguments: dict


@dataclass(frozen=True)
class ToolCallFinished:
    """A persona tool call is over (answered, failed or refused): for the metrics."""

    tool: str
    outcome: str  # call/tool_calls.py OUTCOMES
    duration_ms: int | None  # None: refused, the business was not asked


Action = (
    SendMedia
    | SendMark
    | SendClear
    | ToModel
    | EndCall
    | TurnFinished
    | TransferCall
    | HangUpCall
    | RenewModelSession
    | ReconnectModel
    | AskBusinessTool
    | ToolCallFinished
)
