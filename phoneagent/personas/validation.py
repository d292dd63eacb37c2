"""Persona files validated into typed personas, and a directory of them into a ``PersonaSet``.

One file per persona in the personas directory; the file name (without ``.toml``) is the persona
id. Validation is strict: every problem is reported with file, field and reason, and a set with any
problem is refused as a whole, so a half-edited directory never serves half its lines.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from phoneagent.delivery.events import DEFAULT_WEBHOOK_EVENTS, EVENT_TYPES
from phoneagent.personas.filled import templated
from phoneagent.personas.model import (
    DEFAULT_APOLOGY,
    DEFAULT_BARGE_IN_MIN_SPEECH_MS,
    DEFAULT_BUSY_MESSAGE,
    DEFAULT_LOOKUP_TIMEOUT_MS,
    DEFAULT_MAX_CALL_SECONDS,
    DEFAULT_OUTBOUND_CONCURRENCY,
    DEFAULT_PREFIX_PADDING_MS,
    DEFAULT_SILENCE_DURATION_MS,
    DEFAULT_SILENCE_TIMEOUT_SECONDS,
    DEFAULT_VAD_THRESHOLD,
    KEYPAD_DIGITS,
    MAX_LOOKUP_TIMEOUT_MS,
    MAX_TONE_CHARS,
    SPEAKING_RATES,
    WEEKDAYS,
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
from phoneagent.personas.numbers import E164, normalise_number
from phoneagent.personas.problems import PersonaError, Problem
from phoneagent.personas.rules import LANGUAGE, english_default_text, post_url, secret_env
from phoneagent.personas.table_reader import TomlTable
from phoneagent.personas.tool_validation import business_tools
from phoneagent.personas.variables import MAX_VALUE_CHARS, VARIABLE_NAME, Variable, is_one_line
from phoneagent.twilio.wire.say_voices import say_voices

__all__ = [
    "DirectoryReport",
    "check_directory",
    "check_draft",
    "keypad_action",
    "load_directory",
    "parse_persona_file",
    "parse_persona_text",
    "persona_files",
]

_PERSONA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TARGET_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_LANGUAGE = LANGUAGE

# How a persona file writes a keypad action (``[keypad]``): parsed once, here, into a KeypadAction.
KEYPAD_END_CALL = "end_call"
KEYPAD_TRANSFER_PREFIX = "transfer:"


@dataclass
class DirectoryReport:
    """Outcome of validating a directory: per-file problems, and the set if there were none."""

    files: list[Path]
    problems: list[Problem]
    persona_set: PersonaSet | None

    def problems_for(self, path: Path) -> list[Problem]:
        return [p for p in self.problems if p.file == path]

    def lines(self) -> list[str]:
        """The report as ``phoneagent personas check`` prints it (and the console shows it):
        problems with the directory itself first, then each file in name order, ``OK`` or one
        ``ERROR file: field: reason`` line per problem."""
        files = set(self.files)
        lines = [f"ERROR {p}" for p in self.problems if p.file not in files]
        for path in self.files:
            problems = self.problems_for(path)
            lines += [f"ERROR {p}" for p in problems] if problems else [f"OK    {path}"]
        return lines


def persona_files(directory: Path) -> list[Path]:
    # Hidden entries are skipped: Kubernetes ConfigMap volumes keep their data in '..data' dirs.
    return sorted(p for p in directory.glob("*.toml") if not p.name.startswith(".") and p.is_file())


def check_directory(directory: Path, environ: Mapping[str, str] | None = None) -> DirectoryReport:
    """Validate every persona file in ``directory`` and the set they form together."""
    env = os.environ if environ is None else environ
    if not directory.is_dir():
        problem = Problem(directory, "", "personas directory does not exist")
        return DirectoryReport([], [problem], None)
    files = persona_files(directory)
    if not files:
        problem = Problem(directory, "", "no persona files (*.toml) in the directory")
        return DirectoryReport([], [problem], None)

    problems: list[Problem] = []
    personas: list[Persona] = []
    for path in files:
        persona, file_problems = parse_persona_file(path, env)
        problems += file_problems
        if persona is not None:
            personas.append(persona)
    problems += _cross_file_problems(personas)
    if problems:
        return DirectoryReport(files, problems, None)
    by_number = {n: p for p in personas for n in p.numbers}
    default = next((p for p in personas if p.default), None)
    persona_set = PersonaSet({p.id: p for p in personas}, by_number, default)
    return DirectoryReport(files, problems, persona_set)


def load_directory(directory: Path, environ: Mapping[str, str] | None = None) -> PersonaSet:
    report = check_directory(directory, environ)
    if report.persona_set is None:
        raise PersonaError(report.problems)
    return report.persona_set


def _cross_file_problems(personas: list[Persona]) -> list[Problem]:
    problems = []
    claimed: dict[str, Persona] = {}
    first_default: Persona | None = None
    for persona in personas:  # in file-name order, so the later file is the one blamed
        assert persona.source is not None
        for i, number in enumerate(persona.numbers):
            owner = claimed.setdefault(number, persona)
            if owner is not persona:
                problems.append(
                    Problem(
                        persona.source,
                        f"numbers[{i}]",
                        f"{number} is already claimed by {owner.source}",
                    )
                )
        if persona.default:
            if first_default is None:
                first_default = persona
            else:
                problems.append(
                    Problem(
                        persona.source,
                        "default",
                        f"only one persona may be the default; {first_default.source} already is",
                    )
                )
    return problems


def parse_persona_file(
    path: Path, environ: Mapping[str, str]
) -> tuple[Persona | None, list[Problem]]:
    """Parse one file. Returns the persona (None if any problem) and every problem found."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [*_file_name_problems(path), Problem(path, "", f"cannot be read: {exc}")]
    return parse_persona_text(text, path, environ)


def check_draft(
    text: str, path: Path, deployed: Iterable[Persona], environ: Mapping[str, str]
) -> tuple[Persona | None, list[Problem]]:
    """A draft persona file, checked as ``personas check`` would check it saved at ``path``
    next to the ``deployed`` personas (the one with its id replaced by it): the persona (None
    if any problem) and every problem, worded as ``personas check`` words them. The console
    checks a persona an operator is editing with it, before trying the draft in a call."""
    draft, problems = parse_persona_text(text, path, environ)
    if draft is None:
        return None, problems
    others = [p for p in deployed if p.id != draft.id and p.source is not None]
    # In check's file order. The deployed set passed these checks: what they find is the draft's.
    problems = _cross_file_problems(sorted([*others, draft], key=lambda p: p.source or path))
    return (None if problems else draft), problems


def _file_name_problems(path: Path) -> list[Problem]:
    if _PERSONA_ID.fullmatch(path.stem):
        return []
    return [
        Problem(
            path,
            "",
            "the file name is the persona id: use letters, digits, '.', '_' or '-' "
            "(at most 64, starting with a letter or digit)",
        )
    ]


def parse_persona_text(
    text: str, path: Path, environ: Mapping[str, str]
) -> tuple[Persona | None, list[Problem]]:
    """Parse a persona file's text, read from ``path`` (its name is the persona id): the
    persona (None if any problem) and every problem found."""
    problems: list[Problem] = _file_name_problems(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return None, [*problems, Problem(path, "", f"is not valid TOML: {exc}")]
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively: a file nested thousands
        # deep exhausts the stack. It is bad input like any other, reported the same way (by
        # check, by serve at start-up, and by a hot reload, which keeps the previous set).
        return None, [
            *problems,
            Problem(path, "", "is not valid TOML: arrays or inline tables nested too deeply"),
        ]

    top = TomlTable(data, "", path, problems)
    numbers = _numbers(top)
    transfer = _transfer_targets(top)
    keypad = _keypad(top, transfer)
    fallback_target = _target_name(top, "fallback_target", transfer)
    upset_caller_target = _target_name(top, "upset_caller_target", transfer)
    end_call = top.table("end_call", required=True)
    goodbye = end_call.text("goodbye") if end_call else None
    if end_call:
        end_call.finish()
    webhook = _webhook(top, environ)
    variables = _variables(top)
    lookup = _lookup(top, environ)
    language = top.text("language", pattern=_LANGUAGE, pattern_hint="a language tag like en-US")
    say_language, say_voice = _say(top, language)
    persona = Persona(
        id=path.stem,
        name=top.text("name"),
        numbers=numbers,
        instructions=top.text("instructions"),
        greeting=top.text("greeting"),
        voice=top.text("voice"),
        language=language,
        goodbye=goodbye or "",
        default=top.boolean("default", False),
        transfer=transfer,
        keypad=keypad,
        fallback_target=fallback_target,
        busy_message=_said_by_twilio(top, "busy_message", DEFAULT_BUSY_MESSAGE, language),
        apology=_said_by_twilio(top, "apology", DEFAULT_APOLOGY, language),
        say_language=say_language,
        say_voice=say_voice,
        tone=_tone(top),
        speaking_rate=_speaking_rate(top),
        upset_caller_target=upset_caller_target,
        webhook=webhook,
        tools=business_tools(top, environ, language, webhook),
        outbound=_outbound(top, numbers),
        max_call_seconds=top.integer("max_call_seconds", DEFAULT_MAX_CALL_SECONDS, 30, 14400),
        silence_timeout_seconds=top.integer(
            "silence_timeout_seconds", DEFAULT_SILENCE_TIMEOUT_SECONDS, 0, 600
        ),
        silence_duration_ms=top.integer(
            "silence_duration_ms", DEFAULT_SILENCE_DURATION_MS, 100, 5000
        ),
        prefix_padding_ms=top.integer("prefix_padding_ms", DEFAULT_PREFIX_PADDING_MS, 0, 5000),
        vad_threshold=top.integer("vad_threshold", DEFAULT_VAD_THRESHOLD, 0, 5000),
        barge_in_min_speech_ms=top.integer(
            "barge_in_min_speech_ms", DEFAULT_BARGE_IN_MIN_SPEECH_MS, 0, 3000
        ),
        variables=variables,
        lookup=lookup,
        source=path,
    )
    top.finish()
    # A persona answers calls (its numbers, or the default's) or only places them (an
    # [outbound] section with its own `from`): one that does neither would never speak.
    if not data.get("numbers") and not persona.default and persona.outbound is None:
        problems.append(
            Problem(
                path,
                "numbers",
                "list at least one number, or mark the persona default, "
                "or give it an [outbound] section (a persona that only calls out)",
            )
        )
    persona = _with_templates(persona, problems)
    return (None if problems else persona), problems


def _with_templates(persona: Persona, problems: list[Problem]) -> Persona:
    """The persona's texts checked against its variables, filled with the defaults, and their
    templates kept for each call (personas/variables.py)."""
    assert persona.source is not None
    ready, templates, text_problems = templated(persona, persona.variables)
    problems += [Problem(persona.source, where, reason) for where, reason in text_problems]
    if persona.numbers or persona.default:
        # The caller is on the line: an inbound call is answered, lookup or not, and a required
        # variable would have no value when the lookup fails.
        problems += [
            Problem(
                persona.source,
                f"variables.{v.name}",
                "needs a default: this persona answers calls (it has numbers or is the "
                "default), and an inbound call is answered with the defaults when no lookup "
                "gives a value (required variables are for personas that only call out)",
            )
            for v in persona.variables.values()
            if v.required
        ]
    return dataclasses.replace(ready, templates=templates)


def _variables(top: TomlTable) -> dict[str, Variable]:
    """``[variables]``: each ``name = { default = "…" }`` or ``name = { required = true }``,
    with an optional ``description``."""
    section = top.table("variables", required=False)
    if section is None:
        return {}
    variables = {}
    for name in list(section.data):
        if not VARIABLE_NAME.fullmatch(name):
            section.problem(
                name, "variable names use letters, digits and '_' (at most 64, not a digit first)"
            )
        entry = section.table(name, required=True)
        if entry is None:
            continue
        default = entry.get("default", str, required=False)
        required = entry.boolean("required", False)
        description = entry.get("description", str, required=False, default="").strip()
        if default is not None and required:
            entry.problem("required", "a variable with a default is not required: keep one")
        elif default is None and not required and "default" not in entry.data:
            entry.problem("default", 'give a default (default = "…") or mark it required = true')
        elif default is not None and len(default) > MAX_VALUE_CHARS:
            entry.problem("default", f"must be at most {MAX_VALUE_CHARS} characters")
        elif default is not None and not is_one_line(default):
            entry.problem("default", "must be one line of text")
        entry.finish()
        variables[name] = Variable(name, None if required else (default or ""), description)
    section.finish()
    return variables


def _lookup(top: TomlTable, environ: Mapping[str, str]) -> Lookup | None:
    """``[lookup]``: where an inbound call's variables come from (phoneagent/lookup.py)."""
    section = top.table("lookup", required=False)
    if section is None:
        return None
    url = post_url(section)
    secret = secret_env(section, environ)
    timeout_ms = section.integer(
        "timeout_ms", DEFAULT_LOOKUP_TIMEOUT_MS, 100, MAX_LOOKUP_TIMEOUT_MS
    )
    section.finish()
    return Lookup(url=url, secret_env=secret, timeout_ms=timeout_ms)


def _target_name(top: TomlTable, key: str, targets: Mapping[str, TransferTarget]) -> str:
    """A key naming one of the persona's transfer targets (``fallback_target``…)."""
    name = top.get(key, str, required=False, default="")
    if name and name not in targets:
        top.problem(
            key, f"{name!r} is not a transfer target ({', '.join(targets) or 'none defined'})"
        )
    return name


def _tone(top: TomlTable) -> str:
    """How the agent sounds, in words: one line, at most MAX_TONE_CHARS characters (it is
    repeated in every instruction the model gets, so it stays a direction, not a script)."""
    if "tone" not in top.data:
        return ""
    tone = top.text("tone")
    if "\n" in tone:
        top.problem("tone", "must be one line: describe the voice, write the rest in instructions")
    elif len(tone) > MAX_TONE_CHARS:
        top.problem("tone", f"must be at most {MAX_TONE_CHARS} characters, not {len(tone)}")
    return tone


def _speaking_rate(top: TomlTable) -> str:
    rate = top.get("speaking_rate", str, required=False, default="normal")
    if rate not in SPEAKING_RATES:
        top.problem("speaking_rate", f"{rate!r} is not one of {', '.join(SPEAKING_RATES)}")
        return "normal"
    return rate


# How many voices a refusal lists (the data file has them all).
_VOICES_SHOWN = 6


def _say(top: TomlTable, language: str) -> tuple[str, str]:
    """The ``<Say>`` language for the persona's language and the voice Twilio speaks it with:
    ``say_voice`` if it speaks that language, else the language's default. Twilio fails a
    ``<Say>`` whose voice does not speak its language, and the caller would hear nothing."""
    table = say_voices()
    voice = top.get("say_voice", str, required=False, default="").strip()
    if not language or not _LANGUAGE.fullmatch(language):
        return "", voice  # the language's own problem is reported
    say_language = table.language_for(language)
    if say_language is None:
        top.problem(
            "language",
            f"Twilio's <Say> (which speaks busy_message and apology) has no voice for "
            f"{language!r}: use a language it speaks, such as en-US or zh-CN "
            f"(the list: phoneagent/twilio/wire/say_voices.toml)",
        )
        return "", voice
    default = table.defaults[say_language]
    if not voice:
        return say_language, default
    choices = [default, *(v for v in table.voices[say_language] if v != default)]
    shown = ", ".join(choices[:_VOICES_SHOWN]) + (", …" if len(choices) > _VOICES_SHOWN else "")
    spoken = table.languages_of(voice)
    if not spoken:
        top.problem(
            "say_voice",
            f"{voice!r} is not a voice Twilio's <Say> takes; for {language} ({say_language}): "
            f"{shown} (all: phoneagent/twilio/wire/say_voices.toml)",
        )
    elif say_language not in spoken:
        top.problem(
            "say_voice",
            f"{voice} speaks {', '.join(spoken)}, not the persona's language {language} "
            f"(<Say> language {say_language}): Twilio would fail the <Say>; choose one of "
            f"{shown} (all: phoneagent/twilio/wire/say_voices.toml)",
        )
    return say_language, voice


def _said_by_twilio(top: TomlTable, key: str, default: str, language: str) -> str:
    """``busy_message`` or ``apology``: the defaults are English (see ``english_default_text``)."""
    return english_default_text(
        top, key, default, language, f"Twilio would read it with a {language} voice"
    )


def _numbers(top: TomlTable) -> tuple[str, ...]:
    raw = top.get("numbers", list, required=False, default=[])
    numbers: list[str] = []
    for i, value in enumerate(raw):
        where = f"numbers[{i}]"
        if not isinstance(value, str):
            top.problem(where, f'must be a string like "+14155550100", not {value!r}')
        elif not E164.fullmatch(value):
            fixed = normalise_number(value)
            hint = f"; write it as {fixed}" if fixed else ""
            top.problem(where, f"{value!r} is not an E.164 number (+, country code, number){hint}")
        elif value in numbers:
            top.problem(where, f"{value} is listed twice")
        else:
            numbers.append(value)
    return tuple(numbers)


def _transfer_targets(top: TomlTable) -> dict[str, TransferTarget]:
    section = top.table("transfer", required=False)
    if section is None:
        return {}
    targets = {}
    for name in list(section.data):
        if not _TARGET_NAME.fullmatch(name):
            section.problem(name, "target names use lower-case letters, digits and '_'")
        entry = section.table(name, required=True)
        if entry is None:
            continue
        number = entry.text("number")
        if number and not E164.fullmatch(number):
            entry.problem("number", f"{number!r} is not an E.164 number (+, country code, number)")
        caller_id = entry.get("caller_id", str, required=False, default="")
        if caller_id and not E164.fullmatch(caller_id):
            entry.problem("caller_id", f"{caller_id!r} is not an E.164 number")
        targets[name] = TransferTarget(
            name=name,
            number=number,
            description=entry.text("description"),
            announcement=entry.text("announcement"),
            caller_id=caller_id,
            ring_seconds=entry.integer("ring_seconds", 25, 5, 600),
        )
        entry.finish()
    return targets


def _keypad(top: TomlTable, targets: Mapping[str, TransferTarget]) -> dict[str, KeypadAction]:
    section = top.table("keypad", required=False)
    if section is None:
        return {}
    keypad = {}
    for digit in list(section.data):
        text = section.get(digit, str, default="")
        action = keypad_action(text, targets)
        if digit not in KEYPAD_DIGITS:
            section.problem(digit, "keys are single keypad digits: 0-9, * or # (quote them)")
        elif action is not None:
            keypad[digit] = action
        elif text:
            names = ", ".join(f"{KEYPAD_TRANSFER_PREFIX}{n}" for n in targets)
            names = names or "no transfer targets"
            section.problem(digit, f"{text!r} is not {KEYPAD_END_CALL} or one of: {names}")
    section.finish()
    return keypad


def keypad_action(text: str, targets: Mapping[str, TransferTarget]) -> KeypadAction | None:
    """The action a persona file's ``[keypad]`` value names, or None if it names none."""
    if text == KEYPAD_END_CALL:
        return KeypadHangUp()
    if text.startswith(KEYPAD_TRANSFER_PREFIX):
        target = targets.get(text.removeprefix(KEYPAD_TRANSFER_PREFIX))
        return KeypadTransfer(target) if target is not None else None
    return None


def _webhook(top: TomlTable, environ: Mapping[str, str]) -> WebhookTarget | None:
    section = top.table("webhook", required=False)
    if section is None:
        return None
    url = post_url(section)
    secret = secret_env(section, environ)
    events = _webhook_events(section)
    mask_caller = section.boolean("mask_caller", False)
    section.finish()
    return WebhookTarget(url=url, secret_env=secret, events=events, mask_caller=mask_caller)


def _webhook_events(section: TomlTable) -> tuple[str, ...]:
    return tuple(_chosen(section, "events", EVENT_TYPES, DEFAULT_WEBHOOK_EVENTS))


def _chosen(
    section: TomlTable, key: str, allowed: tuple[str, ...], default: tuple[str, ...]
) -> list[str]:
    """A list of some of ``allowed`` (webhook events, weekdays): not empty when given, each
    known and listed once; in the order written."""
    raw = section.get(key, list, required=False, default=list(default))
    if key in section.data and not raw:
        section.problem(key, f"list at least one of {', '.join(allowed)}")
    chosen: list[str] = []
    for i, value in enumerate(raw):
        if value not in allowed:
            section.problem(f"{key}[{i}]", f"{value!r} is not one of {', '.join(allowed)}")
        elif value in chosen:
            section.problem(f"{key}[{i}]", f"{value} is listed twice")
        else:
            chosen.append(value)
    return chosen


_CALLING_HOURS = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)")
MAX_OUTBOUND_CONCURRENCY = 1000


def _outbound(top: TomlTable, numbers: tuple[str, ...]) -> OutboundSettings | None:
    """``[outbound]``: the greeting a callee hears first, and when and how often the persona
    may call (phoneagent/outbound/)."""
    section = top.table("outbound", required=False)
    if section is None:
        return None
    greeting = section.text("greeting")
    voicemail = section.get("voicemail_message", str, required=False, default="")
    if "voicemail_message" in section.data and isinstance(voicemail, str) and not voicemail.strip():
        section.problem("voicemail_message", "must not be empty (leave it out to hang up instead)")
    from_number = section.get("from", str, required=False, default="")
    if from_number and not E164.fullmatch(from_number):
        section.problem("from", f"{from_number!r} is not an E.164 number (+, country code, number)")
    elif not from_number and not numbers:
        section.problem("from", "is required when the persona lists no numbers (the caller ID)")
    settings = OutboundSettings(
        greeting=greeting,
        voicemail_message=voicemail.strip(),
        from_number=from_number or (numbers[0] if numbers else ""),
        max_concurrent_calls=section.integer(
            "max_concurrent_calls", DEFAULT_OUTBOUND_CONCURRENCY, 1, MAX_OUTBOUND_CONCURRENCY
        ),
        calling_hours=_calling_hours(section),
        days=_days(section),
        timezone=_timezone(section),
    )
    section.finish()
    return settings


def _calling_hours(section: TomlTable) -> tuple[int, int] | None:
    text = section.get("calling_hours", str, required=False, default="")
    if not text:
        return None
    match = _CALLING_HOURS.fullmatch(text.strip())
    if match is None:
        section.problem("calling_hours", f'{text!r} is not a range like "09:00-18:00" (24-hour)')
        return None
    start_h, start_m, end_h, end_m = (int(part) for part in match.groups())
    start, end = start_h * 60 + start_m, end_h * 60 + end_m
    if end > 24 * 60 or start >= end:
        section.problem(
            "calling_hours",
            f"{text!r} must start before it ends, within one day (00:00-24:00)",
        )
        return None
    return start, end


def _days(section: TomlTable) -> tuple[str, ...]:
    days = _chosen(section, "days", WEEKDAYS, WEEKDAYS)
    return tuple(d for d in WEEKDAYS if d in days)


def _timezone(section: TomlTable) -> str:
    name = section.get("timezone", str, required=False, default="UTC")
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        section.problem("timezone", f'{name!r} is not an IANA time zone like "Europe/Berlin"')
        return "UTC"
    return name
