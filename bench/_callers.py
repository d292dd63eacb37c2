"""The load generator of `bench/load.py`: many Twilio media streams from one event loop, light
enough that the server under test saturates long before it does.

What Twilio does on each call, and nothing more: the signed voice webhook (the test kit's
`TwilioCaller.dial`, once per call, outside the measured window), the stream's upgrade with its
`x-twilio-signature`, `connected` and `start`, then one 20 ms `media` frame of silence every
20 ms and each `mark` echoed when the caller's playback reaches it. Per message it costs a few
string concatenations — no JSON encoder, no base64, no numpy on the sending side:

- the frame's payload (160 bytes of μ-law silence) is base64-encoded once; each `media` message
  is the call's pre-built prefix and suffix around its sequence number, chunk and timestamp;
- one pacing task (`Callers.tick`) wakes every 5 ms against absolute deadlines and writes the
  due frame of a quarter of the calls (each call's frames 20 ms apart, the calls spread over
  the 20 ms as real calls are), then the mark echoes that have come due; there is no per-call
  timer and no `wait_for`;
- a server `media` message is not decoded: its audio length comes from its base64 length;
  other messages (`mark`, `clear`) are parsed as JSON.

The pacing task records how late each of its wake-ups was (`lag`): the load generator's own
delay, which `bench/load.py` reads to refuse figures measured while the generator lagged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import json
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from phoneagent.testing.caller import TwilioCaller
from phoneagent.testing.twilio_signing import Signature, signature_headers

FRAME_S = 0.020
FRAME_MS = 20
SLOTS = 4  # the pacing task wakes every 5 ms, for a quarter of the calls each time
ULAW_BYTES_PER_S = 8000
SILENCE_B64 = base64.b64encode(b"\xff" * 160).decode("ascii")


@dataclass
class Line:
    """One call's stream, as the load generator runs it."""

    call_sid: str
    stream_sid: str
    ws: aiohttp.ClientWebSocketResponse
    prefix: str = ""
    seq: int = 2  # `connected` carries none, `start` is 1 (Twilio: +1 per message)
    frames: int = 0
    play_end: float = 0.0  # when the audio received so far will have played
    closed: bool = False
    hung_up: bool = False  # by the load generator
    ended_early: bool = False  # the server closed the stream before the hang-up
    sent_t: array = field(default_factory=lambda: array("d"))  # inbound media written
    sent_ts: array = field(default_factory=lambda: array("q"))  # … and its timestamp (ms)
    recv_t: array = field(default_factory=lambda: array("d"))  # agent media read
    recv_n: array = field(default_factory=lambda: array("q"))  # … and its μ-law bytes
    mark_t: array = field(default_factory=lambda: array("d"))  # marks read
    echo_t: array = field(default_factory=lambda: array("d"))  # mark echoes written
    clears: int = 0

    def __post_init__(self) -> None:
        self.prefix = '{"event": "media", "sequenceNumber": "'
        self.middle = (
            f'", "streamSid": "{self.stream_sid}", "media": {{"track": "inbound", "chunk": "'
        )
        self.suffix = f'", "payload": "{SILENCE_B64}"}}}}'

    def media(self) -> str:
        """The next inbound `media` message (three integers formatted; the rest pre-built)."""
        self.frames += 1
        seq, self.seq = self.seq, self.seq + 1
        ts = (self.frames - 1) * FRAME_MS
        return f'{self.prefix}{seq}{self.middle}{self.frames}", "timestamp": "{ts}{self.suffix}'

    def echo(self, name: str) -> str:
        seq, self.seq = self.seq, self.seq + 1
        mark = json.dumps({"name": name})
        return (
            f'{{"event": "mark", "sequenceNumber": "{seq}", "streamSid": "{self.stream_sid}", '
            f'"mark": {mark}}}'
        )

    def trace(self) -> dict[str, Any]:
        keys = ("sent_t", "sent_ts", "recv_t", "recv_n", "mark_t", "echo_t", "clears")
        keys += ("ended_early",)
        return {key: getattr(self, key) for key in keys}


class Callers:
    """Streams from one event loop, paced by one task."""

    def __init__(self, base: str, account_sid: str, auth_token: str, to: str) -> None:
        self.base, self.account_sid, self.auth_token, self.to = base, account_sid, auth_token, to
        self.lines: list[Line] = []
        self.slots: list[list[Line]] = [[] for _ in range(SLOTS)]
        self.due: list[tuple[float, int, Line, str]] = []  # mark echoes: (due, n, line, name)
        self.lag_t, self.lag = array("d"), array("d")  # pacing wake-ups: when, how late (s)
        self._n = 0
        self._readers: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Callers:
        connector = aiohttp.TCPConnector(limit=0)
        self._http = aiohttp.ClientSession(connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.hang_up()
        if self._http is not None:
            await self._http.close()

    async def call(self) -> Line:
        """Dial (the signed webhook), open the stream, send `connected` and `start`."""
        assert self._http is not None
        caller = TwilioCaller(self.base, account_sid=self.account_sid, auth_token=self.auth_token,
                              to=self.to, session=self._http, record_frames=False)  # fmt: skip
        answer = await caller.dial()
        if answer.stream_url is None:
            raise RuntimeError(f"no <Connect><Stream> in the answer: {answer}")
        headers = signature_headers(Signature.VALID, self.auth_token, answer.stream_url,
                                    header="x-twilio-signature")  # fmt: skip
        ws = await self._http.ws_connect(
            caller._on_base_url(answer.stream_url), headers=headers, autoping=True
        )
        line = Line(caller.call_sid, caller.stream_sid, ws)
        start = {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": line.stream_sid,
            "start": {
                "streamSid": line.stream_sid,
                "accountSid": self.account_sid,
                "callSid": line.call_sid,
                "tracks": ["inbound"],
                "customParameters": dict(answer.parameters or {}),
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
        await ws.send_str('{"event": "connected", "protocol": "Call", "version": "1.0.0"}')
        await ws.send_str(json.dumps(start))
        self.slots[len(self.lines) % SLOTS].append(line)
        self.lines.append(line)
        self._readers.append(asyncio.create_task(self._read(line)))
        return line

    async def tick(self) -> None:
        """Every 20 ms / SLOTS, against absolute deadlines: one frame to every call of the slot
        that is due, then the mark echoes that are due. Each call has a slot (round robin), so
        it gets one frame every 20 ms while the calls' frames are spread over the 20 ms, as
        real calls' are (their streams start at unrelated moments): all calls' frames in one
        burst would queue in the server, and in the fake model, and measure that queue. A
        wake-up later than a whole frame does not send two frames: the lag is recorded, and
        Twilio would not burst either."""
        deadline = time.monotonic()
        now_ = time.monotonic
        slot = 0
        while True:
            deadline += FRAME_S / SLOTS
            delay = deadline - now_()
            if delay > 0:
                await asyncio.sleep(delay)
            now = now_()
            self.lag_t.append(now)
            self.lag.append(now - deadline)
            if now - deadline > FRAME_S:
                deadline = now  # fell behind by a frame or more: start again from now
            for line in self.slots[slot]:
                if line.closed:
                    continue
                line.sent_t.append(now_())
                line.sent_ts.append(line.frames * FRAME_MS)
                try:
                    await line.ws.send_str(line.media())
                except ConnectionError:
                    line.closed = True
            slot = (slot + 1) % SLOTS
            due = self.due
            while due and due[0][0] <= now:
                _, _, line, name = heapq.heappop(due)
                await self._echo(line, name)

    async def _echo(self, line: Line, name: str) -> None:
        if line.closed:
            return
        with contextlib.suppress(ConnectionError):
            await line.ws.send_str(line.echo(name))
            line.echo_t.append(time.monotonic())

    async def _read(self, line: Line) -> None:
        now_ = time.monotonic
        async for message in line.ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue
            text: str = message.data
            at = text.find('"payload"')
            if at >= 0:  # media: its length from the base64's, nothing decoded
                first = text.index('"', text.index(":", at + 9)) + 1
                last = text.index('"', first)
                n = (last - first) // 4 * 3 - text.count("=", last - 2, last)
                now = now_()
                line.recv_t.append(now)
                line.recv_n.append(n)
                line.play_end = max(now, line.play_end) + n / ULAW_BYTES_PER_S
                continue
            event = json.loads(text)
            kind = event.get("event")
            if kind == "mark":
                now = now_()
                line.mark_t.append(now)
                name = event["mark"]["name"]
                if line.play_end <= now:
                    await self._echo(line, name)
                else:
                    self._n += 1
                    heapq.heappush(self.due, (line.play_end, self._n, line, name))
            elif kind == "clear":
                line.clears += 1
                line.play_end = now_()
                # Cleared audio's marks come back at once (Twilio echoes them on `clear`).
                pending = [d for d in self.due if d[2] is line]
                self.due = [d for d in self.due if d[2] is not line]
                heapq.heapify(self.due)
                for _, _, _, name in sorted(pending):
                    await self._echo(line, name)
        line.ended_early = not line.hung_up
        line.closed = True

    async def hang_up(self) -> None:
        """`stop` on every stream still open, then close them."""
        for line in self.lines:
            if line.closed:
                continue
            line.closed = line.hung_up = True
            stop = {"event": "stop", "sequenceNumber": str(line.seq), "streamSid": line.stream_sid,
                    "stop": {"accountSid": self.account_sid, "callSid": line.call_sid}}  # fmt: skip
            with contextlib.suppress(Exception):
                await line.ws.send_str(json.dumps(stop))
                await line.ws.close()
        for reader in self._readers:
            reader.cancel()
        for reader in self._readers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        self._readers.clear()
