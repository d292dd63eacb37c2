"""A call in Mandarin, end to end over real sockets, with real Mandarin speech (espeak-ng's
`cmn` voice) both ways: the example clinic persona greets, answers, is interrupted, hands an
upset caller to a person with an announcement in Chinese, and its webhook gets the transcript
in Chinese: UTF-8 bytes as written, no \\u escapes, signed over those bytes, the caller masked.
"""

import dataclasses
import json
import shutil
import xml.etree.ElementTree as ET

import aiohttp
import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.audio import pcm16_to_ulaw
from phoneagent.call.text_units import unit_count
from phoneagent.delivery.signing import generate_secret, verify
from phoneagent.testing.fake_model import CallTool, FakeRealtimeServer, queued_transcripts
from phoneagent.testing.speech import espeak_voice, synthesize, synthesizer_name
from phoneagent.testing.stack import LocalStack
from phoneagent.testing.webhook_sink import WebhookSink

CLINIC = "+14155550160"
NURSE_DESK = "+14155550161"
PATIENT_RELATIONS = "+14155550162"
CALLER = "+8613812345678"  # a Shanghai mobile: masked to its last four digits
SECRET_ENV = "RENXIN_WEBHOOK_SECRET"
QUESTION = "请问你们星期六开门吗？"
ANSWER = "星期六我们也开门，早上八点半到下午五点半。"
LONG_ANSWER = (
    "我们诊所星期一到星期六早上八点半到下午五点半开门，星期日和法定节假日休息。"
    "王敏医生看家庭医学和儿科，陈杰医生看糖尿病和高血压。"
    "我们接受上海医保卡和大部分商业保险，看病请带好身份证。"
)
CALLER_SPEED = 4.0  # the caller's call clock runs four times faster than real time
MODEL_SPEED = 6.0  # the model generates 1.5× faster than the caller's line plays
FRAME_MS = 20
# One frame, plus a busy machine's scheduling delay (15 ms of wall time) on the fast call clock.
TRUNCATE_TOLERANCE_MS = FRAME_MS + 15 * CALLER_SPEED
# Short of what was heard, by more: the server cannot know the transit of the last mark's echo
# nor of its `clear`, so it errs towards "heard less" (Playback.heard_now). On a loaded 2-core
# machine the two took 24 ms of wall time (96 ms of call time, once in 3 runs): 20 ms each.
# That is near a mark interval (200 ms), so a heard position that stopped at the last echo would
# often pass here: test_call.py's test_heard_position_runs_on_from_the_last_echo catches that,
# with exact clocks.
TRUNCATE_SHORT_TOLERANCE_MS = FRAME_MS + 2 * 20 * CALLER_SPEED
# "Within a few characters": the cut is proportional to the audio heard, and espeak-ng (like a
# person) does not give every character the same time (pauses at commas, longer syllables).
CUT_TOLERANCE_CHARS = 3

pytestmark = pytest.mark.skipif(
    synthesizer_name() != "espeak-ng", reason="needs espeak-ng for Mandarin speech"
)


def speech(text: str) -> bytes:
    """What the caller says, as Twilio would stream it: Mandarin speech, 8 kHz μ-law."""
    assert espeak_voice(text) == "cmn"
    return pcm16_to_ulaw(synthesize(text, sample_rate=8000))


def spoken_ms(text: str) -> float:
    """How long the fake model's voice takes to say ``text`` (pcm16 at 24 kHz)."""
    return len(synthesize(text)) / 48


@pytest.fixture
def secret(monkeypatch):
    value = generate_secret()
    monkeypatch.setenv(SECRET_ENV, value)
    return value


@pytest.fixture
async def sink():
    async with WebhookSink() as sink:
        yield sink


@pytest.fixture
def personas(tmp_path, sink, secret):
    """The example personas, the Mandarin clinic sending every event, the caller masked."""
    directory = tmp_path / "personas"
    shutil.copytree(EXAMPLE_PERSONAS, directory)
    clinic = directory / "renxin-clinic.toml"
    clinic.write_text(
        clinic.read_text(encoding="utf-8")
        + f'\n[webhook]\nurl = "{sink.url("/hooks")}"\nsecret_env = "{SECRET_ENV}"\n'
        'events = ["call.started", "call.transferred", "call.ended"]\nmask_caller = true\n',
        encoding="utf-8",
    )
    return directory


async def start_call(stack):
    caller = stack.caller(to=CLINIC, from_=CALLER, speed=CALLER_SPEED)
    await caller.__aenter__()
    answer = await caller.dial()
    assert answer.ok, answer.problems
    assert answer.parameters["persona"] == "renxin-clinic"
    await caller.connect()
    caller.start_background_silence()
    # The greeting, heard out (the first Mandarin synthesis may take a moment: wait for it).
    await caller.wait_until(lambda: caller.heard_ms() > 0, 30, "the greeting")
    # The whole greeting generated, then heard out: 400 ms of quiet alone is 100 ms of wall
    # time, which a busy machine's pause in the model's deltas can exceed mid-greeting (the
    # question then barges into the greeting: two barge-ins, two truncations).
    session = stack.model.sessions[0]
    await stack.model.wait_for(lambda: session.sent_events("response.done"), 30)
    await caller.wait_until_quiet(400, timeout=30)
    return caller


def events_of(sink, event_type: str):
    return [r for r in sink.received if r.json and r.json["type"] == event_type]


async def test_greeting_answer_and_a_chinese_transcript_to_the_webhook(personas, sink, secret):
    model = FakeRealtimeServer(
        speed=None, script=[ANSWER], transcriber=queued_transcripts([QUESTION])
    )
    async with LocalStack(personas, model=model, call_speed=CALLER_SPEED) as stack:
        persona = stack.state.personas.current.personas["renxin-clinic"]
        caller = await start_call(stack)
        greeting_ms = caller.heard_ms()
        await caller.play(speech(QUESTION))
        session = model.sessions[0]
        await model.wait_for(lambda: len(session.sent_events("response.done")) >= 2, 30)
        await caller.wait_until_quiet(400, timeout=30)
        answer_ms = caller.heard_ms() - greeting_ms
        await caller.hangup()
        await caller.__aexit__(None, None, None)
        await sink.wait_for(2, timeout=15)
        operator = aiohttp.encode_basic_auth(
            stack.settings.twilio_account_sid, stack.settings.twilio_auth_token
        )
        async with (
            aiohttp.ClientSession(headers={"Authorization": operator}) as http,
            http.get(f"{stack.base_url}/calls/{caller.call_sid}") as response,
        ):
            record_body = await response.read()

    # The caller heard the whole greeting and the whole answer, in Mandarin.
    assert caller.violations == []
    assert greeting_ms == pytest.approx(spoken_ms(persona.greeting), abs=60)
    assert answer_ms == pytest.approx(spoken_ms(ANSWER), abs=60)
    # The model was configured for Mandarin, the persona's voice and tone, in English words.
    config = session.config
    assert config["voice"] == "qinhenvsheng"
    assert config["instructions"].startswith("You are Xiao Lin (小林)")
    assert "Always speak Mandarin Chinese." in config["instructions"]
    assert "亲切、耐心、沉稳" in config["instructions"]

    [ended] = events_of(sink, "call.ended")
    body = ended.body
    # UTF-8 as written: no \u escapes for the receiver to undo, and the length is the bytes'.
    assert b"\\u" not in body
    assert persona.greeting.encode("utf-8") in body and QUESTION.encode("utf-8") in body
    assert int(ended.headers["Content-Length"]) == len(body) > len(body.decode("utf-8"))
    assert ended.headers["Content-Type"].startswith("application/json")
    verify(body, ended.headers, secret)  # signed over exactly these bytes
    data = json.loads(body.decode("utf-8"))["data"]
    assert data["from"] == "+*********5678" and data["from_masked"] is True
    assert [(t["role"], t["text"], t["interrupted"]) for t in data["transcript"]] == [
        ("agent", persona.greeting, False),
        ("caller", QUESTION, False),
        ("agent", ANSWER, False),
    ]
    # The call record, as the operator reads it, is UTF-8 as written too.
    assert b"\\u" not in record_body
    assert ANSWER.encode("utf-8") in record_body


# Early, in the middle, and after the model finished generating (Twilio still playing).
@pytest.mark.parametrize("point_ms", [3000, 9000, 24000])
async def test_a_barge_in_keeps_the_characters_the_caller_heard(personas, point_ms):
    model = FakeRealtimeServer(speed=MODEL_SPEED, script=[LONG_ANSWER, ANSWER])
    async with LocalStack(personas, model=model, call_speed=CALLER_SPEED) as stack:
        caller = await start_call(stack)
        answer_started = caller.heard_ms()
        await caller.play(speech(QUESTION))
        session = model.sessions[0]
        await model.wait_for(
            lambda: len(session.sent_events("response.output_item.added")) >= 2, 30
        )
        await caller.wait_until_heard_ms(answer_started + point_ms, timeout=30)
        generated = len(session.sent_events("response.done")) >= 2
        await caller.play(speech("等一下，我想问别的。"))
        await caller.wait_for_event("clear", timeout=30)
        clear = caller.clears[0]
        await model.wait_for(lambda: session.truncations, 10)
        await model.wait_for(lambda: len(session.sent_events("response.done")) >= 3, 30)
        await caller.wait_until_quiet(300, timeout=30)
        await caller.hangup()
        await caller.__aexit__(None, None, None)
        record = stack.state.calls.get(caller.call_sid)

    assert generated == (point_ms > spoken_ms(LONG_ANSWER) / (MODEL_SPEED / CALLER_SPEED))
    heard_of_answer = sum(
        max(0.0, min(c.end_ms, clear.at_ms) - c.start_ms) for c in caller.heard
    ) - answer_started  # fmt: skip
    [truncate] = session.truncations
    short_by = heard_of_answer - truncate["audio_end_ms"]
    assert -TRUNCATE_TOLERANCE_MS <= short_by <= TRUNCATE_SHORT_TOLERANCE_MS
    [cut] = [t for t in record.transcript if t["interrupted"]]
    assert LONG_ANSWER.startswith(cut["text"]) and cut["text"]
    # What the caller really heard: the longest start of the answer that takes no longer to
    # say than the audio heard (each prefix spoken by the same voice).
    heard = _longest_prefix_within(LONG_ANSWER, truncate["audio_end_ms"])
    kept, truth = unit_count(cut["text"]), unit_count(heard)
    print(
        f"\nbarge-in at {point_ms} ms: heard {truncate['audio_end_ms']} ms of "
        f"{spoken_ms(LONG_ANSWER):.0f} ms; kept {kept} of {unit_count(LONG_ANSWER)} characters "
        f"({cut['text']!r}); heard {truth} ({heard!r})"
    )
    assert kept > 0
    assert abs(kept - truth) <= CUT_TOLERANCE_CHARS
    assert record.transcript[-1]["text"] == ANSWER  # the agent answered the interruption


def _longest_prefix_within(text: str, ms: float) -> str:
    low, high = 0, len(text)  # binary search: prefixes only get longer to say
    while low < high:
        middle = (low + high + 1) // 2
        if spoken_ms(text[:middle]) <= ms:
            low = middle
        else:
            high = middle - 1
    return text[:low]


async def test_an_upset_caller_is_transferred_with_a_chinese_announcement(personas, sink):
    reason = "来电者听起来很焦虑"  # the model's words for what it heard
    upset = CallTool("transfer_call", {"target": "patient_relations", "reason": reason})
    model = FakeRealtimeServer(speed=8.0, script=[upset])
    async with LocalStack(personas, model=model, call_speed=CALLER_SPEED) as stack:
        stack.state.handoffs.rest.timeout = 1.0
        persona = stack.state.personas.current.personas["renxin-clinic"]
        caller = await start_call(stack)
        seen = []
        stack.twilio_api.on_update(
            caller.call_sid,
            lambda update: seen.append(
                (caller.heard_ms(), caller.playback.buffered_ms(caller.now_ms()))
            ),
        )
        heard_before = caller.heard_ms()
        await caller.play(speech("你们怎么回事！我已经等了一个小时了！"))
        [update] = await stack.twilio_api.wait_for_updates(1, timeout=30)
        await caller.wait_closed(timeout=10)
        await caller.__aexit__(None, None, None)
        await sink.wait_for(3, timeout=15)
        record = stack.state.calls.get(caller.call_sid)

    announcement = persona.transfer["patient_relations"].announcement
    # The announcement, in Chinese, was heard out before Twilio was asked to dial.
    heard_ms, buffered_ms = seen[0]
    assert buffered_ms == 0
    assert heard_ms - heard_before == pytest.approx(spoken_ms(announcement), abs=40)
    assert ET.fromstring(update.params["Twiml"]).find("Dial").text == PATIENT_RELATIONS
    assert record.end_reason == "transferred"
    assert record.transcript[-1]["text"] == announcement
    assert record.transfer == {
        "target": "patient_relations", "number": PATIENT_RELATIONS, "reason": reason
    }  # fmt: skip
    # The model was told why it may transfer: in its instructions and the tool's description.
    config = model.sessions[0].config
    assert 'call transfer_call with target "patient_relations"' in config["instructions"]
    [tool] = [t for t in config["tools"] if t["function"]["name"] == "transfer_call"]
    assert "to patient_relations, when the caller sounds angry" in tool["function"]["description"]
    # The business learns where the caller went and why, in Chinese.
    [transferred] = events_of(sink, "call.transferred")
    assert reason.encode("utf-8") in transferred.body and b"\\u" not in transferred.body
    assert transferred.json["data"]["reason"] == reason
    assert transferred.json["data"]["outcome"] == "accepted"
    [ended] = events_of(sink, "call.ended")
    assert ended.json["data"]["transfer"] == record.transfer
    assert ended.json["data"]["transcript"][-1]["text"] == announcement


async def test_a_busy_line_is_told_so_in_mandarin_by_a_mandarin_voice(personas):
    async with LocalStack(personas, model=FakeRealtimeServer(speed=None)) as stack:
        stack.state.settings = dataclasses.replace(stack.settings, max_calls=0)
        persona = stack.state.personas.current.personas["renxin-clinic"]
        async with stack.caller(to=CLINIC, from_=CALLER, speed=0) as caller:
            answer = await caller.dial()
    assert answer.ok and answer.stream_url is None
    assert answer.says == [persona.busy_message]
    assert answer.say_attributes == [{"language": "cmn-CN", "voice": "Polly.Zhiyu-Neural"}]
    assert answer.dials == [NURSE_DESK]  # then the persona's fallback target
    assert persona.busy_message.encode("utf-8") in answer.body.encode("utf-8")
    assert "&#" not in answer.body  # the Chinese is written as is, not as character references


def test_the_test_speech_is_mandarin():
    """Chinese text is spoken by espeak-ng's Mandarin voice, at a syllable per character (an
    English voice would spell out each character's code point name, far longer)."""
    assert espeak_voice(QUESTION) == "cmn" and espeak_voice("Hello") == "en-us"
    seconds = spoken_ms(QUESTION) / 1000
    assert 1.0 < seconds < 0.5 * unit_count(QUESTION) + 1.5
