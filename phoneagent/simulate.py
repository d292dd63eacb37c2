"""Place a simulated phone call against a running server, as Twilio would.

``phoneagent simulate`` uses it against any server; ``phoneagent demo`` against one it starts
on loopback with stand-ins for StepFun and Twilio. The caller is the test kit's scripted Twilio
caller: it signs the webhook and the stream like Twilio, plays a WAV in real time, and records
what it heard. The transcript comes from the server (``GET /calls/{sid}``) as turns finish.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from phoneagent.testing.caller import TwilioCaller

GREETING_TIMEOUT = 30.0  # a real model's first words can take a few seconds
ANSWER_TIMEOUT = 30.0
QUIET_MS = 1200  # this much silence after speech means the agent finished its turn


@dataclass
class SimulatedCall:
    base_url: str
    account_sid: str
    auth_token: str
    to: str
    wav: Path
    out: Path
    from_: str = "+14155550123"
    public_url: str | None = None
    speed: float = 1.0
    say: Callable[[str], None] = print

    async def run(self) -> int:
        """Dial, listen to the greeting, say the WAV, listen to the answer, hang up."""
        async with TwilioCaller(
            self.base_url,
            public_url=self.public_url,
            account_sid=self.account_sid,
            auth_token=self.auth_token,
            to=self.to,
            from_=self.from_,
            speed=self.speed,
        ) as caller:
            answer = await caller.dial()
            if answer.stream_url is None:
                self.say(f"the server did not connect a stream (HTTP {answer.status})")
                for text in answer.says:
                    self.say(f"  it said: {text}")
                return 1
            self.say(f"calling {self.to} as {self.from_}: call {caller.call_sid}")
            await caller.connect()
            caller.start_background_silence()  # Twilio streams the line's audio all call long
            watcher = asyncio.create_task(self._print_transcript(caller.call_sid))
            try:
                await self._listen(caller, "the greeting", GREETING_TIMEOUT)
                self.say(f"(caller plays {self.wav.name})")
                await caller.play_wav(self.wav)
                await self._listen(caller, "the answer", ANSWER_TIMEOUT)
                await caller.hangup()
            finally:
                await asyncio.sleep(0.3)  # let the last turns reach the watcher
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            self.out.parent.mkdir(parents=True, exist_ok=True)
            caller.write_heard_wav(self.out, timeline=True)
            self.say(f"the caller heard {caller.heard_ms() / 1000:.1f} s of agent audio")
            self.say(f"what the caller heard: {self.out}")
            return 0

    async def _listen(self, caller: TwilioCaller, what: str, timeout: float) -> None:
        before = caller.heard_ms()
        await caller.wait_until(lambda: caller.heard_ms() > before, timeout, what)
        await caller.wait_until_quiet(QUIET_MS, timeout)

    async def _print_transcript(self, call_sid: str) -> None:
        """Print each turn once the server says its text is final."""
        url = f"{self.base_url}/calls/{call_sid}"
        headers = {"Authorization": aiohttp.encode_basic_auth(self.account_sid, self.auth_token)}
        shown: set[tuple[str, int]] = set()
        async with aiohttp.ClientSession(headers=headers) as http:
            while True:
                async with http.get(url) as response:
                    turns = (await response.json())["transcript"] if response.ok else []
                for turn in turns:
                    key = (turn["role"], turn["start_ms"])
                    if turn["text"] and key not in shown:
                        shown.add(key)
                        self.say(f"[{turn['start_ms'] / 1000:6.1f} s] {_line(turn)}")
                await asyncio.sleep(0.25)


def _line(turn: dict) -> str:
    cut = " (interrupted)" if turn.get("interrupted") else ""
    return f"{turn['role']:>6}: {turn['text']}{cut}"
