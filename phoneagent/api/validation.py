"""What a client sends, checked before anything is done with it. No I/O.

Each check raises :class:`~phoneagent.api.errors.ApiError` 422 ``invalid_request`` naming the
field at fault (``variables.name`` for a value inside an object), with a message that says what
is expected.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from phoneagent.api.errors import ApiError
from phoneagent.api.keys import PERSONA_ID
from phoneagent.personas.numbers import E164

__all__ = ["OutboundRequest", "outbound_request", "search_limit"]

MAX_VARIABLES = 50
MAX_VARIABLE_CHARS = 1000  # a value: a name, a date, an address; not a document
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_METADATA_BYTES = 4096  # serialized as compact UTF-8 JSON
# Nesting of the metadata: 4 KiB of "[[[[" would be 2000 levels, and each event that carries the
# metadata (and each store that writes it) would hit Python's recursion limit serializing it.
MAX_METADATA_DEPTH = 16
CALL_FIELDS = ("to", "persona", "from", "variables", "metadata")
DEFAULT_SEARCH_LIMIT, MAX_SEARCH_LIMIT = 50, 200
WHOLE_NUMBER = re.compile(r"[0-9]{1,4}")


@dataclass(frozen=True)
class OutboundRequest:
    """``POST /api/v1/calls``, checked: what the outbound dialer is given."""

    to: str
    persona: str
    from_: str | None = None  # None: the dialer chooses (the persona's number)
    variables: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)


def invalid(field_name: str, message: str) -> ApiError:
    return ApiError(422, "invalid_request", f"{field_name}: {message}", field_name)


def outbound_request(body: Any) -> OutboundRequest:
    """The request in ``body`` (parsed JSON), or ApiError naming the first field at fault.
    Whether the persona exists and the key may use it is the route's to check."""
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_request", "the body must be a JSON object")
    for name in body:
        if name not in CALL_FIELDS:
            raise invalid(name, f"unknown field; the fields are {', '.join(CALL_FIELDS)}")
    to = _number(body, "to", required=True)
    persona = body.get("persona")
    if persona is None:
        raise invalid("persona", "required: the id of the persona that calls (GET /personas)")
    # Its shape first: the id is logged and echoed in a 403 or 422, a megabyte or a newline not.
    if not isinstance(persona, str) or not PERSONA_ID.fullmatch(persona):
        raise invalid("persona", "must be a persona's id (its file's name without .toml)")
    return OutboundRequest(
        to=to or "",
        persona=persona,
        from_=_number(body, "from", required=False),
        variables=_variables(body.get("variables")),
        metadata=_metadata(body.get("metadata")),
    )


def _number(body: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise invalid(name, "required: the number to call, in E.164 (+14155550123)")
        return None
    if not isinstance(value, str) or not E164.fullmatch(value):
        raise invalid(name, "must be a phone number in E.164: + and 7 to 15 digits, no spaces "
                      "(+14155550123)")  # fmt: skip
    return value


def _variables(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("variables", "must be an object of names to string values")
    if len(value) > MAX_VARIABLES:
        raise invalid("variables", f"at most {MAX_VARIABLES} variables")
    for name, text in value.items():
        where = f"variables.{name}"
        if not VARIABLE_NAME.fullmatch(name):
            raise invalid(where, "a variable's name is letters, digits and _ (at most 64), "
                          "not starting with a digit")  # fmt: skip
        if not isinstance(text, str):
            raise invalid(where, "must be a string")
        if len(text) > MAX_VARIABLE_CHARS:
            raise invalid(where, f"at most {MAX_VARIABLE_CHARS} characters")
    return dict(value)


def _metadata(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("metadata", "must be a JSON object")
    if _deeper_than(value, MAX_METADATA_DEPTH):
        raise invalid("metadata", f"at most {MAX_METADATA_DEPTH} levels of objects and arrays")
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    size = len(text.encode("utf-8", "replace"))  # "replace": a lone surrogate is one byte more
    if size > MAX_METADATA_BYTES:
        raise invalid("metadata", f"at most {MAX_METADATA_BYTES} bytes as JSON ({size} given)")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """More than ``limit`` levels of objects and arrays in a parsed JSON value. Level by level,
    not recursively: the value may be as deep as the parser allowed."""
    level, depth = [value], 0
    while level := [v for v in level if isinstance(v, (dict, list))]:
        depth += 1
        if depth > limit:
            return True
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v)]
    return False


def search_limit(query: Mapping[str, str]) -> int:
    """The ``limit`` of ``GET /api/v1/calls``."""
    text = query.get("limit")
    if text is None:
        return DEFAULT_SEARCH_LIMIT
    # Not str.isdigit(): it takes '１０' (int reads it) and '²' (int refuses it).
    if not WHOLE_NUMBER.fullmatch(text) or not 1 <= int(text) <= MAX_SEARCH_LIMIT:
        raise invalid("limit", f"a whole number from 1 to {MAX_SEARCH_LIMIT}")
    return int(text)
