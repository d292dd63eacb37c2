"""Per-call variables in a persona's texts: ``"Hello {name}, calling about {appointment}?"``.

A persona declares its variables (``[variables]``: each with a ``default``, or ``required``
when every call must give it a value); its texts may use them as ``{name}``, and write a literal
brace as ``{{`` or ``}}``. A text is parsed once, when the persona is loaded, into literal pieces
and variable names (:class:`Template`); filling it joins the pieces with the call's values. That
is the whole substitution: no ``str.format`` (whose ``{x.__class__}`` reaches into objects), and
a value is never parsed again, so braces a caller's record holds stay braces. No I/O.

Values come from outside (a business's lookup answer, an API request): :func:`value_problem`
says what is wrong with one, in words fit for a log line or an API error. A persona's own
texts are checked and filled with these in ``filled``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "MAX_VALUE_CHARS",
    "VARIABLE_NAME",
    "MissingVariables",
    "Template",
    "TemplateError",
    "Variable",
    "defaults_of",
    "is_one_line",
    "parse_template",
    "resolve",
    "value_problem",
]

#: A variable's name: what ``{…}`` may hold. Nothing else: not ``{x.y}``, ``{x[0]}`` or ``{}``.
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
#: The longest value a variable takes: a name, a date, a short sentence, not a document.
MAX_VALUE_CHARS = 500
_BRACES = re.compile(r"\{\{|\}\}|\{|\}")


class TemplateError(ValueError):
    """A text's braces do not read as placeholders; the message says where and why."""


@dataclass(frozen=True)
class Template:
    """A text as literal pieces and variable names, in order: ``pieces[0] {names[0]}
    pieces[1] {names[1]} …``; one piece more than names. Literal braces are already single."""

    pieces: tuple[str, ...]
    names: tuple[str, ...]

    def fill(self, values: Mapping[str, str], unfilled: str = "{%s}") -> str:
        """The text with each name's value (a name without one: ``unfilled % name``)."""
        out = [self.pieces[0]]
        for name, piece in zip(self.names, self.pieces[1:], strict=True):
            value = values.get(name)
            out.append(unfilled % name if value is None else value)
            out.append(piece)
        return "".join(out)


def parse_template(text: str) -> Template:
    """``text`` read as a template; raises TemplateError for a brace that is not ``{{``,
    ``}}`` or part of a ``{name}``."""
    pieces: list[str] = []
    names: list[str] = []
    literal: list[str] = []
    position = 0
    for match in _BRACES.finditer(text):
        if match.start() < position:  # inside a placeholder already read
            continue
        literal.append(text[position : match.start()])
        brace = match.group()
        if brace in ("{{", "}}"):
            literal.append(brace[0])
            position = match.end()
            continue
        if brace == "}":
            raise TemplateError(
                f"'}}' at character {match.start() + 1} closes nothing "
                "(write a literal brace as }} or {{)"
            )
        close = text.find("}", match.end())
        if close < 0:
            raise TemplateError(
                f"'{{' at character {match.start() + 1} is never closed "
                "(write a literal brace as {{)"
            )
        name = text[match.end() : close]
        if not VARIABLE_NAME.fullmatch(name):
            shown = name if len(name) <= 40 else name[:40] + "…"
            raise TemplateError(
                f"{{{shown}}} at character {match.start() + 1} is not a variable: write "
                "{name} with letters, digits and '_' (a literal brace is {{ or }})"
            )
        pieces.append("".join(literal))
        names.append(name)
        literal = []
        position = close + 1
    literal.append(text[position:])
    pieces.append("".join(literal))
    return Template(tuple(pieces), tuple(names))


@dataclass(frozen=True)
class Variable:
    """A declared variable: its ``default``, or None when ``required`` (every call gives it)."""

    name: str
    default: str | None = None
    description: str = ""

    @property
    def required(self) -> bool:
        return self.default is None


class MissingVariables(ValueError):
    """Required variables without a value; ``names`` says which."""

    def __init__(self, names: list[str]):
        super().__init__(f"no value for required variable(s): {', '.join(names)}")
        self.names = names


def value_problem(name: str, value: object, declared: Mapping[str, Variable]) -> str | None:
    """What is wrong with ``value`` for variable ``name`` (None: nothing). Values are plain
    strings of one line, at most MAX_VALUE_CHARS characters, for declared variables only."""
    if name not in declared:
        known = ", ".join(declared) or "none"
        return f"{name[:64]!r} is not a declared variable of this persona (declared: {known})"
    if not isinstance(value, str):
        return f"must be a string, not {_json_kind(value)}"
    if len(value) > MAX_VALUE_CHARS:
        return f"must be at most {MAX_VALUE_CHARS} characters, not {len(value)}"
    if not is_one_line(value):
        return "must be one line of text, without control characters"
    return None


def is_one_line(text: str) -> bool:
    """No line breaks or other control characters: a value goes into a sentence. Unicode's
    line breaks too (U+2028, U+2029, NEL): the model reads them as new lines of its
    instructions. And no lone surrogate (JSON's "\\ud800"): no TwiML or event encodes it."""
    return not any(unicodedata.category(ch) in _NOT_IN_A_LINE for ch in text)


# Controls (C0, DEL, C1), line and paragraph separators, surrogates.
_NOT_IN_A_LINE = frozenset({"Cc", "Zl", "Zp", "Cs"})


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def defaults_of(declared: Mapping[str, Variable]) -> dict[str, str]:
    return {v.name: v.default for v in declared.values() if v.default is not None}


def resolve(declared: Mapping[str, Variable], given: Mapping[str, str]) -> dict[str, str]:
    """The call's values: the defaults, overridden by ``given`` (already checked with
    :func:`value_problem`). Raises MissingVariables for a required variable without a value."""
    values = defaults_of(declared) | {k: v for k, v in given.items() if k in declared}
    missing = [name for name in declared if name not in values]
    if missing:
        raise MissingVariables(missing)
    return values
