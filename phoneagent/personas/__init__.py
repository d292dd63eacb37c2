"""Per-number personas: TOML files validated into typed objects, looked up by the called number.

- ``model``: the frozen values the rest of phoneagent uses (``Persona``, ``PersonaSet``, ...).
- ``validation``: a file into a ``Persona``, a directory into a ``PersonaSet``, every problem
  with file, field and reason (``problems``), read through ``table_reader``.
- ``registry``: the set an instance serves, hot-reloaded; a bad reload keeps the last good set.
"""

from phoneagent.personas.model import (
    DEFAULT_APOLOGY,
    DEFAULT_BARGE_IN_MIN_SPEECH_MS,
    DEFAULT_BUSY_MESSAGE,
    DEFAULT_MAX_CALL_SECONDS,
    DEFAULT_PREFIX_PADDING_MS,
    DEFAULT_SILENCE_DURATION_MS,
    DEFAULT_SILENCE_TIMEOUT_SECONDS,
    DEFAULT_VAD_THRESHOLD,
    KEYPAD_DIGITS,
    MAX_TONE_CHARS,
    SPEAKING_RATES,
    BusinessTool,
    KeypadAction,
    KeypadHangUp,
    KeypadTransfer,
    Lookup,
    OutboundSettings,
    Persona,
    PersonaSet,
    TransferTarget,
    WebhookTarget,
)
from phoneagent.personas.numbers import normalise_number
from phoneagent.personas.problems import PersonaError, Problem
from phoneagent.personas.registry import PersonaRegistry, RefusedReload
from phoneagent.personas.validation import (
    DirectoryReport,
    check_directory,
    check_draft,
    keypad_action,
    load_directory,
    parse_persona_file,
    parse_persona_text,
    persona_files,
)

__all__ = [
    "DEFAULT_APOLOGY",
    "DEFAULT_BARGE_IN_MIN_SPEECH_MS",
    "DEFAULT_BUSY_MESSAGE",
    "DEFAULT_MAX_CALL_SECONDS",
    "DEFAULT_PREFIX_PADDING_MS",
    "DEFAULT_SILENCE_DURATION_MS",
    "DEFAULT_SILENCE_TIMEOUT_SECONDS",
    "DEFAULT_VAD_THRESHOLD",
    "KEYPAD_DIGITS",
    "MAX_TONE_CHARS",
    "SPEAKING_RATES",
    "BusinessTool",
    "DirectoryReport",
    "KeypadAction",
    "KeypadHangUp",
    "KeypadTransfer",
    "Lookup",
    "OutboundSettings",
    "Persona",
    "PersonaError",
    "PersonaRegistry",
    "PersonaSet",
    "Problem",
    "RefusedReload",
    "TransferTarget",
    "WebhookTarget",
    "check_directory",
    "check_draft",
    "keypad_action",
    "load_directory",
    "normalise_number",
    "parse_persona_file",
    "parse_persona_text",
    "persona_files",
]
