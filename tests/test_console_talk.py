"""Talk to this persona, over the console's WebSocket: a client plays the page's part (Twilio's
Media Streams messages) against the real server, with the fake model and the fake Twilio API.

The browser itself (microphone, playback, the editor) is in test_console_talk_browser.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import re
import shutil
from pathlib import Path

import aiohttp
import pytest
from conftest import EXAMPLE_PERSONAS
from console_kit import PASSWORD

from phoneagent.audio import pcm16_to_ulaw
from phoneagent.cli import main as phoneagent_cli
from phoneagent.testing.fake_model import CallTool
from phoneagent.testing.speech import synthesize

DENTAL = "bright-smile-dental"
STREAM = "/console/talk/stream"
FRAME = 160  # 20 ms of μ-law


async def sign_in(http) -> str:
    """Sign in; the session's CSRF token, as the talk page carries it."""
    async with http.post(
        "/console/login",
        data={"password": PASSWORD, "next": "/console/talk"},
        allow_redirects=False,
    ) as response:
        assert response.status == 303
    async with http.get("/console/talk", headers={"Accept": "text/html"}) as response:
        assert response.status == 200
        return re.search(r'data-csrf="([^"]+)"', await response.text()).group(1)


class PageCaller:
    """The talk page's part, scripted: Twilio's messages, marks echoed the moment they arrive
    (its playback is instant), everything the server sends kept in ``received``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, csrf: str) -> None:
        self.ws = ws
        self.csrf = csrf
        self.received: list[dict] = []
        self.sequence = 0
        self.chunk = 0
        self.call_sid = self.stream_sid = ""
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None

    async def start(self, persona: str = DENTAL, *, draft: str | None = None, **extra) -> None:
        given = await self.ws.receive_json(timeout=5)
        assert given["event"] == "console.call"
        self.call_sid, self.stream_sid = given["callSid"], given["streamSid"]
        self.account_sid = given["accountSid"]
        parameters = {"persona": persona, "csrf": self.csrf, **extra}
        if draft is not None:
            parameters["draft"] = draft
        await self.ws.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self.send(
            "start",
            start={
                "streamSid": self.stream_sid,
                "accountSid": self.account_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "customParameters": parameters,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        )
        self._reader = asyncio.create_task(self._read())

    async def send(self, event: str, **body) -> None:
        self.sequence += 1
        message = {"event": event, "sequenceNumber": str(self.sequence)}
        await self.ws.send_json({**message, "streamSid": self.stream_sid, **body})

    async def play(self, mulaw: bytes) -> None:
        """The caller's audio, as 20 ms frames (not paced: the fake model counts audio)."""
        for offset in range(0, len(mulaw), FRAME):
            frame = mulaw[offset : offset + FRAME].ljust(FRAME, b"\xff")
            media = {
                "track": "inbound",
                "chunk": str(self.chunk + 1),
                "timestamp": str(self.chunk * 20),
                "payload": base64.b64encode(frame).decode(),
            }
            self.chunk += 1
            await self.send("media", media=media)

    async def stop(self) -> None:
        await self.send("stop", stop={"accountSid": self.account_sid, "callSid": self.call_sid})

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(message.data)
            self.received.append(data)
            if data["event"] == "mark":
                await self.send("mark", mark={"name": data["mark"]["name"]})
            self._changed.set()
        self._changed.set()

    def messages(self, event: str) -> list[dict]:
        return [m for m in self.received if m["event"] == event]

    async def wait_for(self, predicate, timeout: float = 15.0, what: str = "") -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if self.ws.closed and self._reader is not None and self._reader.done():
                    raise AssertionError(f"closed before {what}: {self.summary()}")
                self._changed.clear()
                await self._changed.wait()

    async def wait_closed(self, timeout: float = 15.0) -> None:
        assert self._reader is not None
        async with asyncio.timeout(timeout):
            await self._reader

    def summary(self) -> str:
        return ", ".join(f"{m['event']}" for m in self.received if m["event"] != "media")


@contextlib.asynccontextmanager
async def page_call(http, csrf: str, base_url: str, **start):
    async with http.ws_connect(STREAM, headers={"Origin": base_url}) as ws:
        caller = PageCaller(ws, csrf)
        await caller.start(**start)
        yield caller


def speech(text: str) -> bytes:
    return pcm16_to_ulaw(synthesize(text, sample_rate=8000))


def quiet(ms: int) -> bytes:
    return b"\xff" * (8 * ms)


async def recorded_end(state, call_sid: str):
    """The call's record once its end is in (just after the server closed the socket)."""
    async with asyncio.timeout(5):
        while (record := state.calls.get(call_sid)) is None or record.ended_at is None:
            await asyncio.sleep(0.01)
    return record


async def greeted(caller: PageCaller) -> None:
    """The greeting heard out: its turn in the transcript, every mark echoed."""
    await caller.wait_for(
        lambda: any(m["turn"]["role"] == "agent" for m in caller.messages("console.turn")),
        what="the greeting's turn",
    )


# --- who may call -----------------------------------------------------------------------------


async def test_every_talk_route_needs_a_session(http):
    async with http.get(
        "/console/talk", headers={"Accept": "text/html"}, allow_redirects=False
    ) as response:
        assert response.status == 303
        assert response.headers["Location"] == "/console/login?next=/console/talk"
    async with http.get(f"/console/talk/persona/{DENTAL}") as response:
        assert response.status == 401
    async with http.post(f"/console/talk/check?persona={DENTAL}", data="x = 1") as response:
        assert response.status == 401


async def test_the_persona_file_is_where_a_draft_starts(http):
    await sign_in(http)
    async with http.get(f"/console/talk/persona/{DENTAL}") as response:
        assert response.status == 200
        assert await response.text() == (EXAMPLE_PERSONAS / f"{DENTAL}.toml").read_text()
    async with http.get("/console/talk/persona/..%2Fpyproject") as response:
        assert response.status == 404


async def test_the_stream_needs_a_session_and_this_sites_origin(http, console_stack):
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(STREAM, headers={"Origin": console_stack.base_url})
    assert refused.value.status == 401
    await sign_in(http)
    for origin in ("https://evil.example", "null", ""):
        headers = {"Origin": origin} if origin else {}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(STREAM, headers=headers)
        assert refused.value.status == 403
    assert console_stack.model.sessions_opened == 0


async def test_start_needs_the_sessions_csrf_token_and_the_given_call_sid(http, console_stack):
    await sign_in(http)
    async with page_call(http, "not-the-token", console_stack.base_url) as caller:
        await caller.wait_closed()
    [refused] = caller.messages("console.refused")
    assert refused["reason"] == "refused: reload the page and try again"
    assert console_stack.model.sessions_opened == 0


# --- a call -----------------------------------------------------------------------------------


async def test_a_console_call_hears_the_greeting_and_is_recorded_as_a_console_call(
    http, console_stack
):
    csrf = await sign_in(http)
    state = console_stack.state
    async with page_call(http, csrf, console_stack.base_url) as caller:
        await greeted(caller)
        assert caller.call_sid in state.active_calls
        assert caller.call_sid in state.console_calls
        assert re.fullmatch(r"CA[0-9a-f]{32}", caller.call_sid)
        # Twilio's messages, exactly as the media stream sends them.
        media = caller.messages("media")
        assert len(media) > 10
        assert set(media[0]) == {"event", "streamSid", "media"}
        assert media[0]["streamSid"] == caller.stream_sid
        assert caller.messages("mark")
        await caller.stop()
        await caller.wait_closed()
    [turn, *_] = caller.messages("console.turn")
    greeting = state.persona(DENTAL).greeting
    assert turn["turn"]["role"] == "agent" and turn["turn"]["text"] == greeting
    assert caller.messages("console.ended") == [
        {"event": "console.ended", "reason": "caller_hung_up"}
    ]
    record = await recorded_end(state, caller.call_sid)
    assert record.caller == "console" and record.persona == DENTAL
    assert record.end_reason == "caller_hung_up"
    assert record.transcript[0]["text"] == greeting
    assert caller.call_sid not in state.active_calls and not state.console_calls
    await console_stack.model.wait_for(lambda: console_stack.model.sessions_open == 0)


async def test_the_callers_words_reach_the_transcript(http, console_stack):
    csrf = await sign_in(http)
    async with page_call(http, csrf, console_stack.base_url) as caller:
        await greeted(caller)
        await caller.play(speech("I would like to book a cleaning, please.") + quiet(1500))
        await caller.wait_for(
            lambda: any(m["turn"]["role"] == "caller" for m in caller.messages("console.turn")),
            what="the caller's turn",
        )
        await caller.stop()
    [said] = [m["turn"] for m in caller.messages("console.turn") if m["turn"]["role"] == "caller"]
    # The fake model cannot understand speech: it says how long the caller spoke.
    assert re.fullmatch(r"\(caller spoke for \d\.\d s\)", said["text"])


async def test_a_transfer_is_shown_not_dialled(http, console_stack):
    console_stack.model.script = (CallTool("transfer_call", {"target": "front_desk"}),)
    csrf = await sign_in(http)
    async with page_call(http, csrf, console_stack.base_url) as caller:
        await greeted(caller)
        await caller.play(speech("Can I talk to someone about my bill?") + quiet(1500))
        await caller.wait_for(lambda: caller.messages("console.handoff"), what="the handoff")
        await caller.stop()  # as Twilio does once the call is redirected
        await caller.wait_closed()
    [handoff] = caller.messages("console.handoff")
    assert handoff == {
        "event": "console.handoff",
        "action": "transfer",
        "target": "front_desk",
        "number": "+14155550111",
        "reason": None,  # the model gave none
    }
    assert caller.messages("console.ended")[-1]["reason"] == "transferred"
    assert console_stack.twilio_api.updates == []  # no REST request: nothing was dialled
    record = await recorded_end(console_stack.state, caller.call_sid)
    assert record.end_reason == "transferred"
    assert record.transfer == {"target": "front_desk", "number": "+14155550111", "reason": None}
    announcement = console_stack.state.persona(DENTAL).transfer["front_desk"].announcement
    assert record.transcript[-1]["text"] == announcement


async def test_the_agents_hang_up_is_shown_and_ends_the_call(http, console_stack):
    console_stack.model.script = (CallTool("end_call", {"reason": "done"}),)
    csrf = await sign_in(http)
    async with page_call(http, csrf, console_stack.base_url) as caller:
        await greeted(caller)
        await caller.play(speech("That is all, thank you, goodbye.") + quiet(1500))
        await caller.wait_closed()
    assert [m["action"] for m in caller.messages("console.handoff")] == ["hang_up"]
    assert caller.messages("console.ended")[-1]["reason"] == "agent_hung_up"
    assert console_stack.twilio_api.updates == []


async def test_console_calls_count_against_the_cap(http, console_stack):
    state = console_stack.state
    state.settings = dataclasses.replace(state.settings, max_calls=1)
    csrf = await sign_in(http)
    async with page_call(http, csrf, console_stack.base_url) as first:
        await greeted(first)
        async with page_call(http, csrf, console_stack.base_url) as second:
            await second.wait_closed()
        assert second.messages("console.refused")[0]["reason"] == (
            "all lines are busy (PHONEAGENT_MAX_CALLS=1)"
        )
        assert state.at_capacity()
        await first.stop()
    assert console_stack.model.sessions_opened == 1


async def test_a_model_that_cannot_be_reached_is_said_and_frees_the_place(http, console_stack):
    console_stack.model.fail_next_handshakes(10, status=503)
    csrf = await sign_in(http)
    async with page_call(http, csrf, console_stack.base_url) as caller:
        await caller.wait_closed()
    [refused] = caller.messages("console.refused")
    assert refused["reason"].startswith("the model is unavailable: ")
    state = console_stack.state
    async with asyncio.timeout(5):  # the server's side ends just after the page's
        while state.opening_calls or state.console_calls or state.active_calls:
            await asyncio.sleep(0.01)


# --- draft personas ---------------------------------------------------------------------------

BROKEN_DRAFT = """
name = "Draft front desk"
default = true
language = "english"
voice = "linjiajiejie"
greeting = "Hello from the draft."
instructions = "You are a test."
max_call_seconds = 5
[end_call]
goodbye = "Bye."
"""


def personas_check_errors(tmp_path: Path, capsys, persona_id: str, text: str) -> list[str]:
    """What `phoneagent personas check` prints for ``text`` as that persona's file, with the
    example personas beside it (its paths made the server's)."""
    directory = tmp_path / "personas"
    shutil.copytree(EXAMPLE_PERSONAS, directory)
    (directory / f"{persona_id}.toml").write_text(text)
    capsys.readouterr()
    assert phoneagent_cli(["personas", "check", str(directory)]) != 0
    lines = capsys.readouterr().out.splitlines()
    errors = [line.removeprefix("ERROR ") for line in lines if line.startswith("ERROR ")]
    return [error.replace(str(directory), str(EXAMPLE_PERSONAS)) for error in errors]


async def test_a_draft_with_errors_is_refused_with_the_messages_of_personas_check(
    http, console_stack, tmp_path, capsys
):
    expected = personas_check_errors(tmp_path, capsys, DENTAL, BROKEN_DRAFT)
    assert len(expected) == 2  # language, max_call_seconds
    csrf = await sign_in(http)
    async with http.post(
        f"/console/talk/check?persona={DENTAL}",
        data=BROKEN_DRAFT,
        headers={"X-CSRF-Token": csrf, "Content-Type": "text/plain; charset=utf-8"},
    ) as response:
        assert response.status == 200
        assert await response.json() == {"ok": False, "problems": expected}
    async with page_call(http, csrf, console_stack.base_url, draft=BROKEN_DRAFT) as caller:
        await caller.wait_closed()
    [refused] = caller.messages("console.refused")
    assert refused["reason"] == "the draft persona has problems"
    assert refused["problems"] == expected
    assert console_stack.model.sessions_opened == 0  # checked before any model session


async def test_a_draft_conflicting_with_another_persona_gets_the_cross_file_message(
    http, console_stack, tmp_path, capsys
):
    dental = (EXAMPLE_PERSONAS / f"{DENTAL}.toml").read_text()
    # One of Trattoria Luca's numbers in the dental draft: the check names the other file.
    draft = dental.replace('numbers = ["+14155550100"]', 'numbers = ["+14155550142"]')
    assert draft != dental
    expected = personas_check_errors(tmp_path, capsys, DENTAL, draft)
    assert expected and "already claimed by" in expected[0]
    csrf = await sign_in(http)
    async with http.post(
        f"/console/talk/check?persona={DENTAL}", data=draft, headers={"X-CSRF-Token": csrf}
    ) as response:
        assert (await response.json())["problems"] == expected


async def test_the_check_needs_the_csrf_token_and_bounds_the_draft(http, console_stack):
    csrf = await sign_in(http)
    async with http.post(f"/console/talk/check?persona={DENTAL}", data="name = 1") as response:
        assert response.status == 403
    huge = "# " + "x" * (64 * 1024)
    async with http.post(
        f"/console/talk/check?persona={DENTAL}", data=huge, headers={"X-CSRF-Token": csrf}
    ) as response:
        assert await response.json() == {
            "ok": False,
            "problems": ["the draft is larger than 64 KiB"],
        }
    async with page_call(http, csrf, console_stack.base_url, draft=huge) as caller:
        await caller.wait_closed()
    assert caller.messages("console.refused")[0]["problems"] == ["the draft is larger than 64 KiB"]


async def test_a_valid_draft_is_the_persona_of_the_call_and_publishes_no_event(
    http, console_stack, monkeypatch
):
    monkeypatch.setenv("TALK_TEST_WEBHOOK_SECRET", "a-secret-only-this-test-knows")
    dental = (EXAMPLE_PERSONAS / f"{DENTAL}.toml").read_text()
    draft = (
        dental.replace("this is Maya", "this is Robin from the draft")
        + '\n[webhook]\nurl = "http://127.0.0.1:9/hook"\nsecret_env = "TALK_TEST_WEBHOOK_SECRET"\n'
    )
    csrf = await sign_in(http)
    async with http.post(
        f"/console/talk/check?persona={DENTAL}", data=draft, headers={"X-CSRF-Token": csrf}
    ) as response:
        answer = await response.json()
    assert answer == {
        "ok": True,
        "problems": [],
        "persona": {"id": DENTAL, "name": "Bright Smile Dental front desk"},
    }
    async with page_call(http, csrf, console_stack.base_url, draft=draft) as caller:
        await greeted(caller)
        await caller.stop()
        await caller.wait_closed()
    [turn, *_] = caller.messages("console.turn")
    assert "this is Robin from the draft" in turn["turn"]["text"]
    await recorded_end(console_stack.state, caller.call_sid)
    assert "Robin" not in console_stack.state.persona(DENTAL).greeting  # nothing was deployed
    # The draft has a webhook: a phone call would have journalled and published call.started
    # and call.ended; a console call publishes nothing.
    await asyncio.gather(*console_stack.state.background)
    outbox = console_stack.state.publisher.worker.outbox
    assert await outbox.list() == []
    assert await outbox.open_calls() == []


async def test_a_webhook_token_in_the_persona_file_is_masked_on_the_page(tmp_path, monkeypatch):
    from console_kit import HOOK_SECRET_ENV, console_settings, personas_with_webhook

    from phoneagent.testing.stack import LocalStack

    monkeypatch.setenv(HOOK_SECRET_ENV, "whsec_c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cw==")
    hook = "https://hooks.example.com/in?token=TOPSECRET-0123456789"
    personas = personas_with_webhook(tmp_path / "personas", hook)
    settings = console_settings(personas, tmp_path / "data")
    async with (
        LocalStack(personas, settings=settings) as stack,
        aiohttp.ClientSession(
            base_url=stack.base_url, cookie_jar=aiohttp.CookieJar(unsafe=True)
        ) as http,
    ):
        await sign_in(http)
        async with http.get(f"/console/talk/persona/{DENTAL}") as response:
            text = await response.text()
    assert response.status == 200
    assert "TOPSECRET" not in text
    assert 'url = "https://hooks.example.com/in?***masked***"' in text
