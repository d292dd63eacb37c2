"""A scripted Twilio caller: plays Twilio's side of one phone call against a server on loopback.

It is written from the protocol reference (``shared/reference/twilio-media-streams.md``, cited
below as §n), not from phoneagent's own code, so that it catches the product's bugs instead of
mirroring them. What it does, in Twilio's place:

1. :meth:`TwilioCaller.dial` POSTs the signed voice webhook and reads the TwiML answer (§1).
2. :meth:`TwilioCaller.connect` opens the signed media-stream WebSocket and sends ``connected``
   and ``start`` (§2, §4.3).
3. ``play*`` / :meth:`~TwilioCaller.send_dtmf` stream the caller's side as Twilio does: 20 ms
   μ-law frames, paced in real time scaled by ``speed`` (§2).
4. Everything the server sends goes through a model of Twilio's playback buffer
   (:class:`PlaybackBuffer`, §3): audio "plays" at 8 bytes per ms of call time, marks come back
   when the audio queued before them has played, ``clear`` drops the rest and flushes the marks.
   Frames Twilio would reject are recorded as :class:`ProtocolViolation` (warnings 31950/31951).
5. :meth:`~TwilioCaller.hangup`, :meth:`~TwilioCaller.drop` and
   :meth:`~TwilioCaller.receive_stop_from_twilio` end the stream the three ways Twilio does.

Time. The *call clock* counts milliseconds of call time since ``start``: wall time × ``speed``
(``speed=2`` runs a call twice as fast as real time). With ``speed=0`` (or ``None``) nothing is
paced: inbound audio is sent as fast as possible, the call clock is the amount of inbound audio
sent so far, and outbound audio plays out the moment it arrives. Tests should assert on
call-clock positions and byte counts (what the caller *heard*), never on wall-clock durations.

Example::

    async with TwilioCaller(base_url, account_sid=SID, auth_token=TOKEN, to="+15550001111") as c:
        answer = await c.dial()
        assert answer.stream_url
        await c.connect()
        await c.play_wav(CALLER_BOOKING_WAV)
        await c.wait_until_quiet(800, timeout=30)
        await c.hangup()
    assert not c.violations
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import socket
import time
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp
from yarl import URL

from phoneagent.testing.playback_buffer import ClearRecord, HeardChunk, MarkEcho, PlaybackBuffer
from phoneagent.testing.twilio_messages import (
    BYTES_PER_MS,
    DTMF_DIGITS,
    FRAME_BYTES,
    FRAME_MS,
    MAX_BUFFERED_MS,
    MULAW_SILENCE,
    WARNING_BINARY_FRAME,
    WARNING_BUFFER_FULL,
    WARNING_INVALID_MESSAGE,
    check_outbound,
)
from phoneagent.testing.twilio_sids import new_sid
from phoneagent.testing.twilio_signing import SharedKey, Signature, signature_headers
from phoneagent.testing.twiml_reader import TwimlAnswer, parse_twiml_answer
from phoneagent.testing.wav import read_wav_mulaw, write_mulaw_wav

__all__ = [
    "CallClock",
    "Microphone",
    "ProtocolViolation",
    "ReceivedMessage",
    "StreamRejected",
    "TwilioCaller",
]

# Twilio's CallToken is JSON: its quotes, colons and brackets exercise form decoding + signing.
_CALL_TOKEN = '{"parentCallInfoToken":"eyJhbGciOiJFUzI1NiJ9.e30.c2ln","identityHeaderTokens":[]}'

CLOSE_TIMEOUT = 5.0  # seconds to wait for the server's close frame after ours


@dataclass(frozen=True)
class ProtocolViolation:
    """A server→Twilio frame Twilio would warn about (31950 binary, 31951 invalid, 31931 full)."""

    code: int
    reason: str
    raw: str | bytes
    at_ms: float


@dataclass(frozen=True)
class ReceivedMessage:
    """One frame from the server: when it arrived, its text, and the parsed message if valid."""

    at: float  # time.monotonic()
    at_ms: float  # call clock
    raw: str | bytes
    message: dict[str, Any] | None
    violation: str | None

    @property
    def event(self) -> str | None:
        return self.message.get("event") if self.message else None


class StreamRejected(Exception):
    """The server refused the WebSocket handshake (Twilio would log 31920, §4.3)."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(f"stream handshake rejected with HTTP {status} {message}".strip())
        self.status = status


@dataclass
class _PlayJob:
    audio: bytes = b""
    gap_ms: int = 0
    sent: int = 0
    done: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def next_frame(self) -> bytes:
        frame = self.audio[self.sent : self.sent + FRAME_BYTES]
        self.sent += len(frame)
        # A short last frame is padded with silence: Twilio's frames are whole 20 ms (§2).
        return frame.ljust(FRAME_BYTES, MULAW_SILENCE)

    @property
    def finished(self) -> bool:
        return self.sent >= len(self.audio)


class CallClock:
    """Call time in ms since ``start``: wall time × ``speed``.

    Unpaced (``speed`` 0) nothing waits for the wall clock: call time is then the amount of
    inbound audio sent so far (:attr:`inbound_ms`, which the microphone advances).
    """

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self.started_at: float | None = None  # time.monotonic() when start was sent
        self.inbound_ms = 0  # stream position of the next inbound frame: its media.timestamp

    def start(self) -> None:
        self.started_at = time.monotonic()

    def now_ms(self) -> float:
        if self.started_at is None:
            return 0.0
        if not self.speed:
            return float(self.inbound_ms)
        return (time.monotonic() - self.started_at) * 1000.0 * self.speed

    def wall_delay(self, call_ms: float) -> float:
        """Wall-clock seconds until the clock reads ``call_ms`` (0 when unpaced)."""
        if not self.speed or self.started_at is None:
            return 0.0
        return self.started_at + call_ms / 1000.0 / self.speed - time.monotonic()

    async def sleep_until(self, call_ms: float) -> None:
        if not self.speed:
            await asyncio.sleep(0)  # unpaced: still let the other side run
            return
        # An absolute deadline, re-checked because a sleep may end a hair early.
        while (delay := self.wall_delay(call_ms)) > 0:
            await asyncio.sleep(delay)


class Microphone:
    """The caller's side of the line (§2): 20 ms frames paced on absolute call-clock deadlines.

    Plays and gaps queue up and follow each other back to back; with background silence on,
    silence fills the line whenever nothing is queued, as a real phone line does. ``send_frame``
    sends one frame with the given timestamp and returns False once the stream is gone.
    """

    def __init__(
        self, clock: CallClock, send_frame: Callable[[bytes, int], Awaitable[bool]]
    ) -> None:
        self._clock = clock
        self._send_frame = send_frame
        self._jobs: deque[_PlayJob] = deque()
        self._background = False
        self._stopped = False
        self._wake = asyncio.Event()

    async def queue(self, job: _PlayJob) -> int:
        """Queue a play or gap; return its length in ms once it has been sent (or cut short)."""
        if self._stopped:
            return 0
        self._jobs.append(job)
        self._wake.set()
        return await job.done

    def set_background(self, on: bool) -> None:
        self._background = on
        self._wake.set()

    def stop(self) -> None:
        """Stop for good: pending plays return what they sent so far."""
        self._stopped = True
        self._background = False
        while self._jobs:
            job = self._jobs.popleft()
            if not job.done.done():
                job.done.set_result(math.ceil(job.sent / FRAME_BYTES) * FRAME_MS)
        self._wake.set()

    async def run(self) -> None:
        clock = self._clock
        idle = True
        while not self._stopped:
            job = self._jobs[0] if self._jobs else None
            if job is None and not self._background:
                idle = True
                self._wake.clear()
                await self._wake.wait()
                continue
            if idle:
                # Resuming after the line was quiet: timestamps follow the call clock, so the
                # pause shows up as a gap, as when Twilio omits silence (§2). Whole frames only:
                # queued plays stay back to back, and timestamps stay on the 20 ms grid.
                quiet_frames = max(0, math.floor((clock.now_ms() - clock.inbound_ms) / FRAME_MS))
                clock.inbound_ms += quiet_frames * FRAME_MS
                idle = False
            if job is not None and job.gap_ms:
                clock.inbound_ms += job.gap_ms
                await clock.sleep_until(clock.inbound_ms)
                self._finish(job, job.gap_ms)
                continue
            frame = job.next_frame() if job is not None else MULAW_SILENCE * FRAME_BYTES
            # A frame leaves once its 20 ms have been captured.
            await clock.sleep_until(clock.inbound_ms + FRAME_MS)
            if not await self._send_frame(frame, clock.inbound_ms):
                self.stop()
                return
            clock.inbound_ms += FRAME_MS
            if job is not None and job.finished:
                self._finish(job, math.ceil(len(job.audio) / FRAME_BYTES) * FRAME_MS)

    def _finish(self, job: _PlayJob, ms: int) -> None:
        self._jobs.popleft()
        if not job.done.done():
            job.done.set_result(ms)


class TwilioCaller:
    """Plays Twilio's role for one call: voice webhook, media stream, playback, hang-up.

    :param base_url: where to send HTTP, e.g. ``http://127.0.0.1:8080``.
    :param public_url: the URL Twilio would use (and sign); defaults to ``base_url``. Stream URLs
        on this host are connected to on ``base_url`` instead but signed as written (§4.3, §4.4).
    :param shared_key: sign every request with this Webhook Rule SharedKey instead of the
        auth token, as Twilio does when a rule matches the URL.
    :param speed: call time per wall time; 1.0 is real time, 0 or None is as fast as possible.
    :param voice_path: the voice webhook path under the public URL.
    :param record_frames: keep every media frame in :attr:`sent` and :attr:`received`; False
        keeps a load generator's memory flat (marks, clears, violations and heard audio are
        always kept).
    :param media_trace: called as ``media_trace("sent", timestamp_ms)`` just before each
        inbound ``media`` frame is written, and ``media_trace("received", n)`` as each valid
        ``media`` frame of *n* μ-law bytes from the server goes into the playback buffer
        (latency benchmarks read the clock in it). None: off.
    """

    def __init__(
        self,
        base_url: str,
        *,
        account_sid: str,
        auth_token: str,
        to: str,
        from_: str = "+14155550123",
        call_sid: str | None = None,
        public_url: str | None = None,
        shared_key: SharedKey | None = None,
        speed: float | None = 1.0,
        voice_path: str = "/twilio/voice",
        session: aiohttp.ClientSession | None = None,
        record_frames: bool = True,
        media_trace: Callable[[str, int], None] | None = None,
    ) -> None:
        if speed is not None and speed < 0:
            raise ValueError("speed must be >= 0 (0 or None: as fast as possible)")
        self.base_url = base_url.rstrip("/")
        self.public_url = (public_url or base_url).rstrip("/")
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.shared_key = shared_key
        self.to = to
        self.from_ = from_
        self.call_sid = call_sid or new_sid("CA")
        # Twilio's Direction: "outbound-api" once the call is one placed through the API that was
        # picked up (:meth:`pick_up`); every later request of the call says so.
        self.direction = "inbound"
        self.stream_sid = new_sid("MZ")
        self.speed = speed or 0.0
        self.voice_path = voice_path
        self.record_frames = record_frames
        self.media_trace = media_trace
        self._session = session
        self._owns_session = session is None

        self.answer: TwimlAnswer | None = None
        self.handshake_status: int | None = None
        self.received: list[ReceivedMessage] = []
        self.sent: list[dict[str, Any] | str] = []
        self.mark_echoes: list[MarkEcho] = []
        self.violations: list[ProtocolViolation] = []
        self.playback = PlaybackBuffer(instant=not self.speed)
        self.close_code: int | None = None
        self.closed_by_server = False
        self.ended_by: str | None = None  # "hangup", "drop", "rest_update", "server"
        # What Twilio ran once the stream was over (the TwiML of a REST update, or the answer of
        # `<Connect action>`), and whether the call itself has ended (§1.3 `<Connect>`, §5.1).
        self.after_stream: TwimlAnswer | None = None
        self.call_ended = False
        # Called once when the call ends on Twilio's side (FakeTwilioApi.attach sets it, so a
        # REST update after that is refused as for a real call that is over).
        self.on_call_ended: Callable[[], None] | None = None
        self._continuation: asyncio.Task[None] | None = None

        self.clock = CallClock(self.speed)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._seq = 0
        self._chunk = 0
        self._microphone = Microphone(self.clock, self._send_media)
        self._send_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._closed = asyncio.Event()
        self._last_media_ms = 0.0  # call clock, and monotonic time, of the last server audio
        self._last_media_at = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> TwilioCaller:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Hang up if the stream is still open, and release the HTTP session."""
        if self._ws is not None and not self.closed:
            await self.hangup()
        if self._continuation is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._continuation, CLOSE_TIMEOUT)
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    # -- the voice webhook (§1) ---------------------------------------------------------------

    def webhook_params(self, call_status: str = "ringing") -> dict[str, str]:
        """The form fields Twilio sends with a voice request for this call (§1.1).

        Geo fields and ``CallToken`` are included because Twilio sends them too: a server that
        signs only the fields it knows about fails here as it would in production (§1.1, §4.1).
        """
        return {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": self.call_sid,
            "CallStatus": call_status,
            "CallToken": _CALL_TOKEN,
            "Called": self.to,
            "CalledCity": "",
            "CalledCountry": "US",
            "CalledState": "CA",
            "CalledZip": "",
            "Caller": self.from_,
            "CallerCity": "SAN FRANCISCO",
            "CallerCountry": "US",
            "CallerState": "CA",
            "CallerZip": "94107",
            "Direction": self.direction,
            "From": self.from_,
            "FromCity": "SAN FRANCISCO",
            "FromCountry": "US",
            "FromState": "CA",
            "FromZip": "94107",
            "To": self.to,
            "ToCity": "",
            "ToCountry": "US",
            "ToState": "CA",
            "ToZip": "",
        }

    async def dial(
        self,
        *,
        signature: Signature | str = Signature.VALID,
        extra_params: Mapping[str, str] | None = None,
    ) -> TwimlAnswer:
        """POST the voice webhook as Twilio does and read the TwiML answer (§1).

        ``extra_params`` adds or overrides form fields (Twilio adds fields without notice).
        The answer is also kept as :attr:`answer`.
        """
        params = {**self.webhook_params(), **(extra_params or {})}
        status, content_type, body = await self.post_signed(self.voice_path, params, signature)
        self.answer = parse_twiml_answer(
            status, content_type, body, request_url=self.public_url + self.voice_path
        )
        return self.answer

    async def pick_up(
        self,
        url: str,
        answered_by: str | None = None,
        *,
        signature: Signature | str = Signature.VALID,
    ) -> TwimlAnswer:
        """An outbound call (placed through the Calls API) was answered: Twilio requests its
        ``Url`` as it requests a voice webhook, with ``Direction=outbound-api`` (``From`` is the
        business's number, ``To`` the callee's) and, with answering machine detection,
        ``AnsweredBy``. The TwiML answer becomes :attr:`answer`."""
        self.direction = "outbound-api"
        params = self.webhook_params("in-progress")
        if answered_by is not None:
            params["AnsweredBy"] = answered_by
        status, content_type, body = await self.post_to(url, params, signature)
        self.answer = parse_twiml_answer(status, content_type, body, request_url=url)
        return self.answer

    async def post_signed(
        self,
        path: str,
        params: Mapping[str, str],
        signature: Signature | str = Signature.VALID,
    ) -> tuple[int, str | None, str]:
        """POST a form-encoded, signed Twilio webhook to ``path``; return status, type, body.

        Used for the voice webhook and for status callbacks (§1.1, §1.3, §6): the signature is
        computed over the public URL, the request goes to the base URL. ``path`` may carry a
        query string: it is signed and sent byte for byte as given (see :meth:`post_to`).
        """
        return await self.post_to(self.public_url + path, params, signature)

    async def post_to(
        self,
        url: str,
        params: Mapping[str, str],
        signature: Signature | str = Signature.VALID,
    ) -> tuple[int, str | None, str]:
        """POST a signed Twilio webhook to ``url`` exactly as written in the TwiML (an
        ``action`` or ``statusCallback`` attribute, XML-unescaped); return status, type, body.

        Twilio signs "the full URL … still URL-encoded" and requests that same URL (§4.1;
        twilio.com/docs/usage/webhooks/webhooks-security; error 57012: "keep any query
        parameters URL-encoded"), so neither the signed string nor the bytes on the wire are
        decoded or re-encoded (``client%3Aalice`` stays so). A URL on the public host goes to
        the base URL, like the stream (§4.4).
        """
        headers = {
            "User-Agent": "TwilioProxy/1.1",
            "Accept": "*/*",
            "I-Twilio-Idempotency-Token": str(uuid.uuid4()),
            **signature_headers(
                signature, self.auth_token, url, params, shared_key=self.shared_key
            ),
        }
        target = URL(self._on_base_url(url), encoded=True)  # aiohttp would requote otherwise
        async with self._http().post(target, data=dict(params), headers=headers) as r:
            # Twilio gives up after 15 s (§1.2); a test that hits this has found a slow server.
            return r.status, r.headers.get("Content-Type"), await r.text()

    async def request_dial_action(
        self,
        twiml: str,
        dial_call_status: str = "no-answer",
        signature: Signature | str = Signature.VALID,
    ) -> TwimlAnswer:
        """Twilio's request to the ``<Dial action>`` of ``twiml`` once the dialled leg ended,
        with the call's fields and ``DialCallStatus`` (§5.2); the TwiML answer becomes
        :attr:`answer`. A transfer nobody answered: ``no-answer``, ``busy`` or ``failed``."""
        dial = ET.fromstring(twiml).find("Dial")
        action = dial.get("action") if dial is not None else None
        if not action:
            raise ValueError("the TwiML has no <Dial action>")
        params = self.webhook_params("in-progress") | {
            "DialCallStatus": dial_call_status,
            "DialCallSid": new_sid("CA"),
            "DialCallDuration": "0",
        }
        status, content_type, body = await self.post_to(action, params, signature)
        self.answer = parse_twiml_answer(status, content_type, body, request_url=action)
        return self.answer

    async def post_stream_status(
        self, event: str = "stream-started", error: str | None = None
    ) -> int:
        """POST the ``<Stream statusCallback>`` as Twilio does (§1.3); return the HTTP status."""
        url = self.answer.status_callback if self.answer else None
        if not url:
            raise RuntimeError("the TwiML answer has no <Stream statusCallback>")
        params = {
            "AccountSid": self.account_sid,
            "CallSid": self.call_sid,
            "StreamSid": self.stream_sid,
            "StreamName": self.stream_sid,
            "StreamEvent": event,
            "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if error is not None:
            params["StreamError"] = error
        status, _, _ = await self.post_to(urljoin(self.public_url, url), params)
        return status

    # -- the media stream (§2, §4.3) ----------------------------------------------------------

    async def connect(
        self,
        *,
        signature: Signature | str = Signature.VALID,
        custom_parameters: Mapping[str, str] | None = None,
        start_overrides: Mapping[str, Any] | None = None,
        send_start: bool = True,
    ) -> None:
        """Open the stream WebSocket from the TwiML and send ``connected`` and ``start``.

        The signature covers the stream URL exactly as written in the TwiML, with no params
        (§4.3). Forgery for security tests: ``signature``; ``custom_parameters`` replaces the
        TwiML ``<Parameter>`` values; ``start_overrides`` overrides fields of ``start.start``
        (e.g. ``{"callSid": "CA…"}``). Raises :class:`StreamRejected` if the handshake fails.
        """
        if self.answer is None or self.answer.stream_url is None:
            raise RuntimeError("no <Connect><Stream> to connect to: dial() first")
        signed_url = self.answer.stream_url
        headers = signature_headers(
            signature,
            self.auth_token,
            signed_url,
            header="x-twilio-signature",
            shared_key=self.shared_key,
        )  # §4.3: on the WebSocket the header name is all lowercase
        try:
            self._ws = await self._http().ws_connect(self._on_base_url(signed_url), headers=headers)
        except aiohttp.WSServerHandshakeError as exc:
            self.handshake_status = exc.status
            raise StreamRejected(exc.status, exc.message) from exc
        self.handshake_status = 101
        self._spawn(self._read_loop())
        await self._send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        if send_start:
            await self.send_start(custom_parameters, start_overrides)

    async def send_start(
        self,
        custom_parameters: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        """Send ``start`` (done by :meth:`connect` unless ``send_start=False``)."""
        params = self.answer.parameters if custom_parameters is None else custom_parameters
        start = {
            "streamSid": self.stream_sid,
            "accountSid": self.account_sid,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "customParameters": dict(params) if params is not None else {},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            **(overrides or {}),
        }
        async with self._send_lock:
            self.clock.start()
            await self._send_event("start", {"start": start})
        self._spawn(self._playout_loop())
        self._spawn(self._microphone.run())

    def _on_base_url(self, signed_url: str) -> str:
        """Where to send a request for ``signed_url``: on the base URL when it names the public
        URL (a proxy or tunnel sits between), the rest of the path and the query untouched."""
        target, public, base = (
            urlsplit(signed_url),
            urlsplit(self.public_url),
            urlsplit(self.base_url),
        )
        if target.netloc != public.netloc or not target.path.startswith(public.path):
            return signed_url
        scheme = base.scheme
        if target.scheme in ("ws", "wss"):
            scheme = "wss" if base.scheme == "https" else "ws"
        path = base.path + target.path[len(public.path) :]
        return urlunsplit((scheme, base.netloc, path, target.query, ""))

    # -- sending (caller → server) ------------------------------------------------------------

    async def play(self, mulaw: bytes) -> int:
        """Send μ-law audio as 20 ms ``media`` frames, paced by ``speed``; return ms sent.

        Returns when the last frame is sent (or the stream ended). Calls queue up in order.
        """
        return await self._queue(_PlayJob(audio=bytes(mulaw)))

    async def play_silence(self, ms: int) -> int:
        """Send ``ms`` of μ-law silence."""
        return await self.play(MULAW_SILENCE * (ms * BYTES_PER_MS))

    async def play_wav(self, path: str | Path) -> int:
        """Send an 8 kHz 16-bit mono WAV file (other formats are refused with a clear error)."""
        return await self.play(read_wav_mulaw(path))

    async def play_gap(self, ms: int) -> int:
        """Let ``ms`` of call time pass without sending media.

        Twilio omits silent audio on some calls, so ``media.timestamp`` jumps (§2: gaps happen).
        """
        return await self._queue(_PlayJob(gap_ms=ms))

    def start_background_silence(self) -> None:
        """Stream silence whenever nothing else is playing, as a real phone line does (§2)."""
        if not self.speed:
            raise ValueError("background silence needs a paced call (speed > 0)")
        self._microphone.set_background(True)

    def stop_background_silence(self) -> None:
        self._microphone.set_background(False)

    async def _queue(self, job: _PlayJob) -> int:
        if not self.started and not self.closed:
            raise RuntimeError("the stream has not started: connect() first")
        return await self._microphone.queue(job)

    async def send_dtmf(self, digit: str) -> None:
        """Send a ``dtmf`` message (a keypress; bidirectional streams only, §2)."""
        if digit not in DTMF_DIGITS:
            raise ValueError(f"not a DTMF digit: {digit!r}")
        async with self._send_lock:
            await self._send_event("dtmf", {"dtmf": {"track": "inbound_track", "digit": digit}})

    async def send_raw(self, data: str | bytes) -> None:
        """Send a frame as is (garbage, binary, out-of-order messages: for robustness tests)."""
        ws = self._require_ws()
        async with self._send_lock:
            self.sent.append(data if isinstance(data, str) else repr(data))
            if isinstance(data, bytes):
                await ws.send_bytes(data)
            else:
                await ws.send_str(data)

    # -- ending the stream --------------------------------------------------------------------

    async def hangup(self) -> None:
        """The caller hangs up: Twilio sends ``stop``, then closes the socket (§7)."""
        await self._end("hangup", send_stop=True)
        self.end_call()

    async def receive_stop_from_twilio(self) -> None:
        """The call's TwiML was replaced by a REST update: ``stop``, then close (§5.1, §7).

        Audio still buffered is dropped unheard (§5.1).
        """
        await self._end("rest_update", send_stop=True)

    async def drop(self, *, abrupt: bool = False) -> None:
        """Close the socket without ``stop``.

        ``abrupt=True`` shuts the TCP connection without a WebSocket close frame, as when Twilio's
        side vanishes: the server sees an abnormal closure (1006), not a close code.
        """
        await self._end("drop", send_stop=False, abrupt=abrupt)

    async def _end(self, reason: str, *, send_stop: bool, abrupt: bool = False) -> None:
        if self._ws is None or self.ended_by is not None:
            return
        self.ended_by = reason
        self._microphone.stop()
        async with self._send_lock:
            self.playback.stop(self.now_ms())
            if send_stop and self.started:
                stop = {"accountSid": self.account_sid, "callSid": self.call_sid}
                with contextlib.suppress(ConnectionError):
                    await self._send_event("stop", {"stop": stop})
        if abrupt:
            with contextlib.suppress(OSError):
                self._ws.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            await asyncio.wait_for(self._ws.close(), CLOSE_TIMEOUT)
        self._finalize()

    def _finalize(self) -> None:
        if self.closed:
            return
        self.close_code = self._require_ws().close_code
        self._microphone.stop()
        self._closed.set()
        self._notify()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    # -- receiving (server → caller) ----------------------------------------------------------

    async def _read_loop(self) -> None:
        ws = self._require_ws()
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    await self._on_text(msg.data)
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    self._record(msg.data, None, "binary frame", WARNING_BINARY_FRAME)
                    self._notify()
        finally:
            # When we end the stream, _end() finalizes after its close handshake instead.
            if self.ended_by is None:
                self.ended_by = "server"
                self.closed_by_server = True
                self.playback.stop(self.now_ms())
                self._finalize()
                self._continuation = asyncio.create_task(self._continue_after_stream())

    # -- after the stream (§1.3 `<Connect>` semantics, §5.1, §7) ------------------------------

    async def _continue_after_stream(self) -> None:
        """The server closed the stream while the call was up: Twilio goes on with the call's
        TwiML. With ``<Connect action>`` it requests the action URL (Twilio's standard request
        parameters, signed) and runs the TwiML it answers; without one it moves on to the verbs
        after ``</Connect>``, and with none the call ends (twilio.com/docs/voice/twiml/connect,
        "action"). A server that closes the stream and only then asks for something else by
        REST has lost the call."""
        answer = self.answer
        if answer is None or answer.connect_action is None:
            self.end_call()  # our TwiML never has verbs after </Connect>: the call is over
            return
        action = urljoin(self.public_url + self.voice_path, answer.connect_action)
        parts = urlsplit(action)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            status, content_type, body = await self.post_signed(
                path, self.webhook_params(call_status="in-progress")
            )
        except (aiohttp.ClientError, OSError):
            status, content_type, body = 502, None, ""
        self._run_instead(parse_twiml_answer(status, content_type, body, request_url=action))

    def run_instead(self, twiml: str) -> None:
        """The call's TwiML was replaced by a REST update (§5.1): record what the caller gets."""
        url = self.public_url + self.voice_path
        self._run_instead(parse_twiml_answer(200, "text/xml", twiml, request_url=url))

    def _run_instead(self, answer: TwimlAnswer) -> None:
        # An action that fails (HTTP error, bad TwiML) ends the call, as Twilio does after
        # logging error 11200/12100 (§1.2): the caller hears nothing more.
        self.after_stream = answer
        if not answer.ok or not answer.keeps_call:
            self.end_call()
        self._notify()

    def end_call(self) -> None:
        """The call is over on Twilio's side (hung up, completed, or nothing followed)."""
        if self.call_ended:
            return
        self.call_ended = True
        self._notify()
        if self.on_call_ended is not None:
            self.on_call_ended()

    async def wait_call_over(self, timeout: float = 10.0) -> TwimlAnswer | None:
        """Wait until the stream is over and Twilio has run what follows it (or the call ended);
        return that TwiML (None: nothing followed, the call just ended)."""
        await self.wait_until(
            lambda: self.closed and (self.after_stream is not None or self.call_ended),
            timeout,
            "the call to go on after the stream, or end",
        )
        return self.after_stream

    async def _on_text(self, text: str) -> None:
        async with self._send_lock:
            message, problem = check_outbound(text, self.stream_sid if self.started else None)
            self._record(text, message, problem, WARNING_INVALID_MESSAGE)
            # Invalid frames are ignored (§3); after stop the stream is gone, so nothing plays.
            if message is not None and self.ended_by is None:
                await self._echo(self._apply(message, text))
        self._notify()

    def _apply(self, message: dict[str, Any], text: str) -> list[MarkEcho]:
        """Hand one valid server message to the playback buffer; return marks to echo."""
        now = self.now_ms()
        event = message["event"]
        if event == "mark":
            return self.playback.add_mark(message["mark"]["name"], now)
        if event == "clear":
            return self.playback.clear(now)
        audio = base64.b64decode(message["media"]["payload"])
        if self.playback.buffered_ms(now) + len(audio) / BYTES_PER_MS > MAX_BUFFERED_MS:
            self.violations.append(
                ProtocolViolation(WARNING_BUFFER_FULL, "over 10 minutes buffered", text, now)
            )
            return []
        self._last_media_ms, self._last_media_at = now, time.monotonic()
        if self.media_trace is not None:
            self.media_trace("received", len(audio))
        return self.playback.add_audio(audio, now)

    def _record(
        self, raw: str | bytes, message: dict[str, Any] | None, problem: str | None, code: int
    ) -> None:
        now = self.now_ms()
        if self.record_frames or message is None or message["event"] != "media":
            self.received.append(ReceivedMessage(time.monotonic(), now, raw, message, problem))
        if problem is not None:
            self.violations.append(ProtocolViolation(code, problem, raw, now))

    async def _echo(self, echoes: list[MarkEcho]) -> None:
        """Send mark echoes (caller holds the send lock, so echoes keep playback order)."""
        for echo in echoes:
            with contextlib.suppress(ConnectionError):
                await self._send_event("mark", {"mark": {"name": echo.name}})
            self.mark_echoes.append(replace(echo, at=time.monotonic()))

    async def _playout_loop(self) -> None:
        """Echo marks as the playback clock reaches them (§3)."""
        while not self.closed:
            due = self.playback.next_due_ms()
            delay = None if due is None else self.clock.wall_delay(due)
            if delay is None or delay > 0:
                # Sleep until the next item is due, but re-check on any change: a clear and new
                # audio can make something due earlier than what we were waiting for.
                await self._wait_changed(delay)
                continue
            async with self._send_lock:
                if self.ended_by is None:
                    await self._echo(self.playback.advance(self.now_ms()))
            self._notify()

    # -- sending (the microphone's frames, every other message) -------------------------------

    async def _send_media(self, frame: bytes, timestamp_ms: int) -> bool:
        """Send one inbound ``media`` frame; False once the stream has ended."""
        async with self._send_lock:
            if self.ended_by is not None:  # nothing may follow stop
                return False
            self._chunk += 1
            media = {
                "track": "inbound",
                "chunk": str(self._chunk),  # numeric-looking fields are strings (§2)
                "timestamp": str(timestamp_ms),
                "payload": base64.b64encode(frame).decode("ascii"),
            }
            if self.media_trace is not None:
                self.media_trace("sent", timestamp_ms)
            try:
                await self._send_event("media", {"media": media})
            except ConnectionError:
                return False
            return True

    async def _send_event(self, event: str, body: Mapping[str, Any]) -> None:
        """Send one Twilio message with the next sequence number (caller holds the lock)."""
        self._seq += 1  # starts at 1 on start, +1 per message of any type (§2)
        await self._send_json(
            {"event": event, "sequenceNumber": str(self._seq), "streamSid": self.stream_sid, **body}
        )

    async def _send_json(self, message: dict[str, Any]) -> None:
        if self.record_frames or message["event"] != "media":
            self.sent.append(message)
        await self._require_ws().send_str(json.dumps(message))

    def _require_ws(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws is None:
            raise RuntimeError("not connected: connect() first")
        return self._ws

    def _spawn(self, coro: Any) -> None:
        self._tasks.append(asyncio.create_task(coro))

    # -- clocks and waits ---------------------------------------------------------------------

    def now_ms(self) -> float:
        """The call clock: ms of call time since ``start`` (inbound audio sent, if unpaced)."""
        return self.clock.now_ms()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_changed(self, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def wait_until(
        self, predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.02
    ) -> None:
        """Wait until ``predicate()`` holds; raise :class:`TimeoutError` describing the state.

        The timeout is only a failure guard: tests assert on what happened, not on how long.
        """
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"waited {timeout} s for {what}; {self.describe()}")
            await self._wait_changed(min(remaining, poll))

    async def wait_for_mark_count(self, count: int, timeout: float = 10.0) -> list[MarkEcho]:
        """Wait until ``count`` marks have been echoed; return the echoes."""
        await self.wait_until(lambda: len(self.mark_echoes) >= count, timeout, f"{count} marks")
        return self.mark_echoes

    async def wait_for_event(self, event: str, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``count`` valid messages of type ``event`` arrived from the server."""
        await self.wait_until(
            lambda: len(self.messages(event)) >= count, timeout, f"{count} {event!r} messages"
        )

    async def wait_until_heard_ms(self, ms: float, timeout: float = 10.0) -> None:
        """Wait until the caller has heard ``ms`` of agent audio (playback, not arrival)."""
        await self.wait_until(lambda: self.heard_ms() >= ms, timeout, f"{ms} ms heard")

    async def wait_until_quiet(self, quiet_ms: float = 500.0, timeout: float = 10.0) -> None:
        """Wait until nothing is buffered and no audio arrived for ``quiet_ms`` of call time.

        Unpaced (``speed=0``) the call clock only moves when the caller sends audio, so there
        ``quiet_ms`` is measured in wall-clock time instead.
        """

        def quiet() -> bool:
            if not self.speed:
                return (time.monotonic() - self._last_media_at) * 1000 >= quiet_ms
            now = self.now_ms()
            return self.playback.buffered_ms(now) == 0 and now - self._last_media_ms >= quiet_ms

        await self.wait_until(quiet, timeout, f"{quiet_ms} ms of quiet")

    async def wait_closed(self, timeout: float = 10.0) -> None:
        """Wait until the socket is closed (by either side)."""
        await self.wait_until(lambda: self.closed, timeout, "the socket to close")

    def describe(self) -> str:
        """One line of state, for failure messages."""
        events: dict[str, int] = {}
        for received in self.received:
            events[str(received.event)] = events.get(str(received.event), 0) + 1
        return (
            f"call {self.now_ms():.0f} ms, heard {self.heard_ms():.0f} ms, "
            f"buffered {self.playback.buffered_ms(self.now_ms()):.0f} ms, received {events}, "
            f"{len(self.mark_echoes)} marks echoed, {len(self.violations)} violations, "
            f"closed={self.closed} ({self.ended_by}, code {self.close_code})"
        )

    # -- what happened ------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def started(self) -> bool:
        """True once ``start`` was sent."""
        return self.clock.started_at is not None

    @property
    def started_at(self) -> float:
        """``time.monotonic()`` when ``start`` was sent: call-clock zero."""
        return self.clock.started_at or 0.0

    @property
    def clears(self) -> list[ClearRecord]:
        """Every ``clear`` received: when, how much audio it discarded, which marks it flushed."""
        return self.playback.clears

    @property
    def heard(self) -> list[HeardChunk]:
        """Audio fully or partly played, chunk by chunk, with call-clock start times."""
        return self.playback.heard

    def heard_ms(self) -> float:
        return self.playback.heard_ms(self.now_ms())

    def heard_audio(self) -> bytes:
        """The μ-law bytes the caller actually heard (never audio discarded by ``clear``)."""
        return self.playback.heard_audio(self.now_ms())

    def messages(self, event: str | None = None) -> list[dict[str, Any]]:
        """Valid messages received from the server, optionally of one event type."""
        return [
            r.message
            for r in self.received
            if r.message is not None and (event is None or r.event == event)
        ]

    def received_audio(self) -> bytes:
        """Every μ-law byte the server sent, played or not (needs ``record_frames``)."""
        return b"".join(base64.b64decode(m["media"]["payload"]) for m in self.messages("media"))

    def write_heard_wav(self, path: str | Path, *, timeline: bool = False) -> None:
        """Write what the caller heard as an 8 kHz WAV.

        ``timeline=True`` keeps silences between chunks (starting at call time 0), so the file
        lines up with the call; otherwise the chunks are joined back to back.
        """
        if not timeline:
            write_mulaw_wav(path, self.heard_audio())
            return
        audio = bytearray()
        for chunk in self.playback.heard_chunks(self.now_ms()):
            offset = round(chunk.start_ms * BYTES_PER_MS)
            audio.extend(MULAW_SILENCE * max(0, offset - len(audio)))
            audio.extend(chunk.audio)
        write_mulaw_wav(path, bytes(audio))
