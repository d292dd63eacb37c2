"""The scripted Twilio caller, tested against a small server written from the Twilio docs.

The server-role app below does what the reference says a bridge must do (§1.3 TwiML, §4
signatures with the real ``twilio`` validator, §3 outbound messages), so these tests prove the
caller behaves like Twilio, independently of phoneagent's own server. Assertions are on order,
counts and audio-time positions; timeouts are only failure guards.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
import wave
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

from phoneagent.testing.caller import StreamRejected, TwilioCaller
from phoneagent.testing.playback_buffer import PlaybackBuffer
from phoneagent.testing.twilio_messages import (
    BYTES_PER_MS,
    FRAME_BYTES,
    check_outbound,
    outbound_clear,
    outbound_mark,
    outbound_media,
)
from phoneagent.testing.twilio_signing import Signature, twilio_signature
from phoneagent.testing.wav import CALLER_BOOKING_WAV, read_wav_mulaw, write_mulaw_wav

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "test-auth-token"
PUBLIC_URL = "https://voice.example.com"
STREAM_URL = "wss://voice.example.com/twilio/stream"
TO = "+15550001111"

Script = Callable[["ServerRole", web.WebSocketResponse], Awaitable[None]]


class ServerRole:
    """The server side as the docs describe it: signed TwiML answer, signed stream, §3 messages."""

    def __init__(self, script: Script | None = None, twiml: str | None = None) -> None:
        self.script = script
        self.twiml = twiml
        self.content_type = "text/xml"
        self.validator = RequestValidator(AUTH_TOKEN)
        self.forms: list[dict[str, str]] = []
        self.inbound: list[dict[str, Any]] = []
        self.inbound_changed = asyncio.Event()
        self.ws_signatures: list[str | None] = []
        self.started = asyncio.Event()
        self.closed = asyncio.Event()
        self.stream_sid: str | None = None
        self.close_code: int | None = None
        self.go = asyncio.Event()  # lets a test tell the script when to act
        self.after_requests: list[dict[str, str]] = []
        self.after_twiml = "<Response><Hangup/></Response>"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/twilio/voice", self.voice)
        app.router.add_post("/twilio/stream-status", self.stream_status)
        app.router.add_get("/twilio/stream", self.stream)
        app.router.add_post("/twilio/after", self.after)
        return app

    async def after(self, request: web.Request) -> web.Response:
        """A `<Connect action>`, signed over the URL as written (§4)."""
        form = await request.post()
        signature = request.headers.get("X-Twilio-Signature", "")
        if not self.validator.validate(PUBLIC_URL + request.raw_path, form, signature):
            return web.Response(status=403)
        self.after_requests.append(dict(form))
        return web.Response(text=self.after_twiml, content_type="text/xml")

    async def voice(self, request: web.Request) -> web.Response:
        form = await request.post()
        signature = request.headers.get("X-Twilio-Signature", "")
        if not self.validator.validate(PUBLIC_URL + request.path, form, signature):
            return web.Response(status=403)
        self.forms.append(dict(form))
        if self.twiml is not None:
            return web.Response(text=self.twiml, content_type=self.content_type)
        response = VoiceResponse()
        stream = response.connect().stream(
            url=STREAM_URL, status_callback=PUBLIC_URL + "/twilio/stream-status"
        )
        stream.parameter(name="persona", value="dental & co")
        stream.parameter(name="token", value="tok-123")
        return web.Response(text=str(response), content_type="text/xml")

    async def stream_status(self, request: web.Request) -> web.Response:
        form = await request.post()
        signature = request.headers.get("X-Twilio-Signature", "")
        if not self.validator.validate(PUBLIC_URL + request.path, form, signature):
            return web.Response(status=403)
        self.forms.append(dict(form))
        return web.Response(status=204)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        signature = request.headers.get("x-twilio-signature")
        self.ws_signatures.append(signature)
        # §4.3: the wss:// URL exactly as written in the TwiML, with no params.
        if signature is None or not self.validator.validate(STREAM_URL, {}, signature):
            return web.Response(status=403)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        task = asyncio.create_task(self.script(self, ws)) if self.script else None
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    message = json.loads(msg.data)
                    message["_at"] = time.monotonic()
                    self.inbound.append(message)
                    if message["event"] == "start":
                        self.stream_sid = message["streamSid"]
                        self.started.set()
                    self.inbound_changed.set()
        finally:  # the test server cancels the handler when the connection is lost
            self.close_code = ws.close_code
            self.closed.set()
            if task is not None:
                task.cancel()
        return ws

    def events(self, event: str) -> list[dict[str, Any]]:
        return [m for m in self.inbound if m["event"] == event]

    async def wait_inbound(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.inbound_changed.clear()
                await self.inbound_changed.wait()


@pytest.fixture
async def serve(aiohttp_server):
    """Start a ServerRole; return (server_role, caller factory)."""
    callers: list[TwilioCaller] = []

    async def start(script: Script | None = None, *, twiml: str | None = None, speed=0.0):
        role = ServerRole(script, twiml)
        server = await aiohttp_server(role.app())

        def make_caller(**kwargs: Any) -> TwilioCaller:
            options = {
                "account_sid": ACCOUNT_SID,
                "auth_token": AUTH_TOKEN,
                "to": TO,
                "public_url": PUBLIC_URL,
                "speed": speed,
                **kwargs,
            }
            caller = TwilioCaller(str(server.make_url("")), **options)
            callers.append(caller)
            return caller

        return role, make_caller

    yield start
    for caller in callers:
        await caller.aclose()


async def connected_call(serve, script: Script | None = None, speed=0.0, **kwargs: Any):
    role, make_caller = await serve(script, speed=speed)
    caller = make_caller(**kwargs)
    await caller.dial()
    await caller.connect()
    await asyncio.wait_for(role.started.wait(), 10)
    return role, caller


def pattern(ms: int, offset: int = 0) -> bytes:
    """Recognisable μ-law audio: byte i is (offset + i) mod 256, so prefixes can be checked."""
    return bytes((offset + i) % 256 for i in range(ms * BYTES_PER_MS))


# -- signatures -------------------------------------------------------------------------------


def test_signature_matches_twilio_docs_test_vector():
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+14158675309",
        "Digits": "1234",
        "From": "+14158675309",
        "To": "+18005551212",
    }
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert twilio_signature("12345", url, params) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="


# -- the voice webhook ------------------------------------------------------------------------


async def test_dial_posts_the_voice_webhook_signed_like_twilio(serve):
    role, make_caller = await serve()
    caller = make_caller(from_="+14155550100")
    answer = await caller.dial()

    assert answer.status == 200 and answer.ok, answer.problems
    form = role.forms[0]  # the real validator accepted it, over the public URL
    assert form["CallSid"] == caller.call_sid and len(caller.call_sid) == 34
    assert caller.call_sid.startswith("CA")
    assert form["AccountSid"] == ACCOUNT_SID
    assert (form["From"], form["To"]) == ("+14155550100", TO)
    assert (form["Caller"], form["Called"]) == ("+14155550100", TO)
    assert form["CallStatus"] == "ringing"
    assert form["ApiVersion"] == "2010-04-01"
    assert form["Direction"] == "inbound"
    assert answer.stream_url == STREAM_URL
    assert answer.status_callback == PUBLIC_URL + "/twilio/stream-status"
    assert answer.parameters == {"persona": "dental & co", "token": "tok-123"}
    assert answer.verbs == ["Connect"]


@pytest.mark.parametrize("signature", [Signature.WRONG, Signature.MISSING, "c2lnbmF0dXJl"])
async def test_forged_webhook_signatures_do_not_validate(serve, signature):
    role, make_caller = await serve()
    answer = await make_caller().dial(signature=signature)
    assert answer.status == 403
    assert [p.code for p in answer.problems] == [11200]
    assert answer.stream_url is None
    assert role.forms == []


async def test_extra_webhook_params_are_signed_too(serve):
    role, make_caller = await serve()
    answer = await make_caller().dial(extra_params={"StirVerstat": "TN-Validation-Passed-A"})
    assert answer.ok
    assert role.forms[0]["StirVerstat"] == "TN-Validation-Passed-A"


async def test_dial_records_an_apology_and_hangup(serve):
    twiml = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        "<Response><Say>Sorry, we cannot take your call.</Say><Hangup/></Response>"
    )
    _, make_caller = await serve(twiml=twiml)
    answer = await make_caller().dial()
    assert answer.ok
    assert answer.says == ["Sorry, we cannot take your call."]
    assert answer.hangup
    assert answer.stream_url is None
    assert answer.verbs == ["Say", "Hangup"]


async def test_dial_flags_what_twilio_would_refuse(serve):
    role, make_caller = await serve(twiml="\n<?xml version='1.0'?><Response/>")
    role.content_type = "text/plain"
    answer = await make_caller().dial()
    assert [p.code for p in answer.problems] == [12300, 12100]


async def test_dial_flags_a_plain_ws_stream_behind_an_https_webhook(serve):
    twiml = '<Response><Connect><Stream url="ws://voice.example.com/s" /></Connect></Response>'
    _, make_caller = await serve(twiml=twiml)
    answer = await make_caller().dial()
    assert [p.code for p in answer.problems] == [31922]


async def test_relative_stream_url_resolves_against_the_webhook(serve):
    twiml = '<Response><Connect><Stream url="/twilio/stream" /></Connect></Response>'
    _, make_caller = await serve(twiml=twiml)
    answer = await make_caller().dial()
    assert answer.ok
    assert answer.stream_url == STREAM_URL


async def test_stream_status_callback_is_signed(serve):
    role, make_caller = await serve()
    caller = make_caller()
    await caller.dial()
    assert await caller.post_stream_status("stream-started") == 204
    assert role.forms[-1]["StreamEvent"] == "stream-started"
    assert role.forms[-1]["StreamSid"] == caller.stream_sid


# -- the stream handshake and first messages --------------------------------------------------


async def test_connect_signs_the_wss_url_and_sends_connected_then_start(serve):
    role, caller = await connected_call(serve)

    assert caller.handshake_status == 101
    connected, start = role.inbound[:2]
    assert connected == {
        "event": "connected",
        "protocol": "Call",
        "version": "1.0.0",
        "_at": connected["_at"],
    }
    assert start["sequenceNumber"] == "1"
    assert start["streamSid"] == caller.stream_sid and caller.stream_sid.startswith("MZ")
    assert start["start"] == {
        "streamSid": caller.stream_sid,
        "accountSid": ACCOUNT_SID,
        "callSid": caller.call_sid,
        "tracks": ["inbound"],
        "customParameters": {"persona": "dental & co", "token": "tok-123"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }


@pytest.mark.parametrize("signature", [Signature.WRONG, Signature.MISSING])
async def test_forged_stream_signatures_are_rejected(serve, signature):
    role, make_caller = await serve()
    caller = make_caller()
    await caller.dial()
    with pytest.raises(StreamRejected) as rejected:
        await caller.connect(signature=signature)
    assert rejected.value.status == 403
    assert caller.handshake_status == 403
    assert not role.started.is_set()


async def test_signature_over_the_https_form_of_the_stream_url_is_rejected(serve):
    _, make_caller = await serve()
    caller = make_caller()
    await caller.dial()
    https_form = twilio_signature(AUTH_TOKEN, "https://voice.example.com/twilio/stream")
    with pytest.raises(StreamRejected):
        await caller.connect(signature=https_form)


async def test_tampered_start_reaches_the_server(serve):
    role, make_caller = await serve()
    caller = make_caller()
    await caller.dial()
    await caller.connect(
        custom_parameters={"persona": "evil", "token": "forged"},
        start_overrides={"callSid": "CA" + "f" * 32},
    )
    await asyncio.wait_for(role.started.wait(), 10)
    start = role.events("start")[0]["start"]
    assert start["customParameters"] == {"persona": "evil", "token": "forged"}
    assert start["callSid"] == "CA" + "f" * 32


# -- sending audio ----------------------------------------------------------------------------


async def test_play_sends_20ms_frames_with_string_counters(serve):
    role, caller = await connected_call(serve)
    sent_ms = await caller.play(pattern(1000) + b"\x00" * 30)  # 1000 ms + a short tail
    await caller.send_dtmf("7")
    await role.wait_inbound(lambda: len(role.events("dtmf")) == 1)

    media = role.events("media")
    assert sent_ms == 1020
    assert len(media) == 51
    assert [m["media"]["chunk"] for m in media] == [str(i) for i in range(1, 52)]
    assert [m["media"]["timestamp"] for m in media] == [str(20 * i) for i in range(51)]
    assert all(len(m["media"]["payload"]) == 216 for m in media)  # 160 bytes in base64
    assert {m["media"]["track"] for m in media} == {"inbound"}
    # sequenceNumber: "1" on start, then +1 for every message of any type (§2).
    numbered = [m for m in role.inbound if m["event"] != "connected"]
    assert [m["sequenceNumber"] for m in numbered] == [str(i) for i in range(1, 54)]
    assert role.events("dtmf")[0]["dtmf"] == {"track": "inbound_track", "digit": "7"}


async def test_paced_play_takes_real_time_scaled_by_speed(serve):
    speed = 4.0
    role, caller = await connected_call(serve, speed=speed)
    started = time.monotonic()
    await caller.play_silence(400)
    assert time.monotonic() - started >= 0.4 / speed - 0.005  # lower bound: never runs ahead
    await role.wait_inbound(lambda: len(role.events("media")) == 20)
    stamps = [int(m["media"]["timestamp"]) for m in role.events("media")]
    # The line was quiet since start: the first frame sits on the 20 ms grid of the call clock.
    assert stamps[0] % 20 == 0
    assert stamps == list(range(stamps[0], stamps[0] + 400, 20))
    # Each frame leaves only once its 20 ms of call time have passed (§2).
    for frame in role.events("media"):
        sent_at_call_ms = (frame["_at"] - caller.started_at) * 1000 * speed
        assert sent_at_call_ms >= int(frame["media"]["timestamp"]) + 20 - 1


async def test_queued_plays_are_back_to_back_and_gaps_jump_the_timestamp(serve):
    role, caller = await connected_call(serve, speed=4.0)
    # Queued together, the plays follow each other with no idle time between them.
    await asyncio.gather(caller.play(pattern(100)), caller.play_gap(200), caller.play(pattern(40)))
    stamps = [int(m["media"]["timestamp"]) for m in role.events("media")]
    relative = [t - stamps[0] for t in stamps]
    assert relative == [0, 20, 40, 60, 80, 300, 320]  # Twilio omitted 200 ms of silence (§2)


async def test_background_silence_and_speech_share_one_continuous_line(serve):
    role, caller = await connected_call(serve, speed=4.0)
    caller.start_background_silence()
    await role.wait_inbound(lambda: len(role.events("media")) >= 5)
    await caller.play(pattern(60, offset=7))
    await role.wait_inbound(lambda: len(role.events("media")) >= 12)
    caller.stop_background_silence()

    media = role.events("media")
    stamps = [int(m["media"]["timestamp"]) for m in media]
    assert {b - a for a, b in itertools.pairwise(stamps)} == {20}  # no gap, no overlap
    frames = [base64.b64decode(m["media"]["payload"]) for m in media]
    speech = [i for i, frame in enumerate(frames) if frame != b"\xff" * FRAME_BYTES]
    assert speech == list(range(speech[0], speech[0] + 3))  # 60 ms of speech, in one piece
    assert b"".join(frames[i] for i in speech) == pattern(60, offset=7)


async def test_background_silence_needs_a_paced_call(serve):
    _, caller = await connected_call(serve, speed=0)
    with pytest.raises(ValueError, match="paced"):
        caller.start_background_silence()


async def test_play_wav_streams_the_bundled_recording(serve):
    role, caller = await connected_call(serve)
    mulaw = read_wav_mulaw(CALLER_BOOKING_WAV)
    assert 3 * 8000 < len(mulaw) < 10 * 8000
    await caller.play_wav(CALLER_BOOKING_WAV)
    expected_frames = -(-len(mulaw) // FRAME_BYTES)
    await role.wait_inbound(lambda: len(role.events("media")) == expected_frames)


def test_read_wav_refuses_other_sample_rates(tmp_path):
    path = tmp_path / "wideband.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(b"\x00\x00" * 160)
    with pytest.raises(ValueError, match="16000 Hz"):
        read_wav_mulaw(path)


# -- playback: marks and clear (§3) -----------------------------------------------------------


async def test_marks_come_back_only_after_the_audio_before_them_played(serve):
    sent_at: dict[str, float] = {}

    async def script(role: ServerRole, ws: web.WebSocketResponse) -> None:
        await role.started.wait()
        sid = role.stream_sid
        await ws.send_str(outbound_media(sid, pattern(300)))
        await ws.send_str(outbound_media(sid, pattern(200, offset=1)))
        await ws.send_str(outbound_mark(sid, "first"))
        await ws.send_str(outbound_media(sid, pattern(500, offset=2)))
        sent_at["second"] = time.monotonic()
        await ws.send_str(outbound_mark(sid, "second"))

    speed = 4.0
    role, caller = await connected_call(serve, script, speed=speed)
    await role.wait_inbound(lambda: len(role.events("mark")) == 2)

    first, second = caller.mark_echoes
    assert (first.name, second.name) == ("first", "second")
    # In audio time: each mark comes back exactly when the audio queued before it has played.
    assert (first.played_ms, second.played_ms) == (500, 1000)
    assert not first.flushed and not second.flushed
    assert second.at_ms - first.at_ms == pytest.approx(500)
    # The echo's wall time can only be later than playback allows, never earlier.
    arrived = role.events("mark")[1]["_at"]
    assert arrived - sent_at["second"] >= 0.5 / speed - 0.005
    assert role.events("mark")[0]["mark"] == {"name": "first"}
    assert caller.heard_audio() == pattern(300) + pattern(200, offset=1) + pattern(500, offset=2)
    chunks = caller.heard
    assert [c.start_ms for c in chunks[1:]] == [c.end_ms for c in chunks[:-1]]  # no underrun
    assert caller.violations == []


async def test_a_mark_with_nothing_buffered_comes_back_at_once(serve):
    async def script(role: ServerRole, ws: web.WebSocketResponse) -> None:
        await role.started.wait()
        await ws.send_str(outbound_mark(role.stream_sid, "idle"))

    role, caller = await connected_call(serve, script, speed=1.0)
    await role.wait_inbound(lambda: len(role.events("mark")) == 1)
    echo = caller.mark_echoes[0]
    assert (echo.name, echo.played_ms, echo.flushed) == ("idle", 0, False)
    assert role.events("mark")[0]["streamSid"] == caller.stream_sid


async def test_clear_drops_buffered_audio_and_flushes_pending_marks(serve):
    async def script(role: ServerRole, ws: web.WebSocketResponse) -> None:
        await role.started.wait()
        sid = role.stream_sid
        await ws.send_str(outbound_media(sid, pattern(4000)))
        await ws.send_str(outbound_mark(sid, "a"))
        await ws.send_str(outbound_media(sid, pattern(2000, offset=3)))
        await ws.send_str(outbound_mark(sid, "b"))
        await role.go.wait()
        await ws.send_str(outbound_clear(sid))
        await ws.send_str(outbound_media(sid, pattern(200, offset=5)))
        await ws.send_str(outbound_mark(sid, "c"))

    role, caller = await connected_call(serve, script, speed=2.0)
    await caller.wait_until_heard_ms(200, timeout=10)
    role.go.set()
    await role.wait_inbound(lambda: len(role.events("mark")) == 3)

    (clear,) = caller.clears
    heard_at_clear = caller.heard[0]
    assert clear.flushed_marks == ("a", "b")
    assert heard_at_clear.audio == pattern(4000)[: len(heard_at_clear.audio)]
    assert 200 <= heard_at_clear.end_ms - heard_at_clear.start_ms < 4000
    assert clear.discarded_bytes + len(heard_at_clear.audio) == 6000 * BYTES_PER_MS
    a, b, c = caller.mark_echoes
    assert [e.name for e in (a, b, c)] == ["a", "b", "c"]
    assert a.flushed and b.flushed and not c.flushed
    assert a.played_ms == b.played_ms == len(heard_at_clear.audio) / BYTES_PER_MS
    # Audio after the clear plays in full, right away; its mark waits for it.
    assert c.played_ms == a.played_ms + 200
    assert caller.heard[-1].audio == pattern(200, offset=5)
    assert caller.heard[-1].start_ms >= clear.at_ms
    assert [m["mark"]["name"] for m in role.events("mark")] == ["a", "b", "c"]
    assert caller.violations == []


async def test_wait_until_quiet_waits_for_playback_to_finish(serve):
    async def script(role: ServerRole, ws: web.WebSocketResponse) -> None:
        await role.started.wait()
        await ws.send_str(outbound_media(role.stream_sid, pattern(400)))

    _, caller = await connected_call(serve, script, speed=4.0)
    await caller.wait_for_event("media")
    await caller.wait_until_quiet(100, timeout=10)
    assert caller.heard_ms() == 400
    assert caller.now_ms() - caller.heard[0].end_ms >= 0  # quiet only after it all played


async def test_more_than_ten_minutes_buffered_is_refused(serve):
    async def script(role: ServerRole, ws: web.WebSocketResponse) -> None:
        await role.started.wait()
        for n in range(4):
            await ws.send_str(outbound_media(role.stream_sid, bytes([n]) * 200_000 * BYTES_PER_MS))
        await ws.send_str(outbound_mark(role.stream_sid, "after"))

    _, caller = await connected_call(serve, script, speed=1.0)
    await caller.wait_for_event("mark", timeout=20)
    assert [v.code for v in caller.violations] == [31931]  # the 4th 200 s chunk (§3)
    assert caller.playback.buffered_ms(caller.now_ms()) <= 600_000
    assert caller.playback.pending_marks == ["after"]


async def test_unpaced_playback_is_instant(serve):
    async def script(role: ServerRole, ws: web.WebSocketResponse) -> None:
        await role.started.wait()
        await ws.send_str(outbound_media(role.stream_sid, pattern(60_000)))
        await ws.send_str(outbound_mark(role.stream_sid, "done"))

    role, caller = await connected_call(serve, script, speed=0)
    await role.wait_inbound(lambda: len(role.events("mark")) == 1)
    assert caller.mark_echoes[0].played_ms == 60_000
    assert caller.heard_ms() == 60_000
    await caller.wait_until_quiet(50, timeout=10)  # wall-clock quiet when unpaced


# -- protocol violations (31950 / 31951) ------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("not json", "invalid JSON"),
        ("[]", "not a JSON object"),
        ('{"event": "hello", "streamSid": "MZ1"}', "unknown event 'hello'"),
        ('{"event": "clear", "streamSid": "MZ2"}', "wrong streamSid"),
        ('{"event": "clear"}', "missing field(s) ['streamSid']"),
        ('{"event": "clear", "streamSid": "MZ1", "sequenceNumber": "1"}', "extra field"),
        ('{"event": "mark", "streamSid": "MZ1", "mark": {}}', "missing field(s) ['name']"),
        ('{"event": "mark", "streamSid": "MZ1", "mark": {"name": 3}}', "not a string"),
        ('{"event": "media", "streamSid": "MZ1", "media": "x"}', "not an object"),
        (
            '{"event": "media", "streamSid": "MZ1", "media": {"payload": "", "track": "x"}}',
            "extra field(s) ['track']",
        ),
        ('{"event": "media", "streamSid": "MZ1", "media": {"payload": "%%"}}', "not base64"),
    ],
)
def test_check_outbound_rejects_what_twilio_warns_about(frame, reason):
    message, problem = check_outbound(frame, "MZ1")
    assert message is None
    assert reason in problem


def test_check_outbound_accepts_the_exact_shapes():
    for frame in (
        outbound_media("MZ1", b"\xff" * 3),
        outbound_mark("MZ1", "m"),
        outbound_clear("MZ1"),
    ):
        message, problem = check_outbound(frame, "MZ1")
        assert problem is None and message is not None
    assert check_outbound(outbound_clear("MZ1"), None) == (None, "message sent before start")


async def test_violations_are_recorded_and_ignored(serve):
    async def script(role: ServerRole, ws: web.WebSocketResponse) -> None:
        await ws.send_str(outbound_mark("MZ-unknown", "too-early"))
        await role.started.wait()
        sid = role.stream_sid
        await ws.send_bytes(b"\xff" * 160)
        await ws.send_str(json.dumps({"event": "clear", "streamSid": sid, "sequenceNumber": "1"}))
        await ws.send_str(json.dumps({"event": "mark", "streamSid": "MZ" + "0" * 32, "mark": {}}))
        await ws.send_str(outbound_mark(sid, "valid"))

    role, make_caller = await serve(script, speed=1.0)
    caller = make_caller()
    await caller.dial()
    await caller.connect(send_start=False)
    await caller.wait_until(lambda: len(caller.received) == 1, 10, "the early frame")
    await caller.send_start()
    await role.wait_inbound(lambda: len(role.events("mark")) == 1)

    assert [(v.code, v.reason.split(":")[0]) for v in caller.violations] == [
        (31951, "message sent before start"),
        (31950, "binary frame"),
        (31951, "clear"),
        (31951, "mark"),
    ]
    assert caller.clears == []  # the invalid clear was ignored
    assert [e.name for e in caller.mark_echoes] == ["valid"]


# -- ending the stream ------------------------------------------------------------------------


async def test_hangup_sends_stop_then_closes(serve):
    role, caller = await connected_call(serve, speed=1.0)
    await caller.hangup()
    await asyncio.wait_for(role.closed.wait(), 10)
    stop = role.inbound[-1]
    assert stop["event"] == "stop"
    assert stop["stop"] == {"accountSid": ACCOUNT_SID, "callSid": caller.call_sid}
    assert role.close_code == 1000
    assert caller.closed and not caller.closed_by_server
    assert caller.ended_by == "hangup"


async def test_drop_closes_without_stop(serve):
    role, caller = await connected_call(serve, speed=1.0)
    await caller.drop()
    await asyncio.wait_for(role.closed.wait(), 10)
    assert role.events("stop") == []
    assert caller.closed and caller.ended_by == "drop"


async def test_abrupt_drop_closes_without_a_close_frame(serve):
    role, caller = await connected_call(serve, speed=1.0)
    await caller.drop(abrupt=True)
    await asyncio.wait_for(role.closed.wait(), 10)
    assert role.events("stop") == []
    assert role.close_code in (None, 1006)  # the connection was lost: no close frame, no code
    assert caller.closed and caller.ended_by == "drop"


async def test_without_frame_records_marks_and_heard_audio_are_still_kept(serve):
    async def script(role: ServerRole, ws: web.WebSocketResponse) -> None:
        await role.started.wait()
        await ws.send_str(outbound_media(role.stream_sid, pattern(100)))
        await ws.send_str(outbound_mark(role.stream_sid, "m"))

    role, caller = await connected_call(serve, script, speed=0, record_frames=False)
    await caller.play_silence(100)
    await role.wait_inbound(lambda: len(role.events("mark")) == 1)
    assert [m["event"] for m in caller.sent] == ["connected", "start", "mark"]
    assert [r.event for r in caller.received] == ["mark"]
    assert caller.heard_audio() == pattern(100)


async def test_media_trace_reports_each_frame_sent_and_received(serve):
    async def script(role: ServerRole, ws: web.WebSocketResponse) -> None:
        await role.started.wait()
        await ws.send_str(outbound_media(role.stream_sid, pattern(100)))
        await ws.send_str(outbound_mark(role.stream_sid, "m"))
        await ws.send_str(outbound_media(role.stream_sid, pattern(30)))

    trace: list[tuple[str, int]] = []
    role, caller = await connected_call(
        serve, script, record_frames=False, media_trace=lambda *event: trace.append(event)
    )
    await caller.play_gap(40)
    await caller.play_silence(60)
    await role.wait_inbound(lambda: len(role.events("media")) == 3)
    await caller.wait_until(lambda: len(trace) == 5, 10, "5 traced frames")
    sent = [value for kind, value in trace if kind == "sent"]
    assert sent == [int(m["media"]["timestamp"]) for m in role.events("media")] == [40, 60, 80]
    assert [value for kind, value in trace if kind == "received"] == [800, 240]


async def test_stop_from_twilio_drops_audio_still_buffered(serve):
    async def script(role: ServerRole, ws: web.WebSocketResponse) -> None:
        await role.started.wait()
        await ws.send_str(outbound_media(role.stream_sid, pattern(5000)))
        await ws.send_str(outbound_mark(role.stream_sid, "never"))

    role, caller = await connected_call(serve, script, speed=2.0)
    await caller.wait_until_heard_ms(100)
    await caller.receive_stop_from_twilio()
    await asyncio.wait_for(role.closed.wait(), 10)
    assert role.events("stop") and role.events("mark") == []
    assert caller.ended_by == "rest_update"
    heard = len(caller.heard_audio())
    assert 100 * BYTES_PER_MS <= heard < 5000 * BYTES_PER_MS
    assert heard + caller.playback.dropped_at_end_bytes == 5000 * BYTES_PER_MS


async def test_server_close_is_detected_with_its_code(serve):
    async def script(role: ServerRole, ws: web.WebSocketResponse) -> None:
        await role.started.wait()
        await ws.close(code=4000, message=b"bye")

    _, caller = await connected_call(serve, script, speed=1.0)
    await caller.wait_closed(timeout=10)
    assert caller.closed_by_server and caller.ended_by == "server"
    assert caller.close_code == 4000
    assert await caller.play_silence(100) == 0  # nothing more is sent after the close


async def test_without_connect_action_the_call_ends_with_the_stream(serve):
    async def script(role: ServerRole, ws: web.WebSocketResponse) -> None:
        await role.started.wait()
        await ws.close()

    _, caller = await connected_call(serve, script)
    ended = []
    caller.on_call_ended = lambda: ended.append(True)
    assert await caller.wait_call_over(timeout=10) is None  # no TwiML follows </Connect>
    assert caller.call_ended and ended == [True]


async def test_with_connect_action_twilio_asks_it_what_comes_next(serve):
    async def script(role: ServerRole, ws: web.WebSocketResponse) -> None:
        await role.started.wait()
        await ws.close()

    response = VoiceResponse()
    response.connect(action="/twilio/after?persona=dental%20co").stream(url=STREAM_URL)
    role, make_caller = await serve(script, twiml=str(response))
    after = VoiceResponse()
    after.say("Sorry, goodbye.")
    after.dial("+14155550111")
    role.after_twiml = str(after)
    caller = make_caller()
    await caller.dial()
    await caller.connect()
    answer = await caller.wait_call_over(timeout=10)
    assert answer is not None and answer.ok
    assert answer.says == ["Sorry, goodbye."] and answer.dials == ["+14155550111"]
    assert not caller.call_ended  # a <Dial> keeps the call up
    # Signed over the action URL as written (resolved against the webhook), with the standard
    # request parameters of the call.
    assert role.after_requests[0]["CallSid"] == caller.call_sid
    assert role.after_requests[0]["CallStatus"] == "in-progress"


async def test_write_heard_wav_round_trips(serve, tmp_path):
    async def script(role: ServerRole, ws: web.WebSocketResponse) -> None:
        await role.started.wait()
        await ws.send_str(outbound_media(role.stream_sid, b"\x00\x80\xff\x10" * 400))

    _, caller = await connected_call(serve, script, speed=0)
    await caller.wait_until_heard_ms(200)
    path = tmp_path / "heard.wav"
    caller.write_heard_wav(path)
    with wave.open(str(path)) as wav:
        assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (8000, 2, 1)
        assert wav.getnframes() == 1600
    assert read_wav_mulaw(path) == b"\x00\x80\xff\x10" * 400


def test_write_heard_wav_timeline_keeps_the_silences_between_chunks(tmp_path):
    caller = TwilioCaller("http://127.0.0.1:9", account_sid=ACCOUNT_SID, auth_token="t", to=TO)
    caller.playback.add_audio(b"\x00" * 8, now_ms=1)  # 1 ms at 1 ms
    caller.playback.add_audio(b"\x01" * 16, now_ms=5)  # 2 ms at 5 ms
    caller.playback.advance(10)
    caller.write_heard_wav(tmp_path / "timeline.wav", timeline=True)
    caller.write_heard_wav(tmp_path / "joined.wav")
    silence = b"\xff"
    expected = silence * 8 + b"\x00" * 8 + silence * 24 + b"\x01" * 16
    assert read_wav_mulaw(tmp_path / "timeline.wav") == expected
    assert read_wav_mulaw(tmp_path / "joined.wav") == b"\x00" * 8 + b"\x01" * 16
    write_mulaw_wav(tmp_path / "raw.wav", b"\x7e" * 8)
    assert read_wav_mulaw(tmp_path / "raw.wav") == b"\x7e" * 8


# -- the playback buffer on its own, with a hand-driven clock ---------------------------------


def test_playback_buffer_echoes_marks_at_their_audio_time():
    buffer = PlaybackBuffer()
    assert buffer.add_audio(b"\x01" * 800, now_ms=0) == []  # 100 ms
    assert buffer.add_mark("m1", now_ms=10) == []
    assert buffer.add_audio(b"\x02" * 400, now_ms=20) == []  # 50 ms more
    assert buffer.add_mark("m2", now_ms=30) == []
    assert buffer.advance(99.9) == []
    assert buffer.heard_ms(50) == 50
    (m1,) = buffer.advance(100)
    assert (m1.name, m1.at_ms, m1.played_ms) == ("m1", 100, 100)
    (m2,) = buffer.advance(1000)
    assert (m2.name, m2.at_ms, m2.played_ms) == ("m2", 150, 150)
    # Audio arriving after an underrun starts when it arrives, not back to back.
    buffer.add_audio(b"\x03" * 8, now_ms=2000)
    buffer.advance(3000)
    assert [c.start_ms for c in buffer.heard] == [0, 100, 2000]


def test_playback_buffer_clear_keeps_what_was_heard():
    buffer = PlaybackBuffer()
    buffer.add_audio(bytes(range(160)), now_ms=0)  # 20 ms
    buffer.add_mark("m1", now_ms=0)
    buffer.add_audio(b"\x09" * 160, now_ms=0)
    buffer.add_mark("m2", now_ms=0)
    echoes = buffer.clear(now_ms=12.5)
    assert [(e.name, e.flushed, e.played_ms) for e in echoes] == [
        ("m1", True, 12.5),
        ("m2", True, 12.5),
    ]
    assert buffer.heard_audio(100) == bytes(range(100))
    (record,) = buffer.clears
    assert (record.at_ms, record.discarded_bytes, record.flushed_marks) == (12.5, 220, ("m1", "m2"))
    assert buffer.buffered_ms(12.5) == 0
    (late,) = buffer.add_mark("m3", now_ms=13)  # nothing buffered: echoed at once
    assert not late.flushed


def test_playback_buffer_clear_after_everything_played_flushes_nothing():
    buffer = PlaybackBuffer()
    buffer.add_audio(b"\x01" * 80, now_ms=0)
    assert buffer.add_mark("m", now_ms=0) == []
    (echo,) = buffer.advance(10)
    assert not echo.flushed
    assert buffer.clear(now_ms=20) == []
    assert buffer.clears[0].discarded_bytes == 0


def test_playback_buffer_stop_drops_the_rest():
    buffer = PlaybackBuffer()
    buffer.add_audio(b"\x01" * 800, now_ms=0)
    buffer.add_mark("m", now_ms=0)
    buffer.stop(now_ms=25)
    assert len(buffer.heard_audio(25)) == 200
    assert buffer.dropped_at_end_bytes == 600
    assert buffer.pending_marks == []
