"""Persona ``[outbound]`` sections: parsed into OutboundSettings, every problem reported with
file, field and reason as ``personas check`` reports them (and refused as a set)."""

import textwrap
from pathlib import Path

import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.cli import main
from phoneagent.personas import check_directory, load_directory


def persona_file(directory: Path, outbound: str, *, numbers='["+14155550100"]') -> Path:
    path = directory / "reminders.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name = "Reminders"
            numbers = {numbers}
            language = "en-US"
            voice = "linjiajiejie"
            greeting = "Thanks for calling."
            instructions = "Remind people of appointments."
            default = true
            [end_call]
            goodbye = "Bye!"
            """
        )
        + "[outbound]\n"
        + textwrap.dedent(outbound)
    )
    return path


def test_the_example_persona_calls_out():
    dental = load_directory(EXAMPLE_PERSONAS, environ={}).personas["bright-smile-dental"]
    outbound = dental.outbound
    assert outbound is not None
    # As loaded: filled with the defaults; each call fills them with its own values.
    assert outbound.greeting.startswith("Hello there, this is Maya from Bright Smile Dental")
    assert outbound.voicemail_message.startswith("Hello there, this is Bright Smile Dental")
    assert set(dental.templates) >= {"outbound.greeting", "outbound.voicemail_message"}
    assert outbound.from_number == "+14155550100"  # its first number
    assert outbound.max_concurrent_calls == 3
    assert outbound.calling_hours == (9 * 60, 18 * 60)
    assert outbound.days == ("mon", "tue", "wed", "thu", "fri")
    assert outbound.timezone == "America/Los_Angeles"
    others = load_directory(EXAMPLE_PERSONAS, environ={}).personas
    assert others["trattoria-luca"].outbound is None  # no section: it only answers


def test_defaults_of_a_minimal_section(tmp_path):
    persona_file(tmp_path, 'greeting = "Hi, it is Reminders calling."\n')
    outbound = load_directory(tmp_path, environ={}).personas["reminders"].outbound
    assert outbound.greeting == "Hi, it is Reminders calling."
    assert (outbound.voicemail_message, outbound.calling_hours) == ("", None)
    assert outbound.timezone == "UTC"
    assert outbound.days == ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    assert outbound.max_concurrent_calls == 2


@pytest.mark.parametrize(
    ("outbound", "numbers", "expected"),
    [
        ("voicemail_message = 'x'\n", None, [("outbound.greeting", "is required")]),
        ("greeting = ''\n", None, [("outbound.greeting", "must not be empty")]),
        ("greeting = 'Hi'\nvoicemail_message = '  '\n", None,
         [("outbound.voicemail_message", "must not be empty (leave it out to hang up instead)")]),
        ("greeting = 'Hi'\nfrom = '415 555 0100'\n", None,
         [("outbound.from", "'415 555 0100' is not an E.164 number")]),
        ("greeting = 'Hi'\n", "[]",
         [("outbound.from", "is required when the persona lists no numbers")]),
        ("greeting = 'Hi'\nmax_concurrent_calls = 0\n", None,
         [("outbound.max_concurrent_calls", "must be between 1 and 1000, not 0")]),
        ("greeting = 'Hi'\ncalling_hours = '9-18'\n", None,
         [("outbound.calling_hours", "'9-18' is not a range like \"09:00-18:00\"")]),
        ("greeting = 'Hi'\ncalling_hours = '18:00-09:00'\n", None,
         [("outbound.calling_hours", "must start before it ends, within one day")]),
        ("greeting = 'Hi'\ncalling_hours = '09:00-24:30'\n", None,
         [("outbound.calling_hours", "within one day (00:00-24:00)")]),
        ("greeting = 'Hi'\ndays = ['mon', 'funday', 'mon']\n", None,
         [("outbound.days[1]", "'funday' is not one of mon, tue"),
          ("outbound.days[2]", "mon is listed twice")]),
        ("greeting = 'Hi'\ndays = []\n", None, [("outbound.days", "list at least one of mon")]),
        ("greeting = 'Hi'\ntimezone = 'Mars/Olympus'\n", None,
         [("outbound.timezone", "'Mars/Olympus' is not an IANA time zone")]),
        ("greeting = 'Hi'\ntimezone = '../../etc/passwd'\n", None,
         [("outbound.timezone", "is not an IANA time zone")]),
        ("greeting = 'Hi'\nhours = '9-5'\n", None, [("outbound.hours", "unknown key")]),
    ],
)  # fmt: skip
def test_each_problem_names_file_field_and_reason(tmp_path, outbound, numbers, expected):
    path = persona_file(tmp_path, outbound, numbers=numbers or '["+14155550100"]')
    report = check_directory(tmp_path, environ={})
    assert report.persona_set is None
    got = [(p.field, p.reason) for p in report.problems_for(path)]
    assert [field for field, _ in got] == [field for field, _ in expected]
    for (_, reason), (_, part) in zip(got, expected, strict=True):
        assert part in reason


def test_personas_check_prints_outbound_problems(tmp_path, capsys):
    path = persona_file(tmp_path, "greeting = 'Hi'\ntimezone = 'Nowhere/Town'\n")
    assert main(["personas", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"ERROR {path}: outbound.timezone: 'Nowhere/Town' is not an IANA time zone" in out


def test_time_zones_do_not_need_the_systems_database():
    """A slim or distroless image has no /usr/share/zoneinfo: the tzdata package answers."""
    import os
    import subprocess
    import sys

    script = (
        "from phoneagent.personas import load_directory; from pathlib import Path; import sys;"
        "p = load_directory(Path(sys.argv[1]), environ={}).personas;"
        "print(sorted({x.outbound.timezone for x in p.values() if x.outbound}))"
    )
    env = {**os.environ, "PYTHONTZPATH": "/nonexistent"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(EXAMPLE_PERSONAS)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "America/" in done.stdout
