"""Lines: every persona with its numbers, language, voice, transfer targets, webhook and limits,
and what the last reload of the persona files refused.

Read-only: persona files are the one place a line is configured (reviewed, versioned, checked
by ``phoneagent personas check``); the console shows what this instance serves from them. A
webhook is shown by its URL (without query or credentials) and the *name* of the variable that
holds its signing secret, never the secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from phoneagent.console.web import PREFIX, add_section, page, render
from phoneagent.delivery.outbox import display_url
from phoneagent.personas import KeypadHangUp, KeypadTransfer, Persona
from phoneagent.state import STATE


def add_routes(app: web.Application) -> None:
    add_section(app, "/lines", "Lines")
    app.router.add_get(f"{PREFIX}/lines", page(lines_page))


@dataclass(frozen=True)
class Limit:
    label: str
    value: str
    field: str  # the persona file's key, so the operator knows what to change


async def lines_page(request: web.Request) -> web.Response:
    registry = request.app[STATE].personas
    personas = sorted(registry.current.personas.values(), key=lambda p: p.name.lower())
    refused = registry.refused
    return render(
        request,
        "lines.html",
        personas=personas,
        directory=registry.directory,
        refused_lines=refused.report.lines() if refused else [],
        refused_at=utc(refused.at) if refused else "",
        keypad=keypad_rows,
        limits=limits,
        webhook_url=display_url,
    )


def keypad_rows(persona: Persona) -> list[tuple[str, str]]:
    """(digit, what it does) in keypad order."""
    order = "1234567890*#"
    rows = []
    for digit in sorted(persona.keypad, key=order.index):
        action = persona.keypad[digit]
        if isinstance(action, KeypadTransfer):
            rows.append((digit, f"transfer to {action.target.name} ({action.target.number})"))
        elif isinstance(action, KeypadHangUp):
            rows.append((digit, "end the call"))
    return rows


def limits(persona: Persona) -> list[Limit]:
    silence = persona.silence_timeout_seconds
    return [
        Limit("Longest call", duration(persona.max_call_seconds), "max_call_seconds"),
        Limit(
            "Silent caller",
            f"asked if still there after {duration(silence)}, hung up on {duration(silence)} later"
            if silence
            else "never hung up on",
            "silence_timeout_seconds",
        ),
        Limit("Pause that ends a turn", f"{persona.silence_duration_ms} ms", "silence_duration_ms"),
        Limit("Speech kept before a turn", f"{persona.prefix_padding_ms} ms", "prefix_padding_ms"),
        Limit("Speech loudness threshold", str(persona.vad_threshold), "vad_threshold"),
        Limit(
            "Speech that interrupts the agent",
            f"{persona.barge_in_min_speech_ms} ms",
            "barge_in_min_speech_ms",
        ),
    ]


def duration(seconds: int) -> str:
    """``900`` → ``15 min``; ``90`` → ``1 min 30 s``; ``45`` → ``45 s``."""
    minutes, rest = divmod(seconds, 60)
    if not minutes:
        return f"{rest} s"
    return f"{minutes} min" + (f" {rest} s" if rest else "")


def utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
