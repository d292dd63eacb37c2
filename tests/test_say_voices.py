"""Twilio's <Say> (busy_message, apology): the table of voices by language, the voice each
persona gets, and `personas check` refusing a voice that does not speak the persona's language."""

import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

from phoneagent.personas import check_directory, load_directory
from phoneagent.twilio.wire.say_voices import say_voices
from phoneagent.twilio.wire.twiml import apology_twiml, busy_twiml, say_then_hand_on_twiml

TABLE = say_voices()
DATA_FILE = PROJECT_ROOT / "phoneagent" / "twilio" / "wire" / "say_voices.toml"


def persona_file(directory: Path, language: str, extra: str = "", stem: str = "line") -> Path:
    """A valid persona in ``language`` whose <Say> texts are given (unless ``extra`` says)."""
    says = "" if "busy_message" in extra else 'busy_message = "Busy."\napology = "Sorry."\n'
    path = directory / f"{stem}.toml"
    path.write_text(
        textwrap.dedent(f"""\
            name = "Line"
            numbers = ["+14155550100"]
            language = "{language}"
            voice = "linjiajiejie"
            greeting = "Hello"
            instructions = "Answer the phone."
            """)
        + says
        + extra
        + '\n[end_call]\ngoodbye = "Bye"\n'
    )
    return path


def problems(directory: Path) -> dict[str, str]:
    return {p.field: p.reason for p in check_directory(directory, environ={}).problems}


# --- the table ---------------------------------------------------------------------------------


def test_the_table_names_its_sources():
    header = DATA_FILE.read_text().split("\n\n")[0]
    assert "twilio-node" in header and "VoiceResponse.ts" in header
    assert "https://www.twilio.com/docs/voice/twiml/say" in header
    assert "https://docs.aws.amazon.com/polly/latest/dg/available-voices.html" in header


def test_every_language_has_its_default_among_its_voices():
    assert TABLE.voices, "the table is empty"
    for language, voices in TABLE.voices.items():
        assert TABLE.defaults[language] in voices, language
        assert len(set(voices)) == len(voices), language


def test_a_google_voice_is_listed_under_the_language_its_id_names():
    for language, voices in TABLE.voices.items():
        for voice in voices:
            if voice.startswith("Google."):
                assert voice.lower().startswith(f"google.{language.lower()}-"), voice


def test_aliases_lead_to_languages_of_the_table():
    assert set(TABLE.aliases.values()) <= set(TABLE.voices)


def test_chinese_and_english_defaults():
    assert TABLE.defaults["cmn-CN"] == "Polly.Zhiyu-Neural"
    assert {"Polly.Zhiyu", "Google.cmn-CN-Standard-A"} <= set(TABLE.voices["cmn-CN"])
    assert TABLE.defaults["en-US"] == "Polly.Joanna-Neural"
    assert TABLE.languages_of("Polly.Kajal-Neural") == ("en-IN", "hi-IN")  # bilingual
    assert TABLE.languages_of("alice") == ()  # Twilio's older voices are left out


@pytest.mark.parametrize(
    ("tag", "say"),
    [
        ("zh-CN", "cmn-CN"),
        ("zh", "cmn-CN"),
        ("zh-Hans-CN", "cmn-CN"),
        ("cmn-CN", "cmn-CN"),
        ("zh-TW", "cmn-TW"),
        ("zh-Hant-TW", "cmn-TW"),
        ("zh-HK", "yue-HK"),
        ("en-US", "en-US"),
        ("EN-us", "en-US"),
        ("en-CA", "en-US"),  # <Say> has no Canadian English voice: the language's own
        ("en-GB", "en-GB"),
        ("fr-CH", "fr-FR"),
        ("eu-ES", None),
        ("tlh", None),
    ],
)
def test_a_persona_language_tag_becomes_a_say_language(tag, say):
    assert TABLE.language_for(tag) == say


# --- personas ----------------------------------------------------------------------------------


def test_a_chinese_persona_gets_a_mandarin_voice_by_default(tmp_path):
    persona_file(tmp_path, "zh-CN")
    persona = load_directory(tmp_path, environ={}).personas["line"]
    assert (persona.say_language, persona.say_voice) == ("cmn-CN", "Polly.Zhiyu-Neural")


@pytest.mark.parametrize(
    ("language", "voice", "say_language"),
    [
        ("zh-CN", "Google.cmn-CN-Wavenet-B", "cmn-CN"),
        ("zh-TW", "Google.cmn-TW-Standard-A", "cmn-TW"),
        ("en-GB", "Polly.Amy", "en-GB"),
        ("hi-IN", "Polly.Kajal-Neural", "hi-IN"),  # a bilingual voice, in either language
        ("en-IN", "Polly.Kajal-Neural", "en-IN"),
    ],
)
def test_a_say_voice_that_speaks_the_language_is_used(tmp_path, language, voice, say_language):
    persona_file(tmp_path, language, f'say_voice = "{voice}"\n')
    persona = load_directory(tmp_path, environ={}).personas["line"]
    assert (persona.say_language, persona.say_voice) == (say_language, voice)


def test_a_voice_of_another_language_is_refused(tmp_path):
    persona_file(tmp_path, "zh-CN", 'say_voice = "Polly.Joanna"\n')
    reason = problems(tmp_path)["say_voice"]
    assert reason.startswith("Polly.Joanna speaks en-US, not the persona's language zh-CN")
    assert "Polly.Zhiyu" in reason and "say_voices.toml" in reason


def test_an_unknown_voice_is_refused(tmp_path):
    persona_file(tmp_path, "zh-CN", 'say_voice = "Polly.Zhiyu-Nueral"\n')
    reason = problems(tmp_path)["say_voice"]
    assert reason.startswith("'Polly.Zhiyu-Nueral' is not a voice Twilio's <Say> takes")
    assert "for zh-CN (cmn-CN)" in reason


def test_a_language_say_cannot_speak_is_refused(tmp_path):
    persona_file(tmp_path, "eu-ES")
    assert problems(tmp_path) == {
        "language": "Twilio's <Say> (which speaks busy_message and apology) has no voice for "
        "'eu-ES': use a language it speaks, such as en-US or zh-CN "
        "(the list: phoneagent/twilio/wire/say_voices.toml)"
    }


def test_a_persona_not_in_english_writes_its_own_busy_message_and_apology(tmp_path):
    persona_file(tmp_path, "zh-CN", 'busy_message = "抱歉，线路繁忙。"\n')
    assert problems(tmp_path) == {
        "apology": "is required when the language is not English (zh-CN): the default is "
        "English text, and Twilio would read it with a zh-CN voice"
    }
    persona_file(tmp_path, "en-GB", 'busy_message = "Sorry, all lines are busy."\n')
    assert problems(tmp_path) == {}  # English: the default apology is fine


def test_an_empty_busy_message_is_refused(tmp_path):
    persona_file(tmp_path, "en-US", 'busy_message = "  "\n')
    assert problems(tmp_path) == {"busy_message": "must not be empty"}


def test_personas_check_names_file_field_and_reason(tmp_path):
    path = persona_file(tmp_path, "zh-CN", 'say_voice = "Google.en-US-Standard-C"\n')
    result = subprocess.run(
        [sys.executable, "-m", "phoneagent.cli", "personas", "check", str(tmp_path)],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    [line] = result.stdout.splitlines()
    assert re.fullmatch(
        rf"ERROR {re.escape(str(path))}: say_voice: Google\.en-US-Standard-C speaks en-US, not "
        r"the persona's language zh-CN \(<Say> language cmn-CN\): Twilio would fail the <Say>; "
        r"choose one of .*",
        line,
    ), line


# --- the TwiML --------------------------------------------------------------------------------


def test_busy_and_apology_are_said_in_the_persona_language_with_its_voice(tmp_path):
    persona_file(
        tmp_path,
        "zh-CN",
        'busy_message = "抱歉，线路繁忙。"\napology = "抱歉，系统故障。"\n'
        'fallback_target = "desk"\n[transfer.desk]\nnumber = "+14155550111"\n'
        'description = "前台"\nannouncement = "请稍等。"\n',
    )
    persona = load_directory(tmp_path, environ={}).personas["line"]
    for text, twiml in [
        ("抱歉，线路繁忙。", busy_twiml(persona, "+14155550100")),
        ("抱歉，系统故障。", say_then_hand_on_twiml(persona.apology, persona, "+14155550100")),
    ]:
        say = ET.fromstring(twiml).find("Say")
        assert say.text == text
        assert say.attrib == {"language": "cmn-CN", "voice": "Polly.Zhiyu-Neural"}


def test_the_apology_of_a_number_nobody_answers_is_english():
    say = ET.fromstring(apology_twiml("Sorry.")).find("Say")
    assert say.attrib == {"language": "en-US", "voice": "Polly.Joanna-Neural"}
