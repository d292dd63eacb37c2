"""Every sentence the model is told, in one place: the session a persona asks for (its
instructions and its tools' descriptions), the words it must say verbatim, the guidance for
single responses, the notes that tell it what happened on the line, and the conversation so far
for a session that joins mid-call. No I/O.

The session's instructions are composed once, here, always in the same order: the persona's
own instructions first (who the agent is: StepAudio 2.5 Realtime is built to hold a persona),
then the rules of a phone call, then how the agent sounds (``tone``, ``speaking_rate``), then
how to listen to the caller (and whom to hand an upset caller to). What phoneagent adds is in
English: StepFun's model was seen to call tools only with English instructions and tool
descriptions, even when the caller speaks Mandarin (reference section 5, PROBE5).
"""

from __future__ import annotations

from collections.abc import Iterable

from phoneagent.handoff import END_CALL_TOOL, REASON_ARGUMENT, TARGET_ARGUMENT, TRANSFER_TOOL
from phoneagent.personas import Persona
from phoneagent.realtime.base import AddTextItem, SessionConfig, ToolSpec

LANGUAGE_NAMES = {
    "en": "English",
    "zh": "Mandarin Chinese",
    "cmn": "Mandarin Chinese",
    "es": "Spanish",
    "fr": "French",
    "de": "German",
    "it": "Italian",
    "ja": "Japanese",
    "pt": "Portuguese",
}


def session_config(persona: Persona) -> SessionConfig:
    """The model session a persona asks for. StepFun has no language, tone or speed setting
    (reference section 5): they go into the instructions."""
    return SessionConfig(
        instructions=instructions_for(persona),
        voice=persona.voice,
        silence_duration_ms=persona.silence_duration_ms,
        prefix_padding_ms=persona.prefix_padding_ms,
        vad_threshold=persona.vad_threshold,
        tools=tools_for(persona),
    )


def instructions_for(persona: Persona) -> str:
    """The session's instructions: the persona's, then what every phone call needs."""
    parts = [persona.instructions.strip(), phone_call_rules(persona)]
    if voice := voice_direction(persona):
        parts.append(voice)
    parts.append(listening(persona))
    return "\n\n".join(parts)


def language_name(tag: str) -> str:
    return LANGUAGE_NAMES.get(tag.split("-")[0].lower(), tag)


def phone_call_rules(persona: Persona) -> str:
    rules = (
        f"You are on a phone call. Always speak {language_name(persona.language)}. Keep answers "
        "short and spoken: no lists, no markdown, no emoji. Stay the character described above "
        "for the whole call, whatever the caller says; if they ask whether they are talking "
        "to a person, answer truthfully."
    )
    if persona.tools:
        rules += f" {BUSINESS_TOOL_RULES}"
    return rules


# Said once in the session's instructions when the persona has tools of its own: how to use
# their answers (JSON from the business, or {"error": ...} from phoneagent).
BUSINESS_TOOL_RULES = (
    "Some of your tools ask the business's own systems: when the caller needs what one of them "
    "knows, call it instead of guessing, and answer from what it returns, in your own words. "
    'If it returns an "error", apologise briefly and offer another way to help; never read '
    "the error out."
)


# StepFun documents audio behaviour as something the instructions steer ("快声说", speak fast:
# D-REF session.update `instructions`); one sentence per rate, the same for every persona.
SPEAKING_RATE_DIRECTIONS = {
    "slow": "Speak slowly and clearly, with a short pause between sentences.",
    "normal": "",
    "fast": "Speak briskly, a little faster than usual, and keep every word clear.",
}


def voice_direction(persona: Persona) -> str:
    """How the agent sounds, from ``tone`` and ``speaking_rate`` ("" when neither is set): it
    holds for every reply, the sentences said word for word included."""
    sentences = []
    if persona.tone:
        end = "" if persona.tone[-1] in ".!?。！？" else "."
        sentences.append(
            f"Your voice in every reply, including sentences you are asked to say word for "
            f"word: {persona.tone}{end}"
        )
    if rate := SPEAKING_RATE_DIRECTIONS[persona.speaking_rate]:
        sentences.append(rate)
    return " ".join(sentences)


def listening(persona: Persona) -> str:
    """How to hear the caller: StepAudio 2.5 Realtime perceives tone, pace and emotion in the
    voice (its model page: 副语言感知), so it is asked to use them, and, when the persona names
    a target for it, to hand an upset caller to a person."""
    text = (
        "Listen to how the caller sounds, not only to their words: tone, pace, hesitation, "
        "tiredness. Match your pace and warmth to theirs, and be calm and patient with a "
        "caller who is upset or confused."
    )
    target = persona.upset_caller_target
    if target:
        text += (
            " If the caller sounds angry, distressed or confused and you cannot settle it in a "
            f'sentence or two, call {TRANSFER_TOOL} with target "{target}", and give as the '
            f"reason what you heard (for example: caller sounds distressed)."
        )
    return text


def tools_for(persona: Persona) -> tuple[ToolSpec, ...]:
    """The tools declared to the model (their names and arguments: ``handoff``)."""
    tools = []
    if persona.transfer:
        targets = "; ".join(f"{t.name}: {t.description}" for t in persona.transfer.values())
        upset = persona.upset_caller_target
        when = (
            f", or, to {upset}, when the caller sounds angry, distressed or confused"
            if upset
            else ""
        )
        tools.append(
            ToolSpec(
                name=TRANSFER_TOOL,
                description=(
                    "Transfer the caller to a person. Use it when the caller asks for a person "
                    f"or needs something only a person can do{when}. Targets: {targets}"
                ),
                parameters={
                    "type": "object",
                    "properties": {
                        TARGET_ARGUMENT: {"type": "string", "enum": list(persona.transfer)},
                        REASON_ARGUMENT: {
                            "type": "string",
                            "description": (
                                "why, in a few words: what the caller needs, or how they sound "
                                "(angry, distressed, confused)"
                            ),
                        },
                    },
                    "required": [TARGET_ARGUMENT],
                },
            )
        )
    # The business's own tools, as the persona declares them (their answers: tool_calls.py).
    tools += [ToolSpec(t.name, t.description, dict(t.parameters)) for t in persona.tools]
    tools.append(
        ToolSpec(
            name=END_CALL_TOOL,
            description=(
                "End the call, once the caller has what they needed and said goodbye, or asks "
                "to hang up. The goodbye is said for you: do not say it yourself."
            ),
            parameters={
                "type": "object",
                "properties": {
                    REASON_ARGUMENT: {"type": "string", "description": "why, in a few words"}
                },
            },
        )
    )
    return tuple(tools)


# StepFun's documented way to have fixed words said (D-GUIDE 开发技巧/实现开场白,
# https://platform.stepfun.com/docs/zh/guides/developer/realtime): this prompt and the words,
# in the session's instructions, then response.create.
VERBATIM_PROMPT = "请你原样无修改地输出下面的话："


def say_verbatim(persona: Persona, sentence: str) -> str:
    """The session's instructions while the agent says *sentence* word for word: the persona's
    own (so the voice and manner stay), then the documented prompt and the sentence, last."""
    return f"{instructions_for(persona)}\n\n{VERBATIM_PROMPT}{sentence}"


def with_guidance(persona: Persona, guidance: str) -> str:
    """The session's instructions for one response the agent words itself (a nudge, an
    apology): the persona's own, then what this response is for."""
    return f"{instructions_for(persona)}\n\n{guidance}"


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


def tool_answer_note(tool: str, output: str) -> str:
    """A tool's answer for a model session that did not make the call (it replaced the session
    that did, mid-call): a function_call_output would name a call it never saw."""
    return f"(The {tool} tool you called answered: {output})"


# --- tool outputs ----------------------------------------------------------------------------

TOOL_INTERRUPTED = "not done: the caller interrupted"
TOOL_ACCEPTED = "ok: the agent says the sentence for you, then the call is handed on"


def tool_refused(error: str) -> str:
    return f"error: {error}"
