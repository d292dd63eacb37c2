"""Personas as the rest of phoneagent sees them: frozen, validated values (see ``validation``).

A persona is one business line: who answers, what the agent is told, where calls may be handed
on, and where the transcript goes. Nothing here reads files or checks anything: a value of these
types has already passed validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from phoneagent.delivery.events import DEFAULT_WEBHOOK_EVENTS
from phoneagent.personas.numbers import normalise_number
from phoneagent.personas.variables import Template, Variable

__all__ = [
    "KEYPAD_DIGITS",
    "MAX_TONE_CHARS",
    "SPEAKING_RATES",
    "BusinessTool",
    "KeypadAction",
    "KeypadHangUp",
    "KeypadTransfer",
    "Lookup",
    "OutboundSettings",
    "Persona",
    "PersonaSet",
    "TransferTarget",
    "WebhookTarget",
]

# Voice-activity defaults for phone audio. StepFun's own defaults (100 ms of silence ends a turn,
# energy threshold 2500) are tuned for close microphones; μ-law phone audio is quieter and callers
# pause mid-sentence (see reference/stepfun-realtime.md, section 5).
DEFAULT_SILENCE_DURATION_MS = 600
DEFAULT_PREFIX_PADDING_MS = 300
DEFAULT_VAD_THRESHOLD = 1000
DEFAULT_MAX_CALL_SECONDS = 900
# A caller silent this long (and the agent idle) is asked if they are still there; after as long
# again, the agent says goodbye and hangs up. 0 turns it off.
DEFAULT_SILENCE_TIMEOUT_SECONDS = 20
# Phone lines have no echo cancellation, and a caller's "mhm" is not a request to stop: the
# caller must speak this long (loud audio, after the model heard speech start) to cut the agent.
DEFAULT_BARGE_IN_MIN_SPEECH_MS = 300
DEFAULT_BUSY_MESSAGE = (
    "Sorry, all our lines are busy right now. Please call again in a few minutes."
)
DEFAULT_APOLOGY = "Sorry, we are having technical trouble and cannot take your call right now."
# How fast the agent speaks. StepFun's realtime session has no rate or tone setting: its
# documents say the instructions steer the voice ("快声说", speak fast: D-REF, session.update,
# `instructions`), so each rate becomes one sentence of the instructions (call/prompts.py).
SPEAKING_RATES = ("slow", "normal", "fast")
# The longest `tone`: StepAudio 2.5 TTS, whose expressiveness the realtime model inherits,
# takes its whole-reply voice direction (`instruction`) in at most 200 characters.
MAX_TONE_CHARS = 200


@dataclass(frozen=True)
class TransferTarget:
    name: str
    number: str
    description: str  # what the model reads to decide when this target fits
    announcement: str  # what the agent says before the call is handed over
    caller_id: str = ""  # shown to the target; "" means the line that was called
    ring_seconds: int = 25  # how long the target rings before the caller comes back


KEYPAD_DIGITS = frozenset("0123456789*#")


@dataclass(frozen=True)
class KeypadTransfer:
    """A digit that transfers the caller to ``target`` without asking the model."""

    target: TransferTarget


@dataclass(frozen=True)
class KeypadHangUp:
    """A digit that ends the call (after the goodbye) without asking the model."""


#: What a keypad digit may do without asking the model (``[keypad]`` in a persona file).
KeypadAction = KeypadTransfer | KeypadHangUp


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    secret_env: str  # the *name* of the environment variable holding the signing secret
    events: tuple[str, ...] = DEFAULT_WEBHOOK_EVENTS  # which call events this line wants
    mask_caller: bool = False  # send the caller's number as +*******0123


# The tools phoneagent itself gives the model (handoff.py): no persona tool may take their names.
TRANSFER_TOOL = "transfer_call"
END_CALL_TOOL = "end_call"
BUILT_IN_TOOLS = (TRANSFER_TOOL, END_CALL_TOOL)

# A persona tool (``[[tools]]``): how long phoneagent waits for the business's answer, and how
# long the caller waits in silence before the agent says the filler sentence.
DEFAULT_TOOL_TIMEOUT_MS = 5000
DEFAULT_TOOL_FILLER_AFTER_MS = 1500
DEFAULT_TOOL_FILLER = "One moment, let me check that."


@dataclass(frozen=True)
class BusinessTool:
    """A tool the model may call that reaches the business: phoneagent POSTs the arguments to
    ``url`` (signed like the call events) and gives the answer back to the model
    (call/tool_calls.py decides, business_tools.py asks)."""

    name: str
    description: str
    parameters: Mapping  # a JSON-schema object (validated: personas/tool_validation.py)
    url: str
    timeout_ms: int = DEFAULT_TOOL_TIMEOUT_MS
    filler: str = DEFAULT_TOOL_FILLER  # said when the answer is slower than filler_after_ms
    filler_after_ms: int = DEFAULT_TOOL_FILLER_AFTER_MS
    # The *name* of the environment variable holding the signing secret ("": unsigned).
    secret_env: str = ""


# How long phoneagent waits for a persona's lookup (``[lookup]``) before it answers with the
# defaults: the caller hears ringing meanwhile, so it stays short.
DEFAULT_LOOKUP_TIMEOUT_MS = 1500
MAX_LOOKUP_TIMEOUT_MS = 3000


@dataclass(frozen=True)
class Lookup:
    """Where an inbound call's variables come from before it is answered: phoneagent POSTs the
    caller's number there, signed like the call events (phoneagent/lookup.py)."""

    url: str
    secret_env: str  # the *name* of the environment variable holding the signing secret
    timeout_ms: int = DEFAULT_LOOKUP_TIMEOUT_MS


#: Days as ``[outbound] days`` writes them, Monday first (``datetime.weekday()`` order).
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DEFAULT_OUTBOUND_CONCURRENCY = 2


@dataclass(frozen=True)
class OutboundSettings:
    """``[outbound]``: how the persona places calls (phoneagent/outbound/). Without the section
    a persona only answers."""

    greeting: str  # what the agent says first when a person answers
    voicemail_message: str = ""  # said by Twilio's <Say> to an answering machine; "": hang up
    from_number: str = ""  # the caller ID; "": the persona's first number
    max_concurrent_calls: int = DEFAULT_OUTBOUND_CONCURRENCY  # placed and not yet ended
    # When calls may be placed, in ``timezone``: minutes after midnight [start, end), and days.
    # None: at any time of the listed days.
    calling_hours: tuple[int, int] | None = None
    days: tuple[str, ...] = WEEKDAYS
    timezone: str = "UTC"


@dataclass(frozen=True)
class Persona:
    id: str
    name: str
    numbers: tuple[str, ...]
    instructions: str
    greeting: str
    voice: str
    language: str
    goodbye: str
    default: bool = False
    transfer: Mapping[str, TransferTarget] = field(default_factory=dict)
    keypad: Mapping[str, KeypadAction] = field(default_factory=dict)  # by digit
    # When the agent cannot take the call (all lines busy, the model unreachable): Twilio says
    # the message, then dials the fallback target if there is one, else hangs up.
    fallback_target: str = ""
    busy_message: str = DEFAULT_BUSY_MESSAGE
    apology: str = DEFAULT_APOLOGY
    # How Twilio's <Say> speaks those two: its name for the persona's language ("cmn-CN" for
    # "zh-CN") and a voice that speaks it (the persona's `say_voice`, else the language's
    # default); see phoneagent/twilio/wire/say_voices.toml.
    say_language: str = "en-US"
    say_voice: str = "Polly.Joanna-Neural"
    # How the agent sounds in every reply: a free description ("warm and calm, never rushed";
    # "语气温柔，耐心"), and how fast it speaks; both go into the instructions (call/prompts.py).
    tone: str = ""
    speaking_rate: str = "normal"
    # The transfer target for callers who sound angry, distressed or confused (the model hears
    # it in their voice): the model is told to hand them to it ("" for none).
    upset_caller_target: str = ""
    webhook: WebhookTarget | None = None
    tools: tuple[BusinessTool, ...] = ()  # the business's own tools, in file order
    outbound: OutboundSettings | None = None
    max_call_seconds: int = DEFAULT_MAX_CALL_SECONDS
    silence_timeout_seconds: int = DEFAULT_SILENCE_TIMEOUT_SECONDS
    silence_duration_ms: int = DEFAULT_SILENCE_DURATION_MS
    prefix_padding_ms: int = DEFAULT_PREFIX_PADDING_MS
    vad_threshold: int = DEFAULT_VAD_THRESHOLD
    barge_in_min_speech_ms: int = DEFAULT_BARGE_IN_MIN_SPEECH_MS
    # Per-call variables (``[variables]``, personas/variables.py): the texts above hold the
    # defaults filled in; ``templates`` keeps, by field, each text that uses a variable, to be
    # filled with a call's own values (``filled.fill_persona``).
    variables: Mapping[str, Variable] = field(default_factory=dict)
    templates: Mapping[str, Template] = field(default_factory=dict)
    lookup: Lookup | None = None
    source: Path | None = None


@dataclass(frozen=True)
class PersonaSet:
    """An immutable, validated set of personas with lookup by called number."""

    personas: Mapping[str, Persona]
    by_number: Mapping[str, Persona]
    default: Persona | None

    def for_number(self, called: str) -> Persona | None:
        """The persona answering ``called`` (Twilio's ``To``), else the default, else None."""
        number = normalise_number(called)
        return self.by_number.get(number, self.default) if number else self.default

    def __len__(self) -> int:
        return len(self.personas)
