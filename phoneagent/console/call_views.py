"""How a call reads in the console: its numbers (masked as its persona masks them), times,
state, turns and stats, for the pages (``calls``) and the event stream (``call_events``)."""

from __future__ import annotations

import re
import statistics
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from phoneagent.bridge import CallShell
from phoneagent.console.web import PREFIX
from phoneagent.delivery.events import mask_number
from phoneagent.delivery.outbox import OutboxItem
from phoneagent.personas import Persona
from phoneagent.records import CallRecord
from phoneagent.state import ServerState

#: Twilio's CallSid: anything else in a URL is a 404 before any lookup.
CALL_SID = re.compile(r"CA[0-9a-fA-F]{32}")

# How the call's state reads (the core's CallState values, and Twilio's CallStatus values).
STATES = {
    "active": "talking",
    "announcing": "announcing a handoff",
    "transferring": "transferring",
    "hanging_up": "hanging up",
    "ended": "ended",
    "ringing": "ringing",
    "in-progress": "in progress",
    "completed": "completed",
    "busy": "busy",
    "failed": "failed",
    "no-answer": "no answer",
    "canceled": "canceled",
}
END_REASONS = {
    "caller_hung_up": "the caller hung up",
    "agent_hung_up": "the agent hung up",
    "transferred": "transferred",
    "time_limit": "the call's time limit",
    "drain_goodbye": "the server was stopping (the agent said goodbye)",
    "server_shutdown": "the server stopped",
    "twilio_disconnected": "Twilio's stream closed without a stop",
    "model_disconnected": "the model went away",
    "error": "an error",
}


def call_sid_of(request: web.Request) -> str | None:
    """The CallSid in the URL, if it is one (anything else is a 404 before any lookup)."""
    call_sid = request.match_info["call_sid"]
    return call_sid if CALL_SID.fullmatch(call_sid) else None


def caller_shown(record: CallRecord, persona: Persona | None) -> str:
    """The caller's number as the console shows it: masked as the persona's webhook masks it
    (events.mask_number). A call whose persona is no longer configured is masked too: whether
    its line wanted its callers hidden is not known any more."""
    if not record.caller:
        return "unknown"
    masks = persona is None or (persona.webhook is not None and persona.webhook.mask_caller)
    return mask_number(record.caller) if masks else record.caller


def clock_time(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(seconds: float | None) -> str:
    """``1:05``, ``1:02:03``."""
    if seconds is None:
        return ""
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


def turn_view(index: int, turn: dict) -> dict[str, Any]:
    """A transcript turn as the page and its script show it (call_events sends the same)."""
    return {
        "index": index,
        "role": "agent" if turn.get("role") == "agent" else "caller",
        "text": str(turn.get("text", "")),
        "at": duration(int(turn.get("start_ms", 0) or 0) / 1000),
        "interrupted": bool(turn.get("interrupted", False)),
    }


def state_text(state: str) -> str:
    return STATES.get(state, state)


def end_text(reason: str | None) -> str:
    return END_REASONS.get(reason or "", reason or "")


def transfer_text(transfer: dict | None) -> str:
    if not transfer:
        return ""
    text = f"{transfer.get('target', '?')} ({transfer.get('number', '?')})"
    if "error" in transfer:  # nobody answered: the caller came back to the agent
        text += f", not answered ({transfer['error']})"
    return text


def summary(
    state: ServerState, record: CallRecord, shell: CallShell | None, now: float
) -> dict[str, Any]:
    """One call in a list (Live calls' rows, its JSON, Recent calls' rows)."""
    persona = state.persona(record.persona)
    if shell is not None:
        current = shell.call.state.value
    elif record.ended_at is not None:
        current = "ended"
    else:
        current = record.status
    end = record.ended_at if record.ended_at is not None else now
    return {
        "call_sid": record.call_sid,
        "url": f"{PREFIX}/calls/{record.call_sid}",
        "persona": persona.name if persona is not None else record.persona or "unknown",
        "caller": caller_shown(record, persona),
        "called": record.called,
        "started_at": record.started_at,
        "started": clock_time(record.started_at),
        "duration": duration(end - record.started_at) if record.started_at is not None else "",
        "state": state_text(current),
        "transfer": transfer_text(record.transfer),
        "here": shell is not None,
        "end_reason": end_text(record.end_reason),
        "turns": len(record.transcript),
    }


def barge_ins(record: CallRecord, shell: CallShell | None) -> int:
    if shell is not None:
        return shell.call.stats.barge_ins
    if "barge_ins" in record.stats:
        return int(record.stats["barge_ins"])
    return sum(1 for turn in record.transcript if turn.get("interrupted"))


def stats_lines(stats: dict) -> list[tuple[str, str]]:
    """CallStats.as_dict(), written at the call's end, as (what, value) lines."""
    shown: list[tuple[str, str]] = []
    first = stats.get("first_agent_audio_ms")
    if first is not None:
        shown.append(("Time to first audio", f"{first} ms"))
    if "barge_ins" in stats:
        shown.append(("Barge-ins", str(stats["barge_ins"])))
    if "barge_ins_ignored" in stats:
        shown.append(("Short sounds ignored (no barge-in)", str(stats["barge_ins_ignored"])))
    reactions = [float(ms) for ms in stats.get("barge_in_reaction_ms") or []]
    if reactions:
        reaction = f"median {statistics.median(reactions):.1f} ms, longest {max(reactions):.1f} ms"
        shown.append(("Barge-in reaction", reaction))
    if "discarded_agent_ms" in stats:
        shown.append(("Agent audio never heard", f"{stats['discarded_agent_ms']} ms"))
    return shown


def twilio_event(event: dict) -> dict[str, str]:
    what = event.get("CallStatus") or event.get("StreamEvent") or "?"
    details = [f"{key} {event[key]}" for key in ("CallDuration", "StreamError") if event.get(key)]
    return {
        "what": str(what),
        "when": str(event.get("Timestamp", "")),
        "details": ", ".join(details),
        "path": str(event.get("path", "")),
    }


def delivery(item: OutboxItem) -> dict[str, Any]:
    last = ""
    if item.last_status is not None:
        last = f"HTTP {item.last_status}"
    if item.last_error:
        last = f"{last}: {item.last_error}" if last else item.last_error
    return {
        "id": item.id,
        "type": item.type,
        "status": str(item.status),
        "attempts": item.attempts,
        "receiver": item.destination,
        "queued": clock_time(item.created_at),
        "delivered": clock_time(item.delivered_at),
        "last": last,
    }
