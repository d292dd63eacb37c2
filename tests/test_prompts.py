"""What the model is told, as text: the persona first, then the phone-call rules, the voice
(tone, speaking rate), how to listen to the caller, and the tools, composed in one place."""

import dataclasses
import json
import textwrap

import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.call.prompts import (
    VERBATIM_PROMPT,
    instructions_for,
    listening,
    phone_call_rules,
    say_verbatim,
    session_config,
    tools_for,
    with_guidance,
)
from phoneagent.handoff import HangUp, Transfer, handoff_from_keypad, handoff_from_tool
from phoneagent.personas import check_directory, load_directory


@pytest.fixture
def dental():
    return load_directory(EXAMPLE_PERSONAS, environ={}).personas["bright-smile-dental"]


@pytest.fixture
def styled(dental):
    return dataclasses.replace(
        dental,
        tone="warm and unhurried, a smile in the voice",
        speaking_rate="slow",
        upset_caller_target="front_desk",
    )


def test_the_persona_comes_first_then_the_rules_the_voice_and_the_listening(styled):
    text = instructions_for(styled)
    persona, rules, voice, listen = text.split("\n\n")[-4:]
    assert text.startswith(styled.instructions.strip())
    assert persona.endswith("next appointment is: none on file.")  # its last paragraph, filled
    assert rules == (
        "You are on a phone call. Always speak English. Keep answers short and spoken: no "
        "lists, no markdown, no emoji. Stay the character described above for the whole call, "
        "whatever the caller says; if they ask whether they are talking to a person, answer "
        "truthfully."
    )
    assert voice == (
        "Your voice in every reply, including sentences you are asked to say word for word: "
        "warm and unhurried, a smile in the voice. Speak slowly and clearly, with a short pause "
        "between sentences."
    )
    assert listen.startswith("Listen to how the caller sounds, not only to their words")
    assert (
        "If the caller sounds angry, distressed or confused and you cannot settle it in a "
        'sentence or two, call transfer_call with target "front_desk"'
    ) in listen


def test_without_tone_rate_or_upset_target_nothing_is_added_for_them(dental):
    text = instructions_for(dental)
    assert text == "\n\n".join(
        [dental.instructions.strip(), phone_call_rules(dental), listening(dental)]
    )
    assert "Your voice" not in text and "angry" not in text
    assert "Speak briskly" in instructions_for(dataclasses.replace(dental, speaking_rate="fast"))


def test_a_mandarin_persona_is_told_to_speak_mandarin_in_english(dental):
    zh = dataclasses.replace(dental, language="zh-CN", tone="语气温柔，耐心")
    text = instructions_for(zh)
    assert "Always speak Mandarin Chinese." in text
    assert "word for word: 语气温柔，耐心." in text


def test_every_instruction_the_model_gets_keeps_the_persona_first(styled):
    base = instructions_for(styled)
    assert session_config(styled).instructions == base
    assert say_verbatim(styled, "您好。") == f"{base}\n\n{VERBATIM_PROMPT}您好。"
    assert with_guidance(styled, "Ask if they are there.") == f"{base}\n\nAsk if they are there."


def test_the_transfer_tool_names_the_targets_and_the_upset_caller_target(styled, dental):
    transfer, end = tools_for(styled)
    assert transfer.name == "transfer_call" and end.name == "end_call"
    assert transfer.description.startswith(
        "Transfer the caller to a person. Use it when the caller asks for a person or needs "
        "something only a person can do, or, to front_desk, when the caller sounds angry, "
        "distressed or confused. Targets: front_desk: A human receptionist"
    )
    assert transfer.parameters["properties"]["target"]["enum"] == ["front_desk", "emergency"]
    assert "how they sound" in transfer.parameters["properties"]["reason"]["description"]
    assert transfer.parameters["required"] == ["target"]
    plain, _ = tools_for(dental)
    assert "angry" not in plain.description
    assert session_config(styled).tools == tools_for(styled)


def test_a_persona_without_targets_has_only_end_call(dental):
    [end] = tools_for(dataclasses.replace(dental, transfer={}))
    assert end.name == "end_call"


# --- the reason a transfer is asked for ---------------------------------------------------------


def test_the_reason_the_model_gives_travels_with_the_transfer(dental):
    args = json.dumps({"target": "front_desk", "reason": "  caller sounds\n distressed "})
    handoff = handoff_from_tool(dental, "transfer_call", args)
    assert handoff == Transfer(dental.transfer["front_desk"], "caller sounds distressed")
    assert handoff_from_tool(dental, "transfer_call", '{"target": "front_desk"}') == Transfer(
        dental.transfer["front_desk"], ""
    )
    rambling = json.dumps({"target": "front_desk", "reason": "x" * 500})
    long = handoff_from_tool(dental, "transfer_call", rambling)
    assert len(long.reason) == 200
    assert handoff_from_tool(dental, "end_call", "{}") == HangUp()


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ('{"target": "front_desk", "reason": 3}', "reason must be a string"),
        ("[1]", "the arguments are not a JSON object"),
        ("not json", "the arguments are not a JSON object"),
        ('{"target": "billing"}', "unknown target 'billing'"),
    ],
)
def test_bad_transfer_arguments_are_refused_to_the_model(dental, arguments, error):
    assert error in handoff_from_tool(dental, "transfer_call", arguments)


def test_a_keypad_transfer_records_the_digit(dental):
    assert handoff_from_keypad(dental, "0") == Transfer(
        dental.transfer["front_desk"], "the caller pressed 0"
    )


# --- the persona keys ----------------------------------------------------------------------------


def persona_with(tmp_path, extra: str):
    (tmp_path / "line.toml").write_text(
        textwrap.dedent("""\
            name = "Line"
            numbers = ["+14155550100"]
            language = "en-US"
            voice = "linjiajiejie"
            greeting = "Hello"
            instructions = "Answer the phone."
            """)
        + extra
        + '\n[transfer.desk]\nnumber = "+14155550111"\ndescription = "A person."\n'
        'announcement = "One moment."\n[end_call]\ngoodbye = "Bye"\n'
    )
    report = check_directory(tmp_path, environ={})
    problems = {p.field: p.reason for p in report.problems}
    persona = report.persona_set.personas["line"] if report.persona_set else None
    return persona, problems


def test_tone_rate_and_upset_target_are_read(tmp_path):
    persona, problems = persona_with(
        tmp_path,
        'tone = "温柔，耐心，语速平稳"\nspeaking_rate = "slow"\nupset_caller_target = "desk"\n',
    )
    assert problems == {}
    assert (persona.tone, persona.speaking_rate, persona.upset_caller_target) == (
        "温柔，耐心，语速平稳", "slow", "desk"
    )  # fmt: skip


def test_defaults_add_nothing(tmp_path):
    persona, _ = persona_with(tmp_path, "")
    assert (persona.tone, persona.speaking_rate, persona.upset_caller_target) == ("", "normal", "")


@pytest.mark.parametrize(
    ("extra", "field", "reason"),
    [
        ('speaking_rate = "very fast"', "speaking_rate",
         "'very fast' is not one of slow, normal, fast"),
        ('upset_caller_target = "manager"', "upset_caller_target",
         "'manager' is not a transfer target (desk)"),
        (f'tone = "{"温" * 201}"', "tone", "must be at most 200 characters, not 201"),
        ('tone = """warm\nand kind"""', "tone", "must be one line"),
        ('tone = ""', "tone", "must not be empty"),
        ("tone = 3", "tone", "must be a string, not an integer (3)"),
    ],
)  # fmt: skip
def test_bad_voice_keys_are_refused_with_field_and_reason(tmp_path, extra, field, reason):
    persona, problems = persona_with(tmp_path, extra + "\n")
    assert persona is None
    assert reason in problems[field]
