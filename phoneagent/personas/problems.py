"""What is wrong with a persona file: file, field and reason, every one of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["PersonaError", "Problem"]


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
