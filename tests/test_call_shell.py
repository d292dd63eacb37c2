"""The media-stream shell driven in memory: a Twilio line and model sessions as queues, no
socket. It moves bytes and performs the Call's actions; the Call decides (reconnects too)."""

import asyncio
import dataclasses
import json

import pytest
from conftest import EXAMPLE_PERSONAS

import phoneagent.call.model_link
from phoneagent.bridge import CallShell
from phoneagent.call import Call, EndReason
from phoneagent.personas import PersonaRegistry
from phoneagent.realtime.base import (
    AddTextItem,
    AppendAudio,
    AudioDelta,
    CreateResponse,
    ModelUnavailable,
    ResponseDone,
    ResponseStarted,
    SpeechStarted,
)
from phoneagent.twilio.wire.stream import Mark, Media, Stop

PERSONA = PersonaRegistry(EXAMPLE_PERSONAS).current.personas["bright-smile-dental"]
CALLER_FRAME = b"\xff" * 160  # 20 ms of μ-law silence
AGENT_AUDIO = b"\x00\x10" * 4800  # 200 ms of pcm16 at 24 kHz


class MemoryLine:
    """A TwilioLine: events put in by the test, messages sent kept as JSON."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.sent: list[dict] = []
        self.closed = False
        self._events = self._read()

    async def _read(self):
        while (event := await self.inbox.get()) is not None:
            yield event

    def events(self):
        return self._events

    async def send(self, text: str) -> None:
        if self.closed:
            raise ConnectionResetError("the stream is gone")
        self.sent.append(json.loads(text))

    async def close(self) -> None:
        self.closed = True
        self.inbox.put_nowait(None)


class MemoryModel:
    """A ModelChannel: events put in by the test, commands kept."""

    def __init__(self, session_id: str = "sess_1") -> None:
        self.session_id = session_id
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.commands: list = []
        self.closed = False

    async def events(self):
        while (event := await self.inbox.get()) is not None:
            yield event

    async def send(self, command) -> None:
        if self.closed:
            raise ConnectionResetError("the session is gone")
        self.commands.append(command)

    async def close(self) -> None:
        self.closed = True
        self.inbox.put_nowait(None)

    def drop(self) -> None:
        """The socket closes under the call."""
        self.closed = True
        self.inbox.put_nowait(None)


async def until(predicate, what: str) -> None:
    async with asyncio.timeout(5):  # a guard only
        while not predicate():
            await asyncio.sleep(0.005)


def shell_for(line, model, open_model=None) -> CallShell:
    call = Call(PERSONA, stream_sid="MZmem", call_sid="CAmem")
    return CallShell(line, model, call, open_model=open_model)


async def test_a_call_runs_in_memory_from_greeting_to_hang_up():
    line, model = MemoryLine(), MemoryModel()
    shell = shell_for(line, model)
    running = asyncio.create_task(shell.run())
    await until(lambda: any(isinstance(c, CreateResponse) for c in model.commands), "greeting")
    line.inbox.put_nowait(Media(timestamp_ms=0, payload=CALLER_FRAME))
    await until(lambda: any(isinstance(c, AppendAudio) for c in model.commands), "append")
    model.inbox.put_nowait(ResponseStarted("r1"))
    model.inbox.put_nowait(AudioDelta("r1", "item_1", AGENT_AUDIO))
    model.inbox.put_nowait(ResponseDone("r1", "completed"))
    await until(lambda: any(m["event"] == "mark" for m in line.sent), "agent audio and a mark")
    media = [m for m in line.sent if m["event"] == "media"]
    assert media and all(m["streamSid"] == "MZmem" for m in media)
    line.inbox.put_nowait(Mark(line.sent[-1]["mark"]["name"]))
    line.inbox.put_nowait(Stop("CAmem"))
    await asyncio.wait_for(running, 5)
    assert shell.call.end_reason is EndReason.CALLER_HUNG_UP
    assert line.closed and model.closed


async def test_a_dropped_session_is_replaced_as_the_call_decides():
    line, first, second = MemoryLine(), MemoryModel("sess_1"), MemoryModel("sess_2")
    opened = []

    async def open_model():
        opened.append(second)
        return second

    shell = shell_for(line, first, open_model)
    running = asyncio.create_task(shell.run())
    first.inbox.put_nowait(ResponseStarted("r1"))
    first.inbox.put_nowait(AudioDelta("r1", "item_1", AGENT_AUDIO))
    first.inbox.put_nowait(ResponseDone("r1", "completed"))
    await until(lambda: any(m["event"] == "mark" for m in line.sent), "the greeting's audio")
    first.drop()
    await until(lambda: opened, "a new session")
    line.inbox.put_nowait(Media(timestamp_ms=0, payload=CALLER_FRAME))
    await until(lambda: any(isinstance(c, AppendAudio) for c in second.commands), "audio")
    assert not shell.call.ended  # the call goes on with the new session
    line.inbox.put_nowait(Stop("CAmem"))
    await asyncio.wait_for(running, 5)
    assert shell.model is second and first.closed and second.closed


async def test_when_no_session_can_be_opened_the_call_ends(monkeypatch):
    monkeypatch.setattr(phoneagent.call.model_link, "RECONNECT_DELAYS", (0.0, 0.01))
    line, model = MemoryLine(), MemoryModel()
    attempts = []

    async def open_model():
        attempts.append(1)
        raise ModelUnavailable("refused", 503)

    shell = shell_for(line, model, open_model)
    running = asyncio.create_task(shell.run())
    await until(lambda: any(isinstance(c, CreateResponse) for c in model.commands), "greeting")
    model.drop()
    await asyncio.wait_for(running, 5)
    assert len(attempts) == 2  # as many tries as the Call's policy says, then the end
    assert shell.call.end_reason is EndReason.MODEL_DISCONNECTED
    assert line.closed  # closing the stream makes Twilio ask <Connect action>: the apology


@pytest.mark.parametrize("gone", ["line", "model"])
async def test_a_send_on_a_closed_socket_ends_or_is_lost_but_never_raises(gone):
    line, model = MemoryLine(), MemoryModel()
    shell = shell_for(line, model)
    running = asyncio.create_task(shell.run())
    await until(lambda: model.commands, "the greeting")
    if gone == "line":
        line.closed = True  # sends now fail; the Call hears the stream closed
        model.inbox.put_nowait(ResponseStarted("r1"))
        model.inbox.put_nowait(AudioDelta("r1", "item_1", AGENT_AUDIO))
        await asyncio.wait_for(running, 5)
        assert shell.call.end_reason is EndReason.TWILIO_DISCONNECTED
    else:
        model.closed = True  # a command to a session that just dropped is lost, not raised
        await shell.perform(shell.call.on_twilio(Media(timestamp_ms=0, payload=CALLER_FRAME)))
        assert not any(isinstance(c, AddTextItem) for c in model.commands)
        line.inbox.put_nowait(Stop("CAmem"))
        await asyncio.wait_for(running, 5)


class PausedLine(MemoryLine):
    """A line whose sends wait after writing, as aiohttp's do while the socket's buffer is
    above its limit: other events' actions run meanwhile."""

    async def send(self, text: str) -> None:
        await super().send(text)
        await asyncio.sleep(0)


async def test_agent_audio_framed_before_a_barge_in_never_follows_its_clear():
    """The model pump is sending a delta's messages when the caller's frame makes the Call
    interrupt: what remains of that delta was written off by the clear and is not sent."""
    persona = dataclasses.replace(PERSONA, barge_in_min_speech_ms=20)  # one loud frame
    line, model = PausedLine(), MemoryModel()
    shell = CallShell(line, model, Call(persona, stream_sid="MZmem", call_sid="CAmem"))
    await shell.feed_model(ResponseStarted("r1"))
    await shell.feed_model(SpeechStarted("item_caller", 0))  # weighed on the caller's frames
    two_messages = b"\x00\x40" * 4800 * 2  # 400 ms: two 200 ms messages, each with its mark
    sending = asyncio.create_task(shell.feed_model(AudioDelta("r1", "item_1", two_messages)))
    await asyncio.sleep(0)  # the first `media` is written; the send waits
    assert [m["event"] for m in line.sent] == ["media"]
    loud = bytes([0x00, 0x80]) * 80  # μ-law full scale, both signs
    await shell.feed_twilio(Media(timestamp_ms=0, payload=loud))
    await sending
    events = [m["event"] for m in line.sent]
    assert events == ["media", "clear"]  # not the mark nor the second `media` of item_1
    assert shell.call.stats.barge_ins == 1
