"""What a client sends, checked before anything is done with it. No I/O.

Each check raises :class:`~phoneagent.api.errors.ApiError` 422 ``invalid_request`` naming the
field at fault (``variables.name`` for a value inside an object), with a message that says what
is expected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from phoneagent.api.errors import ApiError
from phoneagent.api.keys import PERSONA_ID
from phoneagent.personas.numbers import E164

__all__ = ["OutboundRequest", "outbound_request", "search_limit"]

CALL_FIELDS = ("to", "persona", "from", "variables", "metadata")
DEFAULT_SEARCH_LIMIT, MAX_SEARCH_LIMIT = 50, 200
WHOLE_NUMBER = re.compile(r"[0-9]{1,4}")


@dataclass(frozen=True)
class OutboundRequest:
    """``POST /api/v1/calls``, checked: what the outbound dialer is given."""

    to: str
    persona: str
    from_: str | None = None  # None: the dialer chooses (the persona's number)
    # As sent: checked against the persona (``call.context.given_context``) by the route.
    variables: Any = field(default_factory=dict)
    metadata: Any = field(default_factory=dict)


def invalid(field_name: str, message: str) -> ApiError:
    return ApiError(422, "invalid_request", f"{field_name}: {message}", field_name)


def outbound_request(body: Any) -> OutboundRequest:
    """The request in ``body`` (parsed JSON), or ApiError naming the first field at fault.
    Whether the persona exists and the key may use it, and the variables and metadata (which
    depend on the persona), are the route's to check."""
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
        variables=body.get("variables", {}),
        metadata=body.get("metadata", {}),
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


def search_limit(query: Mapping[str, str]) -> int:
    """The ``limit`` of ``GET /api/v1/calls``."""
    text = query.get("limit")
    if text is None:
        return DEFAULT_SEARCH_LIMIT
    # Not str.isdigit(): it takes '１０' (int reads it) and '²' (int refuses it).
    if not WHOLE_NUMBER.fullmatch(text) or not 1 <= int(text) <= MAX_SEARCH_LIMIT:
        raise invalid("limit", f"a whole number from 1 to {MAX_SEARCH_LIMIT}")
    return int(text)
