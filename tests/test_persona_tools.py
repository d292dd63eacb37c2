"""Persona tools (``[[tools]]``): every validation rule, with the file, field and reason
``personas check`` prints; what the model is told about them."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from conftest import EXAMPLE_PERSONAS
from test_cli import phoneagent

from phoneagent.call.prompts import BUSINESS_TOOL_RULES, instructions_for, session_config
from phoneagent.personas import BusinessTool, check_directory, load_directory
from phoneagent.personas.tool_validation import MAX_SCHEMA_BYTES, MAX_TOOLS
from phoneagent.realtime.base import UpdateSession
from phoneagent.realtime.stepfun import StepFunDialect

ENV = {"LUCA_TOOLS_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "HOOK_SECRET": "plain"}


def persona_text(tools: str, *, language: str = "en-US", extra: str = "") -> str:
    return textwrap.dedent(
        f"""\
            name = "Tools test"
            numbers = ["+14155550100"]
            language = "{language}"
            voice = "linjiajiejie"
            greeting = "Hello!"
            instructions = "Answer the phone."
            busy_message = "busy"
            apology = "sorry"
            {extra}
            [end_call]
            goodbye = "Bye!"
            """
    ) + textwrap.dedent(tools)


GOOD_TOOL = """
    [[tools]]
    name = "check_availability"
    description = "Is a table free?"
    url = "https://booking.example.com/tools/availability"
    [tools.parameters]
    type = "object"
    required = ["date", "guests"]
    [tools.parameters.properties.date]
    type = "string"
    description = "YYYY-MM-DD"
    [tools.parameters.properties.guests]
    type = "integer"
    enum = [1, 2, 3, 4]
"""


def with_keys(tool: str, keys: str) -> str:
    """``tool`` with top-level ``keys`` of its own (before its parameters' tables)."""
    return tool.replace("    [tools.parameters]", f"    {keys}\n    [tools.parameters]", 1)


def check(tmp_path: Path, text: str, environ=None) -> list[str]:
    (tmp_path / "line.toml").write_text(text)
    report = check_directory(tmp_path, ENV if environ is None else environ)
    return report.lines()


def problems(tmp_path: Path, tools: str, **options) -> list[str]:
    """The ERROR lines for a persona with ``tools``, without the file's path."""
    lines = check(tmp_path, persona_text(tools, **options))
    prefix = f"ERROR {tmp_path / 'line.toml'}: "
    return [line.removeprefix(prefix) for line in lines if line.startswith("ERROR")]


def test_a_valid_tool_and_its_defaults(tmp_path):
    assert problems(tmp_path, GOOD_TOOL) == []
    [tool] = load_directory(tmp_path, ENV).personas["line"].tools
    assert tool == BusinessTool(
        name="check_availability",
        description="Is a table free?",
        parameters={
            "type": "object",
            "required": ["date", "guests"],
            "properties": {
                "date": {"type": "string", "description": "YYYY-MM-DD"},
                "guests": {"type": "integer", "enum": [1, 2, 3, 4]},
            },
        },
        url="https://booking.example.com/tools/availability",
        timeout_ms=5000,
        filler="One moment, let me check that.",
        filler_after_ms=1500,
        secret_env="",
    )


def test_a_tool_without_parameters_takes_none(tmp_path):
    tools = """
        [[tools]]
        name = "opening_hours"
        description = "Today's opening hours."
        url = "http://localhost:8080/hours"
    """
    assert problems(tmp_path, tools) == []
    [tool] = load_directory(tmp_path, ENV).personas["line"].tools
    assert tool.parameters == {"type": "object", "properties": {}}


def test_signing_secret_own_or_the_webhooks(tmp_path):
    own = with_keys(GOOD_TOOL, 'secret_env = "LUCA_TOOLS_SECRET"')
    assert problems(tmp_path, own) == []
    assert load_directory(tmp_path, ENV).personas["line"].tools[0].secret_env == "LUCA_TOOLS_SECRET"
    webhook = '[webhook]\nurl = "https://crm.example.com/hook"\nsecret_env = "HOOK_SECRET"\n'
    assert problems(tmp_path, GOOD_TOOL, extra=webhook) == []
    [tool] = load_directory(tmp_path, ENV).personas["line"].tools
    assert tool.secret_env == "HOOK_SECRET"
    unset = with_keys(GOOD_TOOL, 'secret_env = "NOT_SET_ANYWHERE"')
    assert problems(tmp_path, unset) == [
        "tools[0].secret_env: environment variable NOT_SET_ANYWHERE (the signing secret) is not set"
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('name = "check_availability"', 'name = "check availability"'),
         "tools[0].name: 'check availability' is not a tool name: letters, digits and '_', "
         "starting with a letter, at most 64"),
        (('name = "check_availability"', 'name = "transfer_call"'),
         "tools[0].name: transfer_call is a tool phoneagent gives the model itself: choose "
         "another"),
        (('name = "check_availability"', 'name = "end_call"'),
         "tools[0].name: end_call is a tool phoneagent gives the model itself: choose another"),
        (('description = "Is a table free?"', 'description = " "'),
         "tools[0].description: must not be empty"),
        (('url = "https://booking.example.com/tools/availability"',
          'url = "http://booking.example.com/tools"'),
         "tools[0].url: must use https:// (http is allowed for localhost only)"),
        (('url = "https://booking.example.com/tools/availability"', 'url = "booking/tools"'),
         "tools[0].url: 'booking/tools' is not an absolute https:// URL"),
        (('[tools.parameters]', 'timeout_ms = 60000\n[tools.parameters]'),
         "tools[0].timeout_ms: must be between 100 and 15000, not 60000"),
        (('[tools.parameters]', 'filler_after_ms = -1\n[tools.parameters]'),
         "tools[0].filler_after_ms: must be between 0 and 15000, not -1"),
        (('[tools.parameters]', 'filler = ""\n[tools.parameters]'),
         "tools[0].filler: must not be empty"),
        (('[tools.parameters]', 'method = "GET"\n[tools.parameters]'),
         "tools[0].method: unknown key (check the spelling against the README)"),
        (('type = "object"', 'type = "array"'),
         'tools[0].parameters.type: must be "object": the arguments are named'),
        (('required = ["date", "guests"]', 'required = ["date", "time"]'),
         "tools[0].parameters.required[1]: 'time' is not one of the properties"),
        (('required = ["date", "guests"]', 'required = ["date", "date"]'),
         "tools[0].parameters.required[1]: date is listed twice"),
        (('required = ["date", "guests"]', 'required = "date"'),
         "tools[0].parameters.required: must be a list of argument names"),
        (('type = "string"', 'type = "text"'),
         "tools[0].parameters.properties.date.type: must be one of string, number, integer, "
         "boolean, array, object, not 'text'"),
        (('enum = [1, 2, 3, 4]', 'enum = [1, "two"]'),
         "tools[0].parameters.properties.guests.enum: every value must be of type integer"),
        (('enum = [1, 2, 3, 4]', '"$ref" = "#/defs/guests"'),
         "tools[0].parameters.properties.guests.$ref: is not a JSON-schema keyword function "
         "calling uses"),
        (('type = "object"', 'type = "object"\nanyOf = []'),
         "tools[0].parameters.anyOf: is not used here; the parameters take "
         "additionalProperties, description, properties, required, type"),
        (('description = "YYYY-MM-DD"', 'default = 2026-12-11'),
         "tools[0].parameters: holds a value JSON cannot carry (a TOML date or time?)"),
    ],
)  # fmt: skip
def test_each_rule_names_its_field(tmp_path, change, expected):
    old, new = change
    assert old in GOOD_TOOL
    assert problems(tmp_path, GOOD_TOOL.replace(old, new, 1)) == [expected]


def test_a_property_must_be_a_table_with_a_type(tmp_path):
    tools = """
        [[tools]]
        name = "lookup"
        description = "Look it up."
        url = "https://example.com/lookup"
        parameters = { type = "object", properties = { who = "a name", what = {} } }
    """
    assert problems(tmp_path, tools) == [
        "tools[0].parameters.properties.who: must be a table like "
        '{ type = "string", description = "…" }',
        "tools[0].parameters.properties.what.type: must be one of string, number, integer, "
        "boolean, array, object, not None",
    ]


def test_nested_arrays_and_objects_are_checked_too(tmp_path):
    tools = """
        [[tools]]
        name = "order"
        description = "Place an order."
        url = "https://example.com/order"
        [tools.parameters]
        type = "object"
        [tools.parameters.properties.items]
        type = "array"
        items = { type = "object", properties = { dish = { type = "dish" } }, required = ["qty"] }
    """
    assert problems(tmp_path, tools) == [
        "tools[0].parameters.properties.items.items.properties.dish.type: must be one of string, "
        "number, integer, boolean, array, object, not 'dish'",
        "tools[0].parameters.properties.items.items.required[0]: 'qty' is not one of the "
        "properties",
    ]


def test_names_are_unique_and_tools_are_few(tmp_path):
    assert problems(tmp_path, GOOD_TOOL + GOOD_TOOL) == [
        "tools[1].name: check_availability is the name of another tool of this persona"
    ]
    many = "".join(
        GOOD_TOOL.replace("check_availability", f"tool_{i}") for i in range(MAX_TOOLS + 1)
    )
    assert problems(tmp_path, many) == [f"tools: at most {MAX_TOOLS} tools, not {MAX_TOOLS + 1}"]
    assert problems(tmp_path, "", extra='tools = ["check"]') == [
        "tools[0]: must be a table ([[tools]] with name, description, url)"
    ]


def test_a_schema_too_large_is_refused(tmp_path):
    long = "x" * MAX_SCHEMA_BYTES
    [problem] = problems(tmp_path, GOOD_TOOL.replace('"YYYY-MM-DD"', f'"{long}"'))
    assert problem.startswith(f"tools[0].parameters: must be at most {MAX_SCHEMA_BYTES} bytes")


def test_the_filler_is_required_in_another_language(tmp_path):
    assert problems(tmp_path, GOOD_TOOL, language="zh-CN") == [
        "tools[0].filler: is required when the language is not English (zh-CN): the default is "
        "English text, and the agent would say it in English"
    ]
    chinese = with_keys(GOOD_TOOL, 'filler = "请稍等，我帮您查一下。"')
    assert problems(tmp_path, chinese, language="zh-CN") == []


def test_the_model_is_given_the_tools_in_stepfuns_shape(tmp_path):
    check(tmp_path, persona_text(GOOD_TOOL))
    persona = load_directory(tmp_path, ENV).personas["line"]
    config = session_config(persona)
    assert [t.name for t in config.tools] == ["check_availability", "end_call"]
    assert BUSINESS_TOOL_RULES in instructions_for(persona)
    update = json.loads(StepFunDialect().encode(UpdateSession(config)))
    [declared] = [t for t in update["session"]["tools"] if t["function"]["name"] != "end_call"]
    assert declared == {
        "type": "function",
        "function": {
            "name": "check_availability",
            "description": "Is a table free?",
            "parameters": persona.tools[0].parameters,
        },
    }


def test_a_persona_without_tools_is_told_nothing_of_them():
    persona = load_directory(EXAMPLE_PERSONAS, environ={}).personas["bright-smile-dental"]
    assert persona.tools == ()
    assert BUSINESS_TOOL_RULES not in instructions_for(persona)


def test_the_example_trattoria_declares_a_tool():
    luca = load_directory(EXAMPLE_PERSONAS, environ={}).personas["trattoria-luca"]
    [tool] = luca.tools
    assert tool.name == "check_availability"
    assert tool.url.startswith("http://localhost:")
    assert tool.parameters["required"] == ["date", "time", "guests"]


def test_the_readmes_complete_persona_file_is_valid(tmp_path):
    """The README shows every key, tools included: it must pass ``personas check``."""
    readme = (EXAMPLE_PERSONAS.parent / "README.md").read_text()
    block = readme.split("```toml\n# personas/bright-smile-dental.toml\n", 1)[1].split("```")[0]
    (tmp_path / "bright-smile-dental.toml").write_text(block)
    environ = {"BRIGHT_SMILE_WEBHOOK_SECRET": "s", "BRIGHT_SMILE_TOOLS_SECRET": "t"}
    report = check_directory(tmp_path, environ)
    assert report.problems == []
    [tool] = report.persona_set.personas["bright-smile-dental"].tools
    assert (tool.name, tool.secret_env) == ("check_appointment", "BRIGHT_SMILE_TOOLS_SECRET")


def test_personas_check_prints_a_tool_problem_with_file_field_and_reason(tmp_path):
    bad = tmp_path / "trattoria-luca.toml"
    text = (EXAMPLE_PERSONAS / "trattoria-luca.toml").read_text()
    bad.write_text(text.replace('type = "integer"', 'type = "int"'))
    result = phoneagent("personas", "check", str(tmp_path))
    assert result.returncode == 1
    assert (
        f"ERROR {bad}: tools[0].parameters.properties.guests.type: must be one of string, "
        "number, integer, boolean, array, object, not 'int'"
    ) in result.stdout.splitlines()
