"""Per-number personas: TOML files validated into typed objects, looked up by the called number.

One file per persona in the personas directory; the file name (without ``.toml``) is the persona
id. Validation is strict: every problem is reported with file, field and reason, and a set with any
problem is refused as a whole, so a half-edited directory never serves half its lines.
"""

from __future__ import annotations

import asyncio
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from phoneagent.config import is_local_host
from phoneagent.delivery.events import DEFAULT_WEBHOOK_EVENTS, EVENT_TYPES
from phoneagent.logs import get_logger

log = get_logger(__name__)

# E.164: '+', a country code that does not start with 0, at most 15 digits in all.
_E164 = re.compile(r"\+[1-9]\d{6,14}")
_PERSONA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TARGET_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
_LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")
# Characters people write inside phone numbers that carry no meaning.
_NUMBER_PUNCTUATION = re.compile(r"[\s().\-/]")

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


@dataclass(frozen=True)
class TransferTarget:
    name: str
    number: str
    description: str  # what the model reads to decide when this target fits
    announcement: str  # what the agent says before the call is handed over
    caller_id: str = ""  # shown to the target; "" means the line that was called
    ring_seconds: int = 25  # how long the target rings before the caller comes back


# What a keypad digit may do without asking the model.
KEYPAD_END_CALL = "end_call"
KEYPAD_TRANSFER_PREFIX = "transfer:"
KEYPAD_DIGITS = frozenset("0123456789*#")


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    secret_env: str  # the *name* of the environment variable holding the signing secret
    events: tuple[str, ...] = DEFAULT_WEBHOOK_EVENTS  # which call events this line wants
    mask_caller: bool = False  # send the caller's number as +*******0123


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
    keypad: Mapping[str, str] = field(default_factory=dict)  # digit → "transfer:<name>"/"end_call"
    # When the agent cannot take the call (all lines busy, the model unreachable): Twilio says
    # the message, then dials the fallback target if there is one, else hangs up.
    fallback_target: str = ""
    busy_message: str = DEFAULT_BUSY_MESSAGE
    apology: str = DEFAULT_APOLOGY
    webhook: WebhookTarget | None = None
    max_call_seconds: int = DEFAULT_MAX_CALL_SECONDS
    silence_timeout_seconds: int = DEFAULT_SILENCE_TIMEOUT_SECONDS
    silence_duration_ms: int = DEFAULT_SILENCE_DURATION_MS
    prefix_padding_ms: int = DEFAULT_PREFIX_PADDING_MS
    vad_threshold: int = DEFAULT_VAD_THRESHOLD
    barge_in_min_speech_ms: int = DEFAULT_BARGE_IN_MIN_SPEECH_MS
    source: Path | None = None


@dataclass(frozen=True)
class Problem:
    file: Path
    field: str  # dotted path inside the file, or "" for the file as a whole
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.field}" if self.field else str(self.file)
        return f"{where}: {self.reason}"


class PersonaError(Exception):
    """A persona directory could not be loaded; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]):
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def normalise_number(raw: str) -> str | None:
    """The E.164 form of a phone number as Twilio or a person may write it, or None.

    Twilio sends E.164 when it can, otherwise the raw string ('anonymous', 'client:alice').
    """
    compact = _NUMBER_PUNCTUATION.sub("", raw or "")
    if compact.startswith("00"):
        compact = "+" + compact[2:]
    return compact if _E164.fullmatch(compact) else None


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


@dataclass
class DirectoryReport:
    """Outcome of validating a directory: per-file problems, and the set if there were none."""

    files: list[Path]
    problems: list[Problem]
    persona_set: PersonaSet | None

    def problems_for(self, path: Path) -> list[Problem]:
        return [p for p in self.problems if p.file == path]


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
    problems: list[Problem] = []
    if not _PERSONA_ID.fullmatch(path.stem):
        problems.append(
            Problem(
                path,
                "",
                "the file name is the persona id: use letters, digits, '.', '_' or '-' "
                "(at most 64, starting with a letter or digit)",
            )
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        return None, [*problems, Problem(path, "", f"cannot be read: {exc}")]
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

    top = _Table(data, "", path, problems)
    numbers = _numbers(top)
    transfer = _transfer_targets(top)
    keypad = _keypad(top, transfer)
    fallback_target = top.get("fallback_target", str, required=False, default="")
    if fallback_target and fallback_target not in transfer:
        names = ", ".join(transfer) or "none defined"
        top.problem("fallback_target", f"{fallback_target!r} is not a transfer target ({names})")
    end_call = top.table("end_call", required=True)
    goodbye = end_call.text("goodbye") if end_call else None
    if end_call:
        end_call.finish()
    webhook = _webhook(top, environ)
    persona = Persona(
        id=path.stem,
        name=top.text("name"),
        numbers=numbers,
        instructions=top.text("instructions"),
        greeting=top.text("greeting"),
        voice=top.text("voice"),
        language=top.text("language", pattern=_LANGUAGE, pattern_hint="a language tag like en-US"),
        goodbye=goodbye or "",
        default=top.boolean("default", False),
        transfer=transfer,
        keypad=keypad,
        fallback_target=fallback_target,
        busy_message=top.get("busy_message", str, required=False, default=DEFAULT_BUSY_MESSAGE),
        apology=top.get("apology", str, required=False, default=DEFAULT_APOLOGY),
        webhook=webhook,
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
        source=path,
    )
    top.finish()
    if not data.get("numbers") and not persona.default:
        problems.append(
            Problem(path, "numbers", "list at least one number, or mark the persona default")
        )
    return (None if problems else persona), problems


def _numbers(top: _Table) -> tuple[str, ...]:
    raw = top.get("numbers", list, required=False, default=[])
    numbers: list[str] = []
    for i, value in enumerate(raw):
        where = f"numbers[{i}]"
        if not isinstance(value, str):
            top.problem(where, f'must be a string like "+14155550100", not {value!r}')
        elif not _E164.fullmatch(value):
            fixed = normalise_number(value)
            hint = f"; write it as {fixed}" if fixed else ""
            top.problem(where, f"{value!r} is not an E.164 number (+, country code, number){hint}")
        elif value in numbers:
            top.problem(where, f"{value} is listed twice")
        else:
            numbers.append(value)
    return tuple(numbers)


def _transfer_targets(top: _Table) -> dict[str, TransferTarget]:
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
        if number and not _E164.fullmatch(number):
            entry.problem("number", f"{number!r} is not an E.164 number (+, country code, number)")
        caller_id = entry.get("caller_id", str, required=False, default="")
        if caller_id and not _E164.fullmatch(caller_id):
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


def _keypad(top: _Table, targets: Mapping[str, TransferTarget]) -> dict[str, str]:
    section = top.table("keypad", required=False)
    if section is None:
        return {}
    keypad = {}
    for digit in list(section.data):
        action = section.get(digit, str, default="")
        if digit not in KEYPAD_DIGITS:
            section.problem(digit, "keys are single keypad digits: 0-9, * or # (quote them)")
        elif action == KEYPAD_END_CALL or (
            action.startswith(KEYPAD_TRANSFER_PREFIX)
            and action.removeprefix(KEYPAD_TRANSFER_PREFIX) in targets
        ):
            keypad[digit] = action
        elif action:
            names = ", ".join(f"transfer:{n}" for n in targets) or "no transfer targets"
            section.problem(digit, f"{action!r} is not end_call or one of: {names}")
    section.finish()
    return keypad


def _webhook(top: _Table, environ: Mapping[str, str]) -> WebhookTarget | None:
    section = top.table("webhook", required=False)
    if section is None:
        return None
    url = section.text("url")
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            section.problem("url", f"{url!r} is not an absolute https:// URL")
        elif parts.scheme == "http" and not is_local_host(parts.hostname):
            section.problem("url", "must use https:// (http is allowed for localhost only)")
    secret_env = section.text(
        "secret_env", pattern=_ENV_NAME, pattern_hint="an environment variable name"
    )
    if secret_env and _ENV_NAME.fullmatch(secret_env) and not environ.get(secret_env, "").strip():
        section.problem(
            "secret_env", f"environment variable {secret_env} (the signing secret) is not set"
        )
    events = _webhook_events(section)
    mask_caller = section.boolean("mask_caller", False)
    section.finish()
    return WebhookTarget(url=url, secret_env=secret_env, events=events, mask_caller=mask_caller)


def _webhook_events(section: _Table) -> tuple[str, ...]:
    raw = section.get("events", list, required=False, default=list(DEFAULT_WEBHOOK_EVENTS))
    if "events" in section.data and not raw:
        section.problem("events", f"list at least one of {', '.join(EVENT_TYPES)}")
    events: list[str] = []
    for i, value in enumerate(raw):
        if value not in EVENT_TYPES:
            section.problem(f"events[{i}]", f"{value!r} is not one of {', '.join(EVENT_TYPES)}")
        elif value in events:
            section.problem(f"events[{i}]", f"{value} is listed twice")
        else:
            events.append(value)
    return tuple(events)


class _Table:
    """Typed reads from one TOML table, recording problems instead of raising, so a single
    pass reports everything wrong with a file. ``finish()`` reports keys nobody read."""

    def __init__(self, data: dict[str, Any], prefix: str, path: Path, problems: list[Problem]):
        self.data = data
        self.prefix = prefix
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def problem(self, key: str, reason: str) -> None:
        self.problems.append(Problem(self.path, self.where(key), reason))

    def get(self, key: str, kind: type, *, required: bool = True, default: Any = None) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if required:
                self.problem(key, "is required")
            return default
        value = self.data[key]
        # bool is an int in Python; TOML keeps them apart and so do we.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problem(key, f"must be {_KIND_NAMES[kind]}, not {_describe(value)}")
            return default
        return value

    def text(
        self, key: str, *, pattern: re.Pattern[str] | None = None, pattern_hint: str = ""
    ) -> str:
        value = self.get(key, str, default="")
        if isinstance(self.data.get(key), str):
            if not value.strip():
                self.problem(key, "must not be empty")
            elif pattern is not None and not pattern.fullmatch(value):
                self.problem(key, f"{value!r} is not {pattern_hint}")
        return value.strip()

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.get(key, int, required=False, default=default)
        if not low <= value <= high:
            self.problem(key, f"must be between {low} and {high}, not {value}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        return self.get(key, bool, required=False, default=default)

    def table(self, key: str, *, required: bool) -> _Table | None:
        value = self.get(key, dict, required=required)
        return None if value is None else _Table(value, self.where(key), self.path, self.problems)

    def finish(self) -> None:
        for key in self.data:
            if key not in self.seen:
                self.problem(key, "unknown key (check the spelling against the README)")


_KIND_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list",
               dict: "a table"}  # fmt: skip


def _describe(value: Any) -> str:
    for kind, name in _KIND_NAMES.items():
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return f"{name} ({value!r})" if kind in (str, int, bool) else name
    return type(value).__name__


class PersonaRegistry:
    """The persona set currently serving, reloaded when the directory changes.

    A reload that finds any problem is logged and refused; the last good set keeps serving.
    Polling (not inotify) because it also sees Kubernetes ConfigMap updates, which swap a
    symlinked directory, and it costs one ``stat`` per file per interval.
    """

    def __init__(self, directory: Path, environ: Mapping[str, str] | None = None):
        self.directory = directory
        self.environ = environ
        self._fingerprint = self._read_fingerprint()
        self.current = load_directory(directory, environ)

    def _read_fingerprint(self) -> tuple:
        try:
            files = persona_files(self.directory)
        except OSError:
            return ()
        stamps = []
        for path in files:
            try:
                st = path.stat()
            except OSError:
                continue
            stamps.append((path.name, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def reload_if_changed(self) -> bool:
        """Reload when the files changed. True when a new set was applied."""
        fingerprint = self._read_fingerprint()
        if fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint
        report = check_directory(self.directory, self.environ)
        if report.persona_set is None:
            for problem in report.problems:
                log.error("persona_reload_refused", problem=str(problem))
            log.warning("personas_unchanged", serving=sorted(self.current.personas))
            return False
        self.current = report.persona_set
        log.info("personas_reloaded", personas=sorted(self.current.personas))
        return True

    async def watch(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.reload_if_changed()
            except Exception:  # a watcher that dies silently would freeze the personas
                log.exception("persona_reload_failed")
