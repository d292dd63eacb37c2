"""The fake StepFun realtime server, driven by a plain websockets client on loopback.

Each test states a behaviour of the real service (reference/stepfun-realtime.md) and checks the
fake reproduces it. No test asserts a wall-clock duration: pacing is checked by amounts of audio.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from phoneagent.testing import speech
from phoneagent.testing.fake_model import (
    CallTool,
    EnergyVad,
    FakeRealtimeServer,
    ResponseContext,
    Say,
    ScriptedResponder,
    VadEvent,
    describe_audio,
    queued_transcripts,
)
from phoneagent.testing.speech import synthesize, synthesizer_name, synthetic_speech

MODEL = "stepaudio-2.5-realtime"
BYTES_PER_MS = 48
FRAME = 960  # 20 ms of pcm16 at 24 kHz
VAD = {"type": "server_vad", "silence_duration_ms": 500, "energy_awakeness_threshold": 1000}
LONG_REPLY = (
    "Thank you for calling. Our opening hours are nine to five on weekdays, and ten to two on "
    "Saturdays. Is there anything else I can help you with today?"
)


class Client:
    """A minimal realtime client: JSON events over a websockets connection."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, type_: str, **fields: Any) -> None:
        await self.ws.send(json.dumps({"type": type_, **fields}))

    async def recv(self) -> dict[str, Any]:
        async with asyncio.timeout(10):
            return json.loads(await self.ws.recv())

    async def until(self, type_: str) -> list[dict[str, Any]]:
        """Events received up to and including the next one of *type_*."""
        events = [await self.recv()]
        while events[-1]["type"] != type_:
            events.append(await self.recv())
        return events

    async def append(self, pcm: bytes, chunk: int = FRAME) -> None:
        for start in range(0, len(pcm), chunk):
            audio = base64.b64encode(pcm[start : start + chunk]).decode()
            await self.send("input_audio_buffer.append", audio=audio)


@asynccontextmanager
async def client(
    fake: FakeRealtimeServer, model: str = MODEL, key: str = "test-key", **kwargs: Any
) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {key}"}
    async with connect(f"{fake.url}?model={model}", additional_headers=headers, **kwargs) as ws:
        yield Client(ws)


@asynccontextmanager
async def session(fake: FakeRealtimeServer, **update: Any) -> AsyncIterator[Client]:
    """A connected client past session.created (and session.updated if *update* is given)."""
    async with client(fake) as c:
        assert (await c.recv())["type"] == "session.created"
        if update:
            await c.send("session.update", session=update)
            assert (await c.recv())["type"] == "session.updated"
        yield c


@pytest.fixture
async def fake() -> AsyncIterator[FakeRealtimeServer]:
    async with FakeRealtimeServer(speed=None) as server:
        yield server


def types(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


def audio_of(events: list[dict[str, Any]]) -> bytes:
    return b"".join(
        base64.b64decode(e["delta"]) for e in events if e["type"] == "response.audio.delta"
    )


def tone(ms: int, amplitude: float = 8000.0) -> bytes:
    t = np.arange(ms * 24) / 24000
    return (amplitude * np.sin(2 * np.pi * 300 * t)).astype("<i2").tobytes()


def silence(ms: int) -> bytes:
    return bytes(ms * BYTES_PER_MS)


async def expect_error(c: Client, type_: str, message: str, **fields: Any) -> dict[str, Any]:
    await c.ws.send(json.dumps({"type": type_, "event_id": "evt_client_1", **fields}))
    error = (await c.until("error"))[-1]
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(message)
    assert error["error"]["event_id"] == "evt_client_1"
    return error["error"]


# -- handshake ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["stepaudio-2.5-realtime", "step-2.5-realtime"])
async def test_session_created_first_with_documented_defaults(fake, model):
    async with client(fake, model=model) as c:
        event = await c.recv()
        assert c.ws.response.headers["X-Request-Id"]
    assert event["type"] == "session.created" and event["event_id"]
    created = event["session"]
    assert created["id"].startswith("sess_") and created["object"] == "realtime.session"
    assert created["model"] == model
    assert created["input_audio_format"] == created["output_audio_format"] == "pcm16"
    assert created["instructions"] == ""
    assert created["turn_detection"] is None  # server VAD is off by default
    assert created["max_response_output_tokens"] == "4096"
    assert fake.sessions[0].id == created["id"]


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/v1/realtime?model=gpt-4o-realtime", {"Authorization": "Bearer test-key"}, 400),
        ("/v1/realtime", {"Authorization": "Bearer test-key"}, 400),
        ("/v1/realtime?model=" + MODEL, {"Authorization": "Bearer wrong"}, 401),
        ("/v1/realtime?model=" + MODEL, {}, 401),
        ("/v1/realtime?model=" + MODEL, {"Authorization": "test-key"}, 401),
        ("/v2/realtime?model=" + MODEL, {"Authorization": "Bearer test-key"}, 404),
    ],
)
async def test_handshake_refusals(fake, path, headers, status):
    url = f"ws://127.0.0.1:{fake.port}{path}"
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, additional_headers=headers)
    response = refused.value.response
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    assert json.loads(response.body)["error"]["message"]
    assert fake.sessions_opened == 0
    assert [h.status for h in fake.handshakes] == [status]


async def test_api_key_none_accepts_any_key():
    async with FakeRealtimeServer(api_key=None) as fake, client(fake, key="anything") as c:
        assert (await c.recv())["type"] == "session.created"


@pytest.mark.parametrize("status", [402, 429, 500])
async def test_forced_handshake_failures_then_success(fake, status):
    fake.fail_next_handshakes(2, status=status)
    for _ in range(2):
        with pytest.raises(InvalidStatus) as refused:
            async with client(fake):
                pass
        assert refused.value.response.status_code == status
    async with client(fake) as c:
        assert (await c.recv())["type"] == "session.created"
    assert [h.status for h in fake.handshakes] == [status, status, 101]


async def test_handshake_delay_holds_the_upgrade(fake):
    fake.handshake_delay = 0.5
    with pytest.raises(TimeoutError):
        async with client(fake, open_timeout=0.05):
            pass


async def test_oversized_message_closes_with_1009():
    async with FakeRealtimeServer(max_message_bytes=2000) as fake, session(fake) as c:
        await c.append(silence(100), chunk=len(silence(100)))
        with pytest.raises(ConnectionClosedError) as closed:
            await c.recv()
    assert closed.value.rcvd.code == 1009


# -- session.update ----------------------------------------------------------------------------

TOOL = {
    "type": "function",
    "function": {
        "name": "transfer_call",
        "description": "Transfer the caller to a human.",
        "parameters": {"type": "object", "properties": {"reason": {"type": "string"}}},
    },
}


async def test_session_update_merges_and_is_kept_for_inspection(fake):
    update = {"instructions": "You are Ada.", "tools": [TOOL], "tool_choice": "auto", "voice": "v2"}
    async with session(fake, turn_detection={"type": "server_vad"}) as c:
        await c.send("session.update", session=update)
        updated = (await c.recv())["session"]
    assert updated["instructions"] == "You are Ada." and updated["voice"] == "v2"
    assert updated["tools"] == [TOOL]
    # The earlier update is kept, with the documented VAD defaults filled in.
    assert updated["turn_detection"] == {
        "type": "server_vad",
        "prefix_padding_ms": 500,
        "silence_duration_ms": 100,
        "energy_awakeness_threshold": 2500,
    }
    assert fake.sessions[0].instructions == "You are Ada."
    assert fake.sessions[0].tools == [TOOL]


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"input_audio_format": "g711_ulaw"}, "input_audio_format must be pcm16"),
        ({"output_audio_format": "pcm24"}, "output_audio_format must be pcm16"),
        (
            {"tools": [{"type": "function", "name": "transfer_call", "parameters": {}}]},
            "invalid event format",
        ),
        ({"tool_choice": {"type": "function", "name": "x"}}, "invalid event format"),
        ({"turn_detection": {"type": "semantic_vad"}}, "turn_detection.type"),
        (
            {"turn_detection": {"type": "server_vad", "energy_awakeness_threshold": 6000}},
            "turn_detection.energy_awakeness_threshold",
        ),
        ({"modalities": ["audio"]}, "modalities"),
    ],
)
async def test_session_update_refusals_leave_the_session_unchanged(fake, patch, message):
    async with session(fake) as c:
        await expect_error(c, "session.update", message, session={"instructions": "x", **patch})
        assert fake.sessions[0].instructions == ""
        await c.send("session.update", session={"instructions": "still open"})
        assert (await c.recv())["session"]["instructions"] == "still open"


async def test_voice_is_locked_once_audio_was_produced(fake):
    async with session(fake) as c:
        await c.send("session.update", session={"voice": "wenrounansheng"})
        assert (await c.recv())["type"] == "session.updated"
        await c.send("response.create")
        await c.until("response.done")
        await expect_error(c, "session.update", "voice cannot be changed", session={"voice": "x"})
        # Re-sending the same voice is not a change.
        await c.send("session.update", session={"voice": "wenrounansheng"})
        assert (await c.recv())["type"] == "session.updated"


async def test_voices_option_refuses_other_voices_in_the_documented_error_shape():
    fake = FakeRealtimeServer(speed=None, voices={"linjiajiejie"})
    async with fake, session(fake) as c:
        refused = {"voice": "nosuchvoice"}
        error = await expect_error(
            c, "session.update", "voice not found: nosuchvoice", session=refused
        )
        assert error["code"] == "invalid_param"
        assert fake.sessions[0].config["voice"] == "linjiajiejie"  # refused as a whole
        await c.send("session.update", session={"voice": "linjiajiejie"})
        assert (await c.recv())["type"] == "session.updated"


# -- documented errors --------------------------------------------------------------------------


async def test_documented_errors_keep_the_session_open():
    async with FakeRealtimeServer(speed=1.0) as fake, session(fake) as c:
        await expect_error(c, "response.cancel", "no ongoing response to cancel")
        await expect_error(c, "input_audio_buffer.commit", "input audio buffer is empty")
        error = await expect_error(c, "response.magic", "unknown event type")
        assert error["code"] == "invalid_value"
        await c.send("response.create", response={"instructions": LONG_REPLY})
        await expect_error(c, "response.create", "ongoing response already exists")
        await c.send("response.cancel")
        await c.until("response.done")
        await c.send("session.update", session={"turn_detection": VAD})
        await c.until("session.updated")
        await c.append(silence(100))
        await expect_error(c, "input_audio_buffer.commit", "commit when server vad")
        await expect_error(c, "conversation.item.delete", "item item_nope", item_id="item_nope")


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '{"event_id": "e1"}', '{"type": 7}'])
async def test_malformed_events_are_invalid_event_format(fake, raw):
    async with session(fake) as c:
        await c.ws.send(raw)
        error = await c.recv()
        assert error["type"] == "error"
        assert error["error"]["message"].startswith("invalid event format")
        assert error["error"]["event_id"] == ("e1" if "e1" in raw else None)
    parsed = json.loads(raw) if raw.startswith("{") else {"_unparsed": raw}
    assert fake.sessions[0].received == [parsed]


# -- server VAD ---------------------------------------------------------------------------------


async def test_vad_turn_from_real_speech():
    reply = "Sure, a table for two at seven."
    contexts: list[ResponseContext] = []

    def responder(context: ResponseContext) -> str:
        contexts.append(context)
        return reply

    fake = FakeRealtimeServer(
        speed=None, responder=responder, transcriber=queued_transcripts(["A table for two."])
    )
    caller = synthesize("Hello, I would like to book a table for two, please.")
    async with fake, session(fake, turn_detection=VAD, instructions="Be brief.") as c:
        await c.append(silence(1000) + caller + silence(700))
        events = await c.until("response.done")
        if "conversation.item.input_audio_transcription.completed" not in types(events):
            events += await c.until("conversation.item.input_audio_transcription.completed")

    order = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.created",
        "response.created",
        "response.output_item.added",
        "conversation.item.created",
        "response.content_part.added",
        "response.audio.done",
        "response.audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.done",
    ]
    seen = [t for t in types(events) if t in order]
    assert seen == order
    by_type = {e["type"]: e for e in events}
    started = by_type["input_audio_buffer.speech_started"]
    stopped = by_type["input_audio_buffer.speech_stopped"]
    # Speech begins at 1000 ms (espeak adds a little lead-in); 500 ms of prefix padding.
    assert 450 <= started["audio_start_ms"] <= 700
    speech_end = 1000 + len(caller) // BYTES_PER_MS
    assert speech_end - 500 <= stopped["audio_end_ms"] <= speech_end + 600
    item_id = started["item_id"]
    assert stopped["item_id"] == by_type["input_audio_buffer.committed"]["item_id"] == item_id
    user_item = next(e for e in events if e["type"] == "conversation.item.created")["item"]
    assert user_item["id"] == item_id and user_item["role"] == "user"
    transcription = by_type["conversation.item.input_audio_transcription.completed"]
    assert transcription == {**transcription, "item_id": item_id, "transcript": "A table for two."}

    assert audio_of(events) == synthesize(reply)
    assert by_type["response.audio_transcript.done"]["transcript"] == reply
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.audio_transcript.delta")
    assert deltas == reply
    done = by_type["response.done"]["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"] == [{"type": "audio", "transcript": reply}]

    (context,) = contexts
    assert context.trigger == "vad" and context.instructions is None
    assert context.last_user_transcript == "A table for two."
    assert context.session_instructions == "Be brief."


async def test_vad_needs_loud_enough_speech(fake):
    async with session(fake, turn_detection=VAD) as c:
        await c.append(tone(500, amplitude=1000) + silence(600))  # RMS 707 < 1000
        await c.append(tone(400, amplitude=3000) + silence(600))  # RMS 2121 > 1000
        events = await c.until("input_audio_buffer.speech_stopped")
    assert types(events) == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
    ]
    # The loud tone starts at 1100 ms; the start is padded by 500 ms.
    assert events[0]["audio_start_ms"] == 600
    assert events[1]["audio_end_ms"] == 1100 + 400 + 500


async def test_vad_padding_floors_at_zero_and_default_transcript(fake):
    async with session(fake, turn_detection=VAD) as c:
        await c.append(tone(300) + silence(500))
        events = await c.until("conversation.item.input_audio_transcription.completed")
    assert events[0]["audio_start_ms"] == 0
    assert events[-1]["transcript"] == describe_audio(tone(300) + silence(500))


async def test_vad_buffer_does_not_grow_in_silence(fake):
    async with session(fake, turn_detection=VAD) as c:
        await c.append(silence(10_000), chunk=FRAME * 10)
        await c.append(tone(300) + silence(600))
        events = await c.until("input_audio_buffer.speech_stopped")
        held = fake.sessions[0].buffered_ms
    assert events[0]["audio_start_ms"] == 10_000 - 500
    assert fake.sessions[0].input_audio_ms == 10_900
    assert held <= 600


async def test_barge_in_then_cancel_then_the_next_turn_is_answered():
    script = [LONG_REPLY, "Yes?"]
    async with (
        FakeRealtimeServer(speed=1.0, script=script) as fake,
        session(fake, turn_detection=VAD) as c,
    ):
        await c.send("response.create")
        await c.until("response.audio.delta")
        await c.append(tone(300))
        await c.until("input_audio_buffer.speech_started")
        await c.send("response.cancel")
        assert (await c.until("response.done"))[-1]["response"]["status"] == "cancelled"
        await c.append(silence(600))
        events = await c.until("response.done")
    assert "input_audio_buffer.committed" in types(events)
    assert events[-1]["response"]["status"] == "completed"
    assert events[-1]["response"]["output"][0]["content"][0]["transcript"] == "Yes?"


async def test_turn_ending_during_an_active_response_gets_no_second_response():
    async with (
        FakeRealtimeServer(speed=1.0, script=[LONG_REPLY]) as fake,
        session(fake, turn_detection=VAD) as c,
    ):
        await c.send("response.create")
        await c.until("response.audio.delta")
        await c.append(tone(300) + silence(600))
        await c.until("input_audio_buffer.committed")
        assert len(fake.sessions[0].sent_events("response.created")) == 1
        await c.send("response.cancel")
        await c.until("response.done")
    assert len(fake.sessions[0].sent_events("response.created")) == 1


def test_energy_vad_is_independent_of_chunking():
    audio = silence(200) + tone(40) + silence(200) + tone(300) + silence(140) + tone(100)
    audio += silence(300)

    def run(chunk: int) -> list[VadEvent]:
        vad = EnergyVad(
            energy_awakeness_threshold=2500, prefix_padding_ms=100, silence_duration_ms=200
        )
        return [
            e
            for start in range(0, len(audio), chunk)
            for e in vad.feed(audio[start : start + chunk])
        ]

    # A 40 ms click is not speech; a 140 ms pause is shorter than the silence duration.
    expected = [VadEvent("started", 340 * BYTES_PER_MS), VadEvent("stopped", 1180 * BYTES_PER_MS)]
    assert run(FRAME) == run(333) == run(len(audio)) == expected


def test_energy_vad_skips_numpy_on_silence_with_the_same_result():
    """Windows of bytes 0x00/0xFF only (samples in ±256) take the fast path; a speech start
    and stop around them, and a threshold below 256, give what the numpy path gives."""
    quiet = bytes([0x00, 0xFF, 0xFF, 0x00]) * (100 * BYTES_PER_MS // 4)
    audio = quiet + tone(300) + quiet + quiet

    def run(threshold: int, chunk: int) -> list[VadEvent]:
        vad = EnergyVad(
            energy_awakeness_threshold=threshold, prefix_padding_ms=0, silence_duration_ms=100
        )
        return [e for i in range(0, len(audio), chunk) for e in vad.feed(audio[i : i + chunk])]

    expected = [VadEvent("started", 100 * BYTES_PER_MS), VadEvent("stopped", 500 * BYTES_PER_MS)]
    assert run(2500, FRAME) == run(2500, 333) == expected
    # Below 256 the fast path is off: the 0x00FF/0xFF00 samples (255, -256) are loud.
    assert run(100, FRAME)[0] == VadEvent("started", 0)


# -- manual turns, items ------------------------------------------------------------------------


async def test_manual_commit_then_response_speaks_the_instructions(fake):
    async with session(fake) as c:
        await c.append(tone(300))
        await c.send("input_audio_buffer.commit")
        events = await c.until("conversation.item.input_audio_transcription.completed")
        assert types(events)[:2] == ["input_audio_buffer.committed", "conversation.item.created"]
        await c.send("response.create", response={"instructions": "Welcome to Acme."})
        events = await c.until("response.done")
    assert events[0]["type"] == "response.created"
    assert audio_of(events) == synthesize("Welcome to Acme.")
    transcript = next(e for e in events if e["type"] == "response.audio_transcript.done")
    assert transcript["transcript"] == "Welcome to Acme."


async def test_default_script_cycles():
    async with FakeRealtimeServer(speed=None, script=["One.", "Two."]) as fake, session(fake) as c:
        said = []
        for _ in range(3):
            await c.send("response.create")
            events = await c.until("response.done")
            said.append(events[-1]["response"]["output"][0]["content"][0]["transcript"])
    assert said == ["One.", "Two.", "One."]


async def test_clear_empties_the_buffer(fake):
    async with session(fake) as c:
        await c.append(tone(100))
        await c.send("input_audio_buffer.clear")
        assert (await c.recv())["type"] == "input_audio_buffer.cleared"
        await expect_error(c, "input_audio_buffer.commit", "input audio buffer is empty")


async def test_conversation_items_get_server_ids_and_can_be_deleted(fake):
    user = {"id": "mine", "type": "message", "role": "user"}
    async with session(fake) as c:
        await c.send(
            "conversation.item.create",
            item={**user, "content": [{"type": "input_text", "text": "Hi"}]},
        )
        first = (await c.recv())["item"]
        assert first["id"].startswith("item_") and first["id"] != "mine"
        await c.send(
            "conversation.item.create",
            item={
                "type": "message",
                "role": "assistant",
                "content": [{"type": "text", "text": "Yo"}],
            },
        )
        second = await c.recv()
        assert second["previous_item_id"] == first["id"]
        await expect_error(
            c,
            "conversation.item.create",
            "content type audio is not allowed for role assistant",
            item={"type": "message", "role": "assistant", "content": [{"type": "audio"}]},
        )
        await c.send("conversation.item.delete", item_id=first["id"])
        assert (await c.recv()) | {"event_id": None} == {
            "event_id": None,
            "type": "conversation.item.deleted",
            "item_id": first["id"],
        }
        await c.send("response.create")
        await c.until("response.done")
    assert [item["role"] for item in fake.sessions[0].conversation] == ["assistant", "assistant"]
    assert fake.sessions[0].last_user_transcript == "Hi"


async def test_text_only_response(fake):
    async with session(fake) as c:
        await c.send(
            "response.create", response={"modalities": ["text"], "instructions": "Hi there."}
        )
        events = await c.until("response.done")
    assert "response.audio.delta" not in types(events)
    text = "".join(e["delta"] for e in events if e["type"] == "response.text.delta")
    assert (
        text == "Hi there." == next(e for e in events if e["type"] == "response.text.done")["text"]
    )


async def test_failing_responder_ends_the_response_failed():
    def responder(context: ResponseContext) -> str:
        raise RuntimeError("boom")

    async with FakeRealtimeServer(responder=responder) as fake, session(fake) as c:
        await c.send("response.create")
        events = await c.until("response.done")
        assert events[-1]["response"]["status"] == "failed"
        await c.send("response.create")  # the session is usable again
        assert (await c.recv())["type"] == "response.created"


# -- cancel and truncate ------------------------------------------------------------------------


async def test_cancel_stops_audio_at_once_and_finishes_cancelled():
    async with FakeRealtimeServer(speed=1.0, script=[LONG_REPLY]) as fake, session(fake) as c:
        await c.send("response.create")
        await c.until("response.audio.delta")
        await c.send("response.cancel", event_id="cancel-1")
        events = await c.until("response.done")
        await expect_error(c, "response.cancel", "no ongoing response to cancel")

    assert events[-1]["response"]["status"] == "cancelled"
    tail = [t for t in types(events) if t != "response.audio.delta" and "transcript.delta" not in t]
    assert tail == [
        "response.audio.done",
        "response.audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.done",
    ]
    # Nothing of the response follows its audio.done, on the wire (server-side record).
    sent = fake.sessions[0].sent
    audio_done = types(sent).index("response.audio.done")
    assert "response.audio.delta" not in types(sent[audio_done:])
    heard = sum(
        len(base64.b64decode(e["delta"]))
        for e in fake.sessions[0].sent_events("response.audio.delta")
    )
    assert heard < len(synthesize(LONG_REPLY)) / 2
    item = events[-1]["response"]["output"][0]
    assert item["status"] == "incomplete"
    assert LONG_REPLY.startswith(item["content"][0]["transcript"])


@pytest.mark.parametrize("refuse", [False, True])
async def test_truncate_is_recorded_or_refused(refuse):
    async with FakeRealtimeServer(truncate_error=refuse) as fake, session(fake) as c:
        fields = {"item_id": "item_1", "content_index": 0, "audio_end_ms": 1234}
        if refuse:
            await expect_error(c, "conversation.item.truncate", "unknown event type", **fields)
            assert fake.sessions[0].truncations == []
        else:
            await c.send("conversation.item.truncate", **fields)
            reply = await c.recv()
            assert reply["type"] == "conversation.item.truncated"
            assert fake.sessions[0].truncations == [fields]


# -- tools --------------------------------------------------------------------------------------


async def test_tool_call_flow():
    script = [CallTool("transfer_call", {"reason": "wants a human"}, say="One moment."), "Done."]
    async with (
        FakeRealtimeServer(speed=None, script=script) as fake,
        session(fake, tools=[TOOL]) as c,
    ):
        await c.send("response.create")
        events = await c.until("response.done")
        call_created = next(
            e["item"]
            for e in events
            if e["type"] == "conversation.item.created" and e["item"]["type"] == "function_call"
        )
        await c.send(
            "conversation.item.create",
            item={
                "type": "function_call_output",
                "call_id": call_created["call_id"],
                "output": "ok",
            },
        )
        assert (await c.recv())["item"]["type"] == "function_call_output"
        await c.send("response.create")
        follow_up = await c.until("response.done")

    assert audio_of(events) == synthesize("One moment.")
    assert call_created["status"] == "incomplete" and call_created["name"] == "transfer_call"
    arguments = json.dumps({"reason": "wants a human"}, separators=(",", ":"))
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert "".join(e["arguments"] for e in deltas) == arguments
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == arguments and done["name"] == "transfer_call"
    assert done["call_id"] == call_created["call_id"]
    assert types(events)[-2:] == ["response.output_item.done", "response.done"]
    output = events[-1]["response"]["output"]
    assert [item["type"] for item in output] == ["message", "function_call"]
    assert output[1] == {**call_created, "status": "completed", "arguments": arguments}
    assert follow_up[-1]["response"]["output"][0]["content"][0]["transcript"] == "Done."


async def test_async_responder_and_verbatim_json_arguments():
    async def responder(context: ResponseContext) -> CallTool:
        await asyncio.sleep(0)
        return CallTool("end_call", '{"why": "done"}')

    async with FakeRealtimeServer(responder=responder) as fake, session(fake) as c:
        await c.send("response.create")
        events = await c.until("response.done")
    assert "response.audio.delta" not in types(events)
    (call,) = events[-1]["response"]["output"]
    assert call["name"] == "end_call" and call["arguments"] == '{"why": "done"}'


async def test_recording_can_be_turned_off():
    async with FakeRealtimeServer(speed=None, record_events=False) as fake, session(fake) as c:
        await c.send("response.create")
        assert audio_of(await c.until("response.done"))
    assert fake.sessions[0].sent == fake.sessions[0].received == []


async def test_audio_trace_reports_appends_and_deltas():
    trace: list[tuple[str, str, int]] = []
    fake = FakeRealtimeServer(
        speed=None, audio_trace=lambda session, kind, n: trace.append((session.id, kind, n))
    )
    async with fake, session(fake) as c:
        await c.append(silence(50), chunk=FRAME + 2)
        await c.send("response.create", response={"instructions": LONG_REPLY})
        events = await c.until("response.done")
    (only,) = fake.sessions
    assert {session_id for session_id, _, _ in trace} == {only.id}
    assert [n for _, kind, n in trace if kind == "in"] == [FRAME + 2, FRAME + 2, 476]
    deltas = [base64.b64decode(e["delta"]) for e in events if e["type"] == "response.audio.delta"]
    assert [n for _, kind, n in trace if kind == "out"] == [len(d) for d in deltas]


# -- pacing and delta sizes ---------------------------------------------------------------------


async def test_delta_sizes_are_irregular_and_not_frame_aligned(fake):
    async with session(fake) as c:
        await c.send("response.create", response={"instructions": LONG_REPLY})
        events = await c.until("response.done")
    sizes = [
        len(base64.b64decode(e["delta"])) for e in events if e["type"] == "response.audio.delta"
    ]
    assert len(set(sizes)) > len(sizes) // 2
    assert all(40 * BYTES_PER_MS <= size <= 130 * BYTES_PER_MS for size in sizes[:-1])
    assert all(size % FRAME for size in sizes[:-1])


async def test_audio_is_paced_faster_than_real_time_but_paced():
    async with FakeRealtimeServer(speed=10.0, script=[LONG_REPLY]) as fake, session(fake) as c:
        loop = asyncio.get_running_loop()
        # Timed from before the request, so from before the fake's pacing starts: timed from
        # the first delta's arrival, a 26 ms stall of this (shared) loop in between made the
        # fake's catch-up burst look like running ahead of 10x.
        started = loop.time()
        await c.send("response.create")
        await c.until("response.audio.delta")
        await asyncio.sleep(0.3)
        received = audio_of(await drain(c))
        elapsed = loop.time() - started
    received_ms = len(received) / BYTES_PER_MS
    assert received_ms >= 300  # at least real time, though 10x is asked for
    # Paced: never ahead of 10x real time (plus two deltas of slack for the connection's lag).
    assert received_ms <= elapsed * 1000 * 10 + 260


async def test_lead_sends_the_first_audio_at_once_then_paces():
    fake = FakeRealtimeServer(speed=1.0, lead_ms=500, script=[LONG_REPLY])
    async with fake, session(fake) as c:
        loop = asyncio.get_running_loop()
        await c.send("response.create")
        first = await c.until("response.audio.delta")
        started = loop.time()
        await asyncio.sleep(0.2)
        received = audio_of(first + await drain(c))
        elapsed = loop.time() - started
    received_ms = len(received) / BYTES_PER_MS
    assert received_ms >= 500  # the head start came at once
    # Then real time (plus two deltas of slack for the connection's lag).
    assert received_ms <= 500 + elapsed * 1000 + 260


def test_lead_must_not_be_negative():
    with pytest.raises(ValueError, match="lead_ms"):
        FakeRealtimeServer(lead_ms=-1)


async def drain(c: Client) -> list[dict[str, Any]]:
    """Events already delivered, without waiting for more."""
    events = []
    while True:
        try:
            async with asyncio.timeout(0.01):
                events.append(json.loads(await c.ws.recv()))
        except TimeoutError:
            return events


# -- session life and faults --------------------------------------------------------------------


async def test_session_counts_follow_connections(fake):
    async with session(fake), session(fake):
        await fake.wait_for(lambda: fake.sessions_open == 2)
    await fake.wait_for(lambda: fake.sessions_open == 0)
    assert fake.sessions_opened == 2
    assert all(s.close_code == 1000 for s in fake.sessions)


async def test_drop_all_aborts_every_session(fake):
    async with session(fake) as a, session(fake) as b:
        await fake.drop_all()
        for c in (a, b):
            with pytest.raises(ConnectionClosedError) as closed:
                await c.recv()
            assert closed.value.rcvd is None  # no close frame: a crash, not a goodbye
    assert fake.sessions_open == 0 and fake.sessions_opened == 2


async def test_session_ends_after_session_max_seconds():
    async with FakeRealtimeServer(session_max_seconds=0.2) as fake, session(fake) as c:
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await c.recv()
        assert closed.value.rcvd.code == 1000
        await fake.wait_for(lambda: fake.sessions_open == 0)


async def test_events_are_recorded_both_ways(fake):
    async with session(fake) as c:
        await c.send("response.create", event_id="e-7")
        events = await c.until("response.done")
    recorded = fake.sessions[0]
    assert recorded.received == [{"type": "response.create", "event_id": "e-7"}]
    assert types(recorded.sent) == ["session.created", *types(events)]
    assert len({e["event_id"] for e in recorded.sent}) == len(recorded.sent)


async def test_wait_for_times_out(fake):
    with pytest.raises(TimeoutError):
        await fake.wait_for(lambda: fake.sessions, timeout=0.05)


def test_scripted_responder_prefers_request_instructions():
    responder = ScriptedResponder([CallTool("end_call")])
    context = ResponseContext("response.create", "Say goodbye.", None, {}, [], "sess_1")
    assert responder(context) == Say("Say goodbye.")
    no_instructions = ResponseContext("vad", None, "bye", {}, [], "sess_1")
    assert responder(no_instructions) == CallTool("end_call")


# -- speech -------------------------------------------------------------------------------------


@pytest.mark.skipif(synthesizer_name() != "espeak-ng", reason="espeak-ng is not installed")
def test_espeak_speech_at_any_rate():
    at_24k, at_8k = synthesize("Hello there."), synthesize("Hello there.", 8000)
    assert synthesize("Hello there.") is at_24k  # cached
    assert 0.5 < len(at_24k) / 48000 < 2.5
    assert abs(len(at_8k) * 3 - len(at_24k)) <= 6
    assert synthesize("  ") == b""


def test_synthetic_fallback_is_speech_like(monkeypatch):
    monkeypatch.setattr(speech, "_espeak_path", lambda: None)
    assert synthesizer_name() == "synthetic"
    text = "The fallback voice has the rhythm of speech."
    pcm = synthetic_speech(text)
    assert abs(len(pcm) / 48000 - len(text) / 14) < 0.05
    samples = np.frombuffer(pcm, "<i2").astype(float)
    rms = np.sqrt(np.mean(samples[: len(samples) // 480 * 480].reshape(-1, 480) ** 2, axis=1))
    assert np.mean(rms > 2500) > 0.3  # loud enough for the default VAD threshold…
    assert np.mean(rms < 100) > 0.05  # …with pauses between words
    assert synthetic_speech(text) == pcm  # deterministic


# -- the documented shape: events as StepFun's samples show them --------------------------------

SAMPLES = Path(__file__).parent / "fixtures" / "stepfun"


def sample_keys(name: str) -> set[str]:
    """The sample's fields; event_id aside (D-REF 公共参数: every event may carry one)."""
    return set(json.loads((SAMPLES / name).read_text())) - {"event_id"}


async def test_documented_shape_sends_the_fields_the_samples_show():
    script = [CallTool("end_call", {"reason": "done"}, say="Goodbye.")]
    fake = FakeRealtimeServer(speed=None, shape="documented", script=script)
    async with fake, client(fake) as c:
        assert (await c.recv())["type"] == "session.created"
        await c.send("session.update", session={"instructions": "Be brief."})
        ack = await c.recv()  # D-REF labels the update's answer session.created
        assert ack["type"] == "session.created" and ack["session"]["instructions"]
        await c.send("response.create")
        events = await c.until("rate_limits.updated")
        await c.ws.send(json.dumps({"type": "scooby.dooby.doo", "event_id": "e1"}))
        bare = await c.recv()
    by_type = {}
    for event in events:
        by_type.setdefault(event["type"], event)
    for type_, name in {
        "response.audio.delta": "ref-audio-delta.json",
        "response.audio.done": "ref-audio-done.json",
        "response.audio_transcript.delta": "ref-audio-transcript-delta.json",
        "response.audio_transcript.done": "ref-audio-transcript-done.json",
        "response.output_item.added": "ref-output-item-added.json",
        "response.function_call_arguments.delta": "guide-function-call-arguments-delta.json",
        "response.function_call_arguments.done": "guide-function-call-arguments-done.json",
        "response.done": "guide-response-done-function-call.json",
    }.items():
        assert set(by_type[type_]) - {"event_id"} == sample_keys(name), type_
    # The call is announced as a function_call item, not by response.output_item.added.
    calls = [e for e in events if e["type"] == "conversation.item.created"]
    assert [e["item"]["type"] for e in calls] == ["message", "function_call"]
    assert set(calls[1]["item"]) == set(
        json.loads((SAMPLES / "guide-function-call-item-created.json").read_text())["item"]
    )
    added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
    assert added == ["message"]  # D-REF: output_item.added carries messages only
    [call] = [o for o in by_type["response.done"]["response"]["output"] if "call_id" in o]
    assert set(call) == {"type", "name", "call_id", "arguments"}
    assert set(bare) - {"event_id"} == sample_keys("guide-error.json")  # D-GUIDE 错误处理: bare
    assert bare["event_id"] == "e1" and bare["code"] == "invalid_value"


async def test_documented_shape_says_fixed_words_only_by_the_documented_recipe():
    words = "Hello, this is the front desk."
    fake = FakeRealtimeServer(speed=None, shape="documented", script=["Scripted."])
    async with fake, client(fake) as c:
        await c.recv()
        # Per-response instructions are not documented: no effect.
        await c.send("response.create", response={"instructions": f'Say exactly "{words}"'})
        said = (await c.until("response.done"))[-1]["response"]["output"][0]["content"]
        assert said[0]["transcript"] == "Scripted."
        await c.send(
            "session.update", session={"instructions": f"请你原样无修改地输出下面的话：{words}"}
        )
        await c.send("response.create")
        said = (await c.until("response.done"))[-1]["response"]["output"][0]["content"]
        assert said[0]["transcript"] == words
