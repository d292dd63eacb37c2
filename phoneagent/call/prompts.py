"""Every sentence the model is told, in one place: the session a persona asks for, the words it
must say verbatim, the guidance for single responses, the notes that tell it what happened on
the line, and the conversation so far for a session that joins mid-call. No I/O.

The tools' descriptions stay with the tools (``phoneagent.handoff``): they are part of each
tool's declaration, beside the parameter schema and the target list they describe, and the
session config here already imports them (moving them here would make the two import each
other)."""

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


# --- guidance for one response ---------------------------------------------------------------

STILL_THERE = "The caller has been silent for a while: ask, briefly, if they are still there."
FINISH_CUT_ANSWER = "Your last answer was cut off by a technical problem: finish it briefly."
TRANSFER_FAILED_TELL = (
    "Tell the caller, briefly and kindly, that you could not connect them right now, "
    "and offer to take a message or help another way."
)


def transfer_not_answered(target: str, outcome: str) -> str:
    """The opening of a call back from a transfer nobody answered."""
    return (
        f"You tried to transfer the caller to {target.replace('_', ' ')}, but the call was "
        f"not answered ({outcome}). Apologise briefly, and offer to take a message or to "
        "help another way."
    )


# --- notes on what happened on the line ----------------------------------------------------


def transfer_failed_note(error: str) -> str:
    return f"(The transfer did not go through: {error}. The caller is still with you.)"


def handoff_cancelled_note(what: str) -> str:
    return f"(The caller interrupted you, so the {what} did not happen. Listen to them.)"


def time_limit_note(seconds: int) -> str:
    return f"(The call must end in {seconds} seconds: wrap up politely and briefly.)"


def keypad_note(digits: str) -> str:
    return f"(I pressed {digits} on my phone's keypad.)"


# --- tool outputs ----------------------------------------------------------------------------

TOOL_INTERRUPTED = "not done: the caller interrupted"
TOOL_ACCEPTED = "ok: the agent says the sentence for you, then the call is handed on"


def tool_refused(error: str) -> str:
    return f"error: {error}"
