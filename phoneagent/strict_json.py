"""JSON from outside read strictly: only what every other JSON reader downstream can carry on.
No I/O.

Python's ``json.loads`` is lenient in ways that break things later: it reads ``NaN`` and
``Infinity`` (not JSON), reads ``1e999`` as ``inf`` (which it then writes back as
``Infinity``), keeps the last of a key given twice (another parser may keep the first), turns a
``\\ud800`` escape into half a character that no UTF-8 encoder takes, and raises RecursionError,
not ValueError, a thousand levels deep. :func:`loads` refuses each with a ValueError that says
which.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["loads"]


def loads(text: str | bytes) -> Any:
    """The value of ``text`` (bytes: UTF-8, -16 or -32, as ``json.loads`` detects), or
    ValueError saying what is wrong with it."""
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_finite,
                           object_pairs_hook=_once_each)  # fmt: skip
    except RecursionError:  # [[[[…: Python's parser gives up near 1000 levels
        raise ValueError("nested too deeply") from None
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ValueError("a \\u escape of half a character (a lone surrogate)") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    return value


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is too large a number")
    return value


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:  # one pass: a body may hold thousands of keys
        if key in found:
            raise ValueError(f"the key {key!r} is given twice")
        found[key] = value
    return found
