import os
import shutil
import textwrap
from pathlib import Path

import pytest
from conftest import BROKEN_PERSONAS, EXAMPLE_PERSONAS

from phoneagent.personas import (
    DEFAULT_SILENCE_DURATION_MS,
    KeypadHangUp,
    KeypadTransfer,
    PersonaError,
    PersonaRegistry,
    check_directory,
    load_directory,
    normalise_number,
)

ENV = {"HOME": "/root"}  # the broken fixtures' https-less webhook names $HOME as its secret


def persona_toml(name="Test Line", numbers=("+14155550100",), extra="", tail=""):
    quoted = ", ".join(f'"{n}"' for n in numbers)
    return textwrap.dedent(
        f"""\
        name = "{name}"
        numbers = [{quoted}]
        language = "en-US"
        voice = "linjiajiejie"
        greeting = "Hello!"
        instructions = "Answer the phone."
        {extra}
        [end_call]
        goodbye = "Bye!"
        {tail}"""
    )


def write(directory: Path, stem: str, text: str) -> Path:
    path = directory / f"{stem}.toml"
    path.write_text(text)
    return path


# --- the shipped examples -------------------------------------------------------------


def test_example_personas_are_valid_and_complete():
    personas = load_directory(EXAMPLE_PERSONAS, environ={})
    assert set(personas.personas) == {
        "bright-smile-dental",
        "bright-smile-reminders",
        "renxin-clinic",
        "trattoria-luca",
    }
    dental = personas.personas["bright-smile-dental"]
    assert dental.default
    assert dental.numbers == ("+14155550100",)
    assert set(dental.transfer) == {"front_desk", "emergency"}
    assert dental.transfer["emergency"].number == "+14155550199"
    assert dental.silence_duration_ms == 700
    assert dental.goodbye.startswith("Thank you for calling Bright Smile Dental")
    luca = personas.personas["trattoria-luca"]
    assert luca.vad_threshold == 1400
    assert luca.silence_duration_ms == DEFAULT_SILENCE_DURATION_MS
    assert luca.webhook is None
    renxin = personas.personas["renxin-clinic"]
    assert (renxin.language, renxin.say_language, renxin.say_voice) == (
        "zh-CN", "cmn-CN", "Polly.Zhiyu-Neural"
    )  # fmt: skip
    assert renxin.voice == "qinhenvsheng"
    assert renxin.greeting.startswith("您好，这里是仁心家庭诊所")
    assert (renxin.speaking_rate, renxin.upset_caller_target) == ("slow", "patient_relations")
    assert renxin.transfer["patient_relations"].announcement.startswith("我明白")


# --- every validation rule, one broken fixture each -------------------------------------

EXPECTED_PROBLEMS = {
    "bad-e164.toml": [
        ("numbers[0]", "'+1 (415) 555-0104' is not an E.164 number", "write it as +14155550104"),
        ("numbers[1]", "'4155550105' is not an E.164 number", ""),
    ],
    "bad-transfer.toml": [
        ("transfer.front_desk.number", "'555-0111' is not an E.164 number", ""),
        ("transfer.front_desk.announcement", "is required", ""),
    ],
    "claims-number.toml": [],
    "duplicate-number.toml": [
        ("numbers[1]", "+14155550100 is already claimed by", "claims-number.toml"),
    ],
    "http-webhook.toml": [("webhook.url", "must use https://", "localhost only")],
    "missing-greeting.toml": [("greeting", "is required", "")],
    "missing-secret.toml": [
        ("webhook.secret_env", "environment variable PHONEAGENT_TEST_UNSET_SECRET", "not set"),
    ],
    "not-toml.toml": [("", "is not valid TOML", "line 3")],
    "out-of-range.toml": [("vad_threshold", "must be between 0 and 5000, not 9000", "")],
    "say-voice.toml": [
        ("say_voice", "Polly.Joanna-Neural speaks en-US, not the persona's language", "zh-CN"),
    ],
    "second-default.toml": [("default", "only one persona may be the default", "claims-number")],
    "unknown-key.toml": [("voise", "unknown key", "")],
    "wrong-type.toml": [("max_call_seconds", "must be an integer, not a string ('900')", "")],
}


def test_every_broken_fixture_is_refused_with_file_field_and_reason():
    report = check_directory(BROKEN_PERSONAS, environ=ENV)
    assert report.persona_set is None
    assert sorted(p.name for p in report.files) == sorted(EXPECTED_PROBLEMS)
    for path in report.files:
        got = report.problems_for(path)
        expected = EXPECTED_PROBLEMS[path.name]
        assert [p.field for p in got] == [field for field, _, _ in expected], path.name
        for problem, (_, reason, detail) in zip(got, expected, strict=True):
            assert reason in problem.reason, problem
            assert detail in problem.reason, problem
            assert str(problem).startswith(f"{path}: ")


def test_load_directory_raises_with_every_problem():
    with pytest.raises(PersonaError) as caught:
        load_directory(BROKEN_PERSONAS, environ=ENV)
    assert len(caught.value.problems) == sum(map(len, EXPECTED_PROBLEMS.values()))


def test_many_problems_in_one_file_are_all_reported(tmp_path):
    write(
        tmp_path,
        "messy",
        'name = ""\nnumbers = "+14155550100"\nlanguage = "English"\nvoice = 3\n'
        'greeting = "Hi"\ninstructions = "x"\ndefault = "yes"\n',
    )
    problems = check_directory(tmp_path, environ={}).problems
    reasons = {p.field: p.reason for p in problems}
    assert len(problems) == 6
    assert reasons == {
        "name": "must not be empty",
        "numbers": "must be a list, not a string ('+14155550100')",
        "language": "'English' is not a language tag like en-US",
        "voice": "must be a string, not an integer (3)",
        "default": "must be true or false, not a string ('yes')",
        "end_call": "is required",
    }


def test_file_name_must_be_a_usable_persona_id(tmp_path):
    write(tmp_path, "my line!", persona_toml())
    [problem] = check_directory(tmp_path, environ={}).problems
    assert problem.field == ""
    assert "the file name is the persona id" in problem.reason


def test_missing_and_empty_directories_are_refused(tmp_path):
    [missing] = check_directory(tmp_path / "nope", environ={}).problems
    assert missing.reason == "personas directory does not exist"
    [empty] = check_directory(tmp_path, environ={}).problems
    assert "no persona files" in empty.reason


def test_number_listed_twice_in_one_file(tmp_path):
    write(tmp_path, "twice", persona_toml(numbers=("+14155550100", "+14155550100")))
    [problem] = check_directory(tmp_path, environ={}).problems
    assert (problem.field, problem.reason) == ("numbers[1]", "+14155550100 is listed twice")


def test_persona_without_numbers_must_be_the_default(tmp_path):
    write(tmp_path, "nobody", persona_toml(numbers=()))
    [problem] = check_directory(tmp_path, environ={}).problems
    assert problem.field == "numbers"
    write(tmp_path, "nobody", persona_toml(numbers=(), extra="default = true"))
    assert check_directory(tmp_path, environ={}).problems == []


def test_webhook_with_secret_set_and_localhost_http(tmp_path):
    tail = '[webhook]\nurl = "http://localhost:9000/hooks"\nsecret_env = "LINE_SECRET"\n'
    write(tmp_path, "hooked", persona_toml(tail=tail))
    persona = load_directory(tmp_path, environ={"LINE_SECRET": "s3cret"}).personas["hooked"]
    assert persona.webhook is not None
    assert persona.webhook.url == "http://localhost:9000/hooks"
    assert persona.webhook.secret_env == "LINE_SECRET"


def test_hidden_files_are_ignored(tmp_path):
    write(tmp_path, "line", persona_toml())
    (tmp_path / ".line.toml.swp").write_text("garbage")
    (tmp_path / "..data").mkdir()
    assert list(load_directory(tmp_path, environ={}).personas) == ["line"]


# --- lookup by called number ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+14155550100", "+14155550100"),
        ("+1 (415) 555-0100", "+14155550100"),
        ("0044 20 7946 0958", "+442079460958"),
        ("anonymous", None),
        ("client:alice", None),
        ("", None),
        ("+0123456789", None),
        ("+1234567890123456", None),
    ],
)
def test_normalise_number(raw, expected):
    assert normalise_number(raw) == expected


def test_lookup_by_called_number_and_default():
    personas = load_directory(EXAMPLE_PERSONAS, environ={})
    assert personas.for_number("+14155550142").id == "trattoria-luca"
    assert personas.for_number("+1 415 555 0143").id == "trattoria-luca"
    assert personas.for_number("+14155550100").id == "bright-smile-dental"
    # Unclaimed and unparsable numbers fall back to the default persona.
    assert personas.for_number("+442079460958").id == "bright-smile-dental"
    assert personas.for_number("anonymous").id == "bright-smile-dental"


def test_lookup_without_default_returns_none(tmp_path):
    shutil.copy(EXAMPLE_PERSONAS / "trattoria-luca.toml", tmp_path)
    personas = load_directory(tmp_path, environ={})
    assert personas.default is None
    assert personas.for_number("+14155550142").id == "trattoria-luca"
    assert personas.for_number("+14155550100") is None


# --- hot reload ------------------------------------------------------------------------------


def bump_mtime(path: Path) -> None:
    # Two writes within one filesystem tick can share an mtime; make the change visible.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_reload_applies_a_valid_change(tmp_path):
    path = write(tmp_path, "line", persona_toml(name="Before"))
    registry = PersonaRegistry(tmp_path, environ={})
    assert registry.reload_if_changed() is False  # nothing changed yet

    path.write_text(persona_toml(name="After", numbers=("+14155550199",)))
    bump_mtime(path)
    assert registry.reload_if_changed() is True
    assert registry.current.personas["line"].name == "After"
    assert registry.current.for_number("+14155550199").id == "line"

    write(tmp_path, "second", persona_toml(name="Second", numbers=("+14155550123",)))
    assert registry.reload_if_changed() is True
    assert registry.current.for_number("+14155550123").id == "second"


def test_reload_refuses_an_invalid_change_and_keeps_serving(tmp_path, capsys):
    path = write(tmp_path, "line", persona_toml(name="Good"))
    registry = PersonaRegistry(tmp_path, environ={})
    good = registry.current

    path.write_text(persona_toml(name="Bad", extra='voise = "x"'))
    bump_mtime(path)
    assert registry.reload_if_changed() is False
    assert registry.current is good
    assert registry.current.for_number("+14155550100").name == "Good"

    # A second file claiming the same number is refused as a set, too.
    write(tmp_path, "rival", persona_toml(name="Rival"))
    assert registry.reload_if_changed() is False
    assert registry.current is good

    # Fixing both files applies the new set.
    path.write_text(persona_toml(name="Fixed"))
    bump_mtime(path)
    (tmp_path / "rival.toml").unlink()
    assert registry.reload_if_changed() is True
    assert registry.current.personas["line"].name == "Fixed"


def test_a_refused_reload_is_kept_as_personas_check_prints_it_until_a_reload_applies(tmp_path):
    path = write(tmp_path, "line", persona_toml(name="Good"))
    write(tmp_path, "other", persona_toml(name="Other", numbers=("+14155550101",)))
    registry = PersonaRegistry(tmp_path, environ={})
    assert registry.refused is None

    path.write_text(persona_toml(name="Bad", extra='voise = "x"'))
    bump_mtime(path)
    assert registry.reload_if_changed() is False
    refused = registry.refused
    assert refused is not None and refused.at > 0
    assert refused.report.lines() == [
        f"ERROR {path}: voise: unknown key (check the spelling against the README)",
        f"OK    {tmp_path / 'other.toml'}",
    ]

    path.write_text(persona_toml(name="Fixed"))
    bump_mtime(path)
    assert registry.reload_if_changed() is True
    assert registry.refused is None


def test_reload_refused_when_every_file_is_removed(tmp_path):
    path = write(tmp_path, "line", persona_toml())
    registry = PersonaRegistry(tmp_path, environ={})
    path.unlink()
    assert registry.reload_if_changed() is False
    assert registry.current.for_number("+14155550100").id == "line"


def test_registry_refuses_to_start_on_a_broken_directory():
    with pytest.raises(PersonaError):
        PersonaRegistry(BROKEN_PERSONAS, environ=ENV)


def test_webhook_events_and_masking(tmp_path):
    tail = (
        '[webhook]\nurl = "https://hooks.example.com/x"\nsecret_env = "LINE_SECRET"\n'
        'events = ["call.started", "call.ended"]\nmask_caller = true\n'
    )
    write(tmp_path, "hooked", persona_toml(tail=tail))
    hook = load_directory(tmp_path, environ={"LINE_SECRET": "s"}).personas["hooked"].webhook
    assert (hook.events, hook.mask_caller) == (("call.started", "call.ended"), True)


def test_webhook_events_default_to_the_transcript_only(tmp_path):
    tail = '[webhook]\nurl = "https://hooks.example.com/x"\nsecret_env = "LINE_SECRET"\n'
    write(tmp_path, "hooked", persona_toml(tail=tail))
    hook = load_directory(tmp_path, environ={"LINE_SECRET": "s"}).personas["hooked"].webhook
    assert (hook.events, hook.mask_caller) == (("call.ended",), False)


@pytest.mark.parametrize(
    ("events", "field", "reason"),
    [
        ("[]", "webhook.events", "list at least one of call.started"),
        ('["call.finished"]', "webhook.events[0]", "'call.finished' is not one of"),
        ('["call.ended", "call.ended"]', "webhook.events[1]", "call.ended is listed twice"),
    ],
)
def test_webhook_events_are_checked(tmp_path, events, field, reason):
    tail = (
        '[webhook]\nurl = "https://hooks.example.com/x"\nsecret_env = "LINE_SECRET"\n'
        f"events = {events}\n"
    )
    write(tmp_path, "hooked", persona_toml(tail=tail))
    [problem] = check_directory(tmp_path, environ={"LINE_SECRET": "s"}).problems
    assert problem.field == field
    assert reason in problem.reason


def test_reload_refuses_a_deeply_nested_file_and_keeps_serving(tmp_path):
    path = write(tmp_path, "line", persona_toml(name="Good"))
    registry = PersonaRegistry(tmp_path, environ={})
    good = registry.current
    path.write_text(persona_toml(name="Deep") + "\nv = " + "[" * 5000 + "1" + "]" * 5000 + "\n")
    bump_mtime(path)
    assert registry.reload_if_changed() is False  # refused like any bad file, no exception
    assert registry.current is good
    report = check_directory(tmp_path, environ={})
    assert [p.reason for p in report.problems] == [
        "is not valid TOML: arrays or inline tables nested too deeply"
    ]


# --- keypad actions: parsed once, at load, into types ------------------------------------

TRANSFER_DESK = """
[transfer.desk]
number = "+14155550111"
description = "the front desk"
announcement = "Putting you through."
"""


def test_keypad_actions_are_typed_at_load(tmp_path):
    keypad = '[keypad]\n"0" = "transfer:desk"\n"#" = "end_call"\n'
    write(tmp_path, "line", persona_toml(extra=TRANSFER_DESK, tail=keypad))
    persona = load_directory(tmp_path, environ={}).personas["line"]
    assert persona.keypad == {"0": KeypadTransfer(persona.transfer["desk"]), "#": KeypadHangUp()}


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("5", "transfer:nobody", "'transfer:nobody' is not end_call or one of: transfer:desk"),
        ("5", "hang_up", "'hang_up' is not end_call or one of: transfer:desk"),
        ("55", "end_call", "keys are single keypad digits"),
    ],
)
def test_bad_keypad_actions_are_refused_with_file_field_and_reason(tmp_path, key, value, reason):
    path = write(
        tmp_path, "line", persona_toml(extra=TRANSFER_DESK, tail=f'[keypad]\n"{key}" = "{value}"\n')
    )
    [problem] = check_directory(tmp_path, environ={}).problems
    assert (problem.file, problem.field) == (path, f"keypad.{key}")
    assert reason in problem.reason
