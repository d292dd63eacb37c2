"""What a call carries from where it starts to its end: its direction, the values of its
persona's variables, and the business's own metadata. No I/O.

An inbound call's context comes from the persona's lookup (phoneagent/lookup.py) or, failing
that, the defaults; an outbound call's from the request that placed it. The voice webhook (or
whatever starts the stream) writes it into the call's record
(``twilio.routes.webhooks.start_agent_stream``), which every instance shares, and the media
stream reads it back from there: the two may run on different instances. The record, the call
events and the persona's filled texts (``personas.filled.fill_persona``) all take it from
this one value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from phoneagent.delivery.events import DIRECTIONS
from phoneagent.personas import Persona
from phoneagent.personas.filled import fill_persona
from phoneagent.personas.variables import MissingVariables, defaults_of, resolve, value_problem
from phoneagent.records import Answered

__all__ = [
    "DIRECTIONS",
    "INBOUND",
    "MAX_METADATA_BYTES",
    "OUTBOUND",
    "CallContext",
    "ContextProblem",
    "given_context",
    "metadata_problem",
]

INBOUND, OUTBOUND = DIRECTIONS  # as the call events name them
#: The most variables a call may be given: far above what a persona declares.
MAX_VARIABLES = 50
#: The largest metadata a call carries, as compact JSON: ids and flags for the business's own
#: systems (a CRM id, a campaign), carried in the record and in every event, not a document.
MAX_METADATA_BYTES = 4096
# Nesting of the metadata: 4 KiB of "[[[[" would be 2000 levels, and each event that carries the
# metadata (and each store that writes it) would hit Python's recursion limit serializing it.
MAX_METADATA_DEPTH = 16


@dataclass(frozen=True)
class CallContext:
    """``variables``: every declared variable's value for this call (see :meth:`for_persona`);
    ``metadata``: a JSON object phoneagent does not read, handed back in the call's events."""

    direction: str = INBOUND
    variables: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}")

    @classmethod
    def defaults(cls, persona: Persona, direction: str = INBOUND) -> CallContext:
        """The context of a call nobody told anything about: the persona's defaults."""
        return cls(direction, defaults_of(persona.variables))

    @classmethod
    def of_record(cls, record: Any) -> CallContext | None:
        """The context written into a call's record (``records.CallRecord``); None when none
        was (a console call, or a record that could not be read)."""
        if record is None or record.direction not in DIRECTIONS:
            return None
        return cls(record.direction, dict(record.variables), dict(record.metadata))

    def answered(self, persona_id: str, caller: str, called: str) -> Answered:
        """The change that writes this context into the call's record (with who called)."""
        return Answered(persona_id, caller, called, self.direction,
                        dict(self.variables), dict(self.metadata))  # fmt: skip

    def persona(self, persona: Persona) -> Persona:
        """``persona`` as this call has it: its texts filled with the call's values."""
        # The defaults first: a variable declared since the call's values were taken (a
        # persona reloaded between the webhook and the stream) has its default.
        return fill_persona(persona, defaults_of(persona.variables) | dict(self.variables))


def metadata_problem(metadata: object) -> str | None:
    """What is wrong with a call's metadata (None: nothing): a JSON object of at most
    MAX_METADATA_BYTES bytes, at most MAX_METADATA_DEPTH levels deep."""
    if not isinstance(metadata, dict):
        return "must be a JSON object"
    if _deeper_than(metadata, MAX_METADATA_DEPTH):
        return f"must be at most {MAX_METADATA_DEPTH} levels of objects and arrays"
    try:
        text = json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        size = len(text.encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError):
        return "must hold JSON values only"
    if size > MAX_METADATA_BYTES:
        return f"must be at most {MAX_METADATA_BYTES} bytes as JSON, not {size}"
    return None


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


class ContextProblem(ValueError):
    """A call's given context that cannot be used: ``field`` names the input at fault
    (``variables.NAME``, ``variables``, ``metadata``), ``reason`` says why."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def given_context(
    persona: Persona, direction: str, variables: object, metadata: object
) -> CallContext:
    """The context of a call whose variables and metadata were given from outside (an API
    request, ``phoneagent call --var``): each value checked against the persona's declared
    variables (:func:`value_problem`), the defaults added, every required variable given, the
    metadata checked (:func:`metadata_problem`). The one check of a given context; raises
    ContextProblem naming the first field at fault."""
    if not isinstance(variables, Mapping):
        raise ContextProblem("variables", "must be an object of names to string values")
    if len(variables) > MAX_VARIABLES:
        raise ContextProblem("variables", f"at most {MAX_VARIABLES} variables")
    for name, value in variables.items():
        if problem := value_problem(str(name), value, persona.variables):
            raise ContextProblem(f"variables.{str(name)[:64]}", problem)
    try:
        values = resolve(persona.variables, variables)
    except MissingVariables as missing:
        raise ContextProblem(
            f"variables.{missing.names[0]}", "required by the persona: give it a value"
        ) from None
    if problem := metadata_problem(metadata):
        raise ContextProblem("metadata", problem)
    assert isinstance(metadata, dict)
    return CallContext(direction, values, dict(metadata))
