"""Typed reads from a parsed TOML table that collect problems instead of raising.

``tomllib`` parses; this checks types, ranges and unknown keys, naming each problem by its dotted
field, so that one pass over a file reports everything wrong with it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from phoneagent.personas.problems import Problem

__all__ = ["TomlTable"]


class TomlTable:
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

    def table(self, key: str, *, required: bool) -> TomlTable | None:
        value = self.get(key, dict, required=required)
        return (
            None if value is None else TomlTable(value, self.where(key), self.path, self.problems)
        )

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
