"""What the model is told: the session a persona asks for, the greeting, and the conversation
so far for a session that joins mid-call. No I/O."""

from __future__ import annotations

from collections.abc import Iterable

from phoneagent.handoff import say_exactly, tools_for
from phoneagent.personas import Persona
from phoneagent.realtime.base import AddTextItem, SessionConfig

LANGUAGE_NAMES = {
    "en": "English",
    "zh": "Mandarin Chinese",
    "es": "Spanish",
    "fr": "French",
    "de": "German",
    "it": "Italian",
    "ja": "Japanese",
    "pt": "Portuguese",
}


def session_config(persona: Persona) -> SessionConfig:
    """The model session a persona asks for. StepFun has no language setting (reference
    section 5): the language goes into the instructions."""
    language = LANGUAGE_NAMES.get(persona.language.split("-")[0].lower(), persona.language)
    instructions = (
        f"{persona.instructions.strip()}\n\n"
        f"You are on a phone call. Always speak {language}. Keep answers short and spoken: "
        "no lists, no markdown, no emoji."
    )
    return SessionConfig(
        instructions=instructions,
        voice=persona.voice,
        silence_duration_ms=persona.silence_duration_ms,
        prefix_padding_ms=persona.prefix_padding_ms,
        vad_threshold=persona.vad_threshold,
        tools=tools_for(persona),
    )


def greeting_instructions(persona: Persona) -> str:
    return f"Greet the caller. {say_exactly(persona.greeting)}"


def replay(transcript: Iterable[dict]) -> list[AddTextItem]:
    """A transcript's turns as conversation items, for a model session that has not heard
    them (a new session mid-call, or a call coming back from a transfer)."""
    return [
        AddTextItem("user" if t["role"] == "caller" else "assistant", t["text"])
        for t in transcript
        if t["text"]
    ]
