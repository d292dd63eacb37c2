"""What phoneagent relies on from StepFun's documents about voices and tone, checked against
the verbatim excerpts in tests/fixtures/stepfun/ (sources in its README): the example personas
use official voices, the session has no tone or speed field (so they go into the
instructions), and `tone` is held to the length StepFun gives its voice directions."""

import json
import re
from pathlib import Path

import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.call.prompts import SPEAKING_RATE_DIRECTIONS, session_config
from phoneagent.personas import MAX_TONE_CHARS, SPEAKING_RATES, load_directory
from phoneagent.realtime.base import UpdateSession
from phoneagent.realtime.stepfun import StepFunDialect

FIXTURES = Path(__file__).parent / "fixtures" / "stepfun"


def table_rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|") and not line.startswith("| :") and not line.startswith("| --")
    ]


def official_voices() -> dict[str, str]:
    """Voice id → the models its row lists, from 官方音色清单."""
    text = (FIXTURES / "tts-official-voices.md").read_text(encoding="utf-8")
    listing = text.split("## 官方音色清单", 1)[1]
    return {row[1]: row[2] for row in table_rows(listing)[1:]}


def phone_voices() -> list[str]:
    """The voices StepFun recommends for customer service on the phone (客服场景): it says the
    first four are the ones for phone calls (前四个推荐音色非常适合电话场景)."""
    text = (FIXTURES / "tts-official-voices.md").read_text(encoding="utf-8")
    section = text.split("## 官方音色清单", 1)[0]
    assert "前四个推荐音色非常适合电话场景" in section
    return [row[2] for row in table_rows(section)[1:5]]


@pytest.fixture(scope="module")
def personas():
    return load_directory(EXAMPLE_PERSONAS, environ={}).personas


def test_every_example_persona_speaks_with_an_official_voice_of_the_2_5_models(personas):
    voices = official_voices()
    assert len(voices) > 30 and "linjiajiejie" in voices
    for persona in personas.values():
        assert persona.voice in voices, persona.id
        assert "stepaudio-2.5-tts" in voices[persona.voice], persona.id


def test_the_mandarin_persona_uses_a_voice_recommended_for_the_phone(personas):
    assert phone_voices() == ["shuangkuainansheng", "ganliannvsheng", "qinhenvsheng",
                              "huolinvsheng"]  # fmt: skip
    assert personas["renxin-clinic"].voice in phone_voices()


def test_the_session_has_no_tone_emotion_or_speed_field_only_instructions():
    text = (FIXTURES / "ref-session-update-fields.md").read_text(encoding="utf-8")
    fields = re.findall(r"^\* `(\w+)`", text, flags=re.MULTILINE)
    assert fields == [
        "modalities", "instructions", "voice", "turn_detection", "input_audio_format",
        "output_audio_format", "tools",
    ]  # fmt: skip
    # The instructions are documented to steer the audio: "speak fast", "put emotion in it".
    instructions = next(line for line in text.splitlines() if line.startswith("* `instructions`"))
    assert "音频行为" in instructions and "快声说" in instructions
    assert "在你的声音中注入情感" in instructions


def test_tone_and_rate_travel_in_the_documented_instructions(personas):
    """No field of its own for them: the session phoneagent sends has the documented fields
    (and tool_choice, seen accepted in a live probe, reference section 5)."""
    documented = {"modalities", "instructions", "voice", "turn_detection",
                  "input_audio_format", "output_audio_format", "tools"}  # fmt: skip
    persona = personas["renxin-clinic"]
    update = json.loads(StepFunDialect().encode(UpdateSession(session_config(persona))))
    assert set(update["session"]) - documented == {"tool_choice"}
    assert persona.tone in update["session"]["instructions"]
    assert "Speak slowly" in update["session"]["instructions"]
    assert update["session"]["voice"] == "qinhenvsheng"


def test_tone_is_held_to_the_length_of_a_stepfun_voice_direction():
    text = (FIXTURES / "tts-2.5-instruction.md").read_text(encoding="utf-8")
    limit = re.search(r'<Card title="instruction 上限">\s*(\d+) 字符', text)
    assert limit and int(limit.group(1)) == MAX_TONE_CHARS


def test_every_speaking_rate_has_its_one_sentence():
    assert set(SPEAKING_RATE_DIRECTIONS) == set(SPEAKING_RATES)
    assert SPEAKING_RATE_DIRECTIONS["normal"] == ""


def test_the_model_is_documented_to_hear_how_the_caller_sounds():
    text = (FIXTURES / "realtime-2.5-capabilities.md").read_text(encoding="utf-8")
    assert "副语言感知" in text and "读懂语气中的迟疑与轻笑" in text


def test_every_excerpt_names_its_page_and_is_listed_with_its_source():
    readme = (FIXTURES / "README.md").read_text(encoding="utf-8")
    excerpts = sorted(p for p in FIXTURES.glob("*.md") if p.name != "README.md")
    assert len(excerpts) == 4
    for path in excerpts:
        assert f"`{path.name}`" in readme
        assert path.read_text(encoding="utf-8").startswith("<!-- D-"), path.name
