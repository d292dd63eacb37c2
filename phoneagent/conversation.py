"""What the model is told: the session a persona asks for, the greeting, and the conversation
so far for a session that joins mid-call. No I/O."""

from __future__ import annotations

from collections.abc import Iterable

from phoneagent.handoff import tools_for
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


# StepFun's documented way to have fixed words said (D-GUIDE 开发技巧/实现开场白,
# https://platform.stepfun.com/docs/zh/guides/developer/realtime): this prompt and the words,
# in the session's instructions, then response.create.
VERBATIM_PROMPT = "请你原样无修改地输出下面的话："


def say_verbatim(persona: Persona, sentence: str) -> str:
    """The session's instructions while the agent says *sentence* word for word: the persona's
    own (so the voice and manner stay), then the documented prompt and the sentence, last."""
    return f"{session_config(persona).instructions}\n\n{VERBATIM_PROMPT}{sentence}"


def with_guidance(persona: Persona, guidance: str) -> str:
    """The session's instructions for one response the agent words itself (a nudge, an
    apology): the persona's own, then what this response is for."""
    return f"{session_config(persona).instructions}\n\n{guidance}"


def replay(transcript: Iterable[dict]) -> list[AddTextItem]:
    """A transcript's turns as conversation items, for a model session that has not heard
    them (a new session mid-call, or a call coming back from a transfer)."""
    return [
        AddTextItem("user" if t["role"] == "caller" else "assistant", t["text"])
        for t in transcript
        if t["text"]
    ]
