"""A persona's own tools (``[[tools]]``) validated into ``BusinessTool`` values.

A tool is declared to the model as StepFun's ``function`` tool (name, description, JSON-schema
parameters), so its name must be one the model can write and the schema one the model can fill:
an object of named properties, each with a JSON type. Only the part of JSON Schema that function
calling uses is accepted, and it is kept small: every byte of it is in every model session, and
a schema the model cannot follow gives the business arguments it cannot use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from phoneagent.personas.model import (
    BUILT_IN_TOOLS,
    DEFAULT_TOOL_FILLER,
    DEFAULT_TOOL_FILLER_AFTER_MS,
    DEFAULT_TOOL_TIMEOUT_MS,
    BusinessTool,
    WebhookTarget,
)
from phoneagent.personas.rules import english_default_text, post_url, secret_env
from phoneagent.personas.table_reader import TomlTable

__all__ = [
    "JSON_TYPES",
    "MAX_DESCRIPTION_CHARS",
    "MAX_SCHEMA_BYTES",
    "MAX_TOOLS",
    "business_tools",
    "fits_type",
    "json_type_of",
]

# Function names as OpenAI-style function calling takes them (letters, digits, '_'), starting
# with a letter so that no name reads as a number or a flag.
TOOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
TOOL_NAME_HINT = "a tool name: letters, digits and '_', starting with a letter, at most 64"
PROPERTY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_TOOLS = 16
MAX_DESCRIPTION_CHARS = 1024
MAX_SCHEMA_BYTES = 8192  # the parameters as JSON
MAX_PROPERTIES = 32  # at any one level
MAX_SCHEMA_DEPTH = 4  # objects and arrays nested in the parameters
TIMEOUT_RANGE_MS = (100, 15_000)
FILLER_AFTER_RANGE_MS = (0, 15_000)
JSON_TYPES = ("string", "number", "integer", "boolean", "array", "object")
# The JSON-schema keywords a property may use: those function calling documents, no references
# (a `$ref` would point nowhere: the schema travels alone).
PROPERTY_KEYWORDS = frozenset(
    {"type", "description", "enum", "items", "properties", "required", "minimum", "maximum",
     "minLength", "maxLength", "pattern", "format", "minItems", "maxItems", "default",
     "additionalProperties"}
)  # fmt: skip
PARAMETERS_KEYWORDS = frozenset({"type", "properties", "required", "description",
                                 "additionalProperties"})  # fmt: skip
WHO_SAYS_THE_FILLER = "the agent would say it in English"


def business_tools(
    top: TomlTable, environ: Mapping[str, str], language: str, webhook: WebhookTarget | None
) -> tuple[BusinessTool, ...]:
    """Every ``[[tools]]`` entry. A tool without its own ``secret_env`` signs with the
    ``[webhook]``'s, if the persona has one; with neither, its requests are unsigned."""
    entries = top.get("tools", list, required=False, default=[])
    if len(entries) > MAX_TOOLS:
        top.problem("tools", f"at most {MAX_TOOLS} tools, not {len(entries)}")
    tools: list[BusinessTool] = []
    for i, raw in enumerate(entries):
        if not isinstance(raw, dict):
            top.problem(f"tools[{i}]", "must be a table ([[tools]] with name, description, url)")
            continue
        entry = TomlTable(raw, top.where(f"tools[{i}]"), top.path, top.problems)
        tool = _tool(entry, environ, language, webhook)
        if tool.name in {t.name for t in tools}:
            entry.problem("name", f"{tool.name} is the name of another tool of this persona")
        tools.append(tool)
        entry.finish()
    return tuple(tools)


def _tool(
    entry: TomlTable, environ: Mapping[str, str], language: str, webhook: WebhookTarget | None
) -> BusinessTool:
    name = entry.text("name", pattern=TOOL_NAME, pattern_hint=TOOL_NAME_HINT)
    if name in BUILT_IN_TOOLS:
        entry.problem("name", f"{name} is a tool phoneagent gives the model itself: choose another")
    description = entry.text("description")
    if len(description) > MAX_DESCRIPTION_CHARS:
        limit = f"must be at most {MAX_DESCRIPTION_CHARS} characters, not {len(description)}"
        entry.problem("description", limit)
    timeout_ms = entry.integer("timeout_ms", DEFAULT_TOOL_TIMEOUT_MS, *TIMEOUT_RANGE_MS)
    filler_after_ms = entry.integer(
        "filler_after_ms", DEFAULT_TOOL_FILLER_AFTER_MS, *FILLER_AFTER_RANGE_MS
    )
    own_secret = secret_env(entry, environ, required=False)
    return BusinessTool(
        name=name,
        description=description,
        parameters=_parameters(entry),
        url=post_url(entry),
        timeout_ms=timeout_ms,
        filler=english_default_text(
            entry, "filler", DEFAULT_TOOL_FILLER, language, WHO_SAYS_THE_FILLER
        ),
        filler_after_ms=filler_after_ms,
        secret_env=own_secret or (webhook.secret_env if webhook is not None else ""),
    )


def _parameters(entry: TomlTable) -> dict[str, Any]:
    """The arguments' schema: ``{type = "object", properties = {...}, required = [...]}``;
    none (a tool that takes no arguments) is an object without properties."""
    empty: dict[str, Any] = {"type": "object", "properties": {}}
    schema = entry.get("parameters", dict, required=False, default=None)
    if schema is None:
        return empty
    problems_before = len(entry.problems)
    for key in schema:
        if key not in PARAMETERS_KEYWORDS:
            entry.problem(
                f"parameters.{key}",
                f"is not used here; the parameters take {', '.join(sorted(PARAMETERS_KEYWORDS))}",
            )
    if schema.get("type") != "object":
        entry.problem("parameters.type", 'must be "object": the arguments are named')
    _object_schema(entry, "parameters", schema, depth=0)
    if len(entry.problems) == problems_before:
        try:
            size = len(json.dumps(schema, ensure_ascii=False).encode())
        except (TypeError, ValueError):  # TOML dates and times have no JSON form
            entry.problem("parameters", "holds a value JSON cannot carry (a TOML date or time?)")
        else:
            if size > MAX_SCHEMA_BYTES:
                entry.problem(
                    "parameters", f"must be at most {MAX_SCHEMA_BYTES} bytes as JSON, not {size}"
                )
    return schema if len(entry.problems) == problems_before else empty


def _object_schema(entry: TomlTable, where: str, schema: dict[str, Any], depth: int) -> None:
    """``properties`` (a table of property schemas) and ``required`` (names among them)."""
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        entry.problem(f"{where}.properties", "must be a table of the arguments, by name")
        properties = {}
    if len(properties) > MAX_PROPERTIES:
        entry.problem(
            f"{where}.properties", f"at most {MAX_PROPERTIES} arguments, not {len(properties)}"
        )
    for name, value in properties.items():
        if not PROPERTY_NAME.fullmatch(name):
            entry.problem(
                f"{where}.properties.{name}",
                "argument names use letters, digits and '_' (at most 64)",
            )
        _property_schema(entry, f"{where}.properties.{name}", value, depth + 1)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        entry.problem(f"{where}.required", "must be a list of argument names")
        return
    for i, name in enumerate(required):
        if name not in properties:
            entry.problem(f"{where}.required[{i}]", f"{name!r} is not one of the properties")
        elif name in required[:i]:
            entry.problem(f"{where}.required[{i}]", f"{name} is listed twice")
    extra = schema.get("additionalProperties", False)
    if not isinstance(extra, bool):
        entry.problem(f"{where}.additionalProperties", "must be true or false")


def _property_schema(entry: TomlTable, where: str, schema: Any, depth: int) -> None:
    if not isinstance(schema, dict):
        entry.problem(where, 'must be a table like { type = "string", description = "…" }')
        return
    if depth > MAX_SCHEMA_DEPTH:
        entry.problem(where, f"nested too deeply (at most {MAX_SCHEMA_DEPTH} levels)")
        return
    for key in schema:
        if key not in PROPERTY_KEYWORDS:
            entry.problem(f"{where}.{key}", "is not a JSON-schema keyword function calling uses")
    kind = schema.get("type")
    if kind not in JSON_TYPES:
        entry.problem(f"{where}.type", f"must be one of {', '.join(JSON_TYPES)}, not {kind!r}")
        return
    if "description" in schema and not isinstance(schema["description"], str):
        entry.problem(f"{where}.description", "must be a string")
    if "enum" in schema:
        enum = schema["enum"]
        if not isinstance(enum, list) or not enum:
            entry.problem(f"{where}.enum", "must be a non-empty list of the allowed values")
        elif not all(fits_type(json_type_of(value), kind) for value in enum):
            entry.problem(f"{where}.enum", f"every value must be of type {kind}")
    if kind == "array":
        if "items" in schema:
            _property_schema(entry, f"{where}.items", schema["items"], depth + 1)
    elif kind == "object":
        _object_schema(entry, where, schema, depth)


def fits_type(value_type: str, kind: str) -> bool:
    """A value of JSON type ``value_type`` is of schema type ``kind`` (an integer is a number)."""
    return value_type == kind or (kind == "number" and value_type == "integer")


def json_type_of(value: Any) -> str:
    """The JSON-schema type of a value parsed from TOML or JSON (bool is no integer here)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"
