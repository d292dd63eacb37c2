"""Call latency: `start` → first agent audio with and without pre-warm, and the bridge's own
per-frame cost in each direction.

Everything runs on loopback in this process: phoneagent's server, the fake StepFun model (with
a configurable handshake delay, as a real TLS + auth handshake takes time) and the scripted
Twilio caller, which waits a configurable time between receiving the TwiML and opening the
stream (Twilio fetches and parses the TwiML, then opens a TLS WebSocket).

    python bench/call_latency.py [--calls 10] [--handshake-ms 400] [--twiml-to-stream-ms 300]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import ClassVar

import numpy as np

from phoneagent.bridge import CallShell
from phoneagent.call import SendMedia
from phoneagent.logs import configure_logging
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.stack import LocalStack
from phoneagent.twilio.wire.stream import Media

PERSONAS = Path(__file__).resolve().parent.parent / "personas"
DENTAL = "+14155550100"


async def time_to_first_audio(stack: LocalStack, twiml_to_stream_s: float) -> float:
    """Seconds from the caller's `start` to the first agent `media` frame it receives."""
    async with stack.caller(to=DENTAL, speed=0) as caller:
        await caller.dial()
        await asyncio.sleep(twiml_to_stream_s)
        await caller.connect()
        await caller.wait_for_event("media", timeout=30)
        first = next(r for r in caller.received if r.event == "media")
        await caller.hangup()
    return first.at - caller.started_at


async def first_audio_series(args: argparse.Namespace, prewarm: bool) -> list[float]:
    model = FakeRealtimeServer(handshake_delay=args.handshake_ms / 1000, record_events=False)
    async with LocalStack(PERSONAS, model=model) as stack:
        if not prewarm:
            stack.state.prewarmer.start = lambda call_sid, config: None
        return [
            await time_to_first_audio(stack, args.twiml_to_stream_ms / 1000)
            for _ in range(args.calls)
        ]


class TimedShell(CallShell):
    """The real shell, timing the work it does per event (parse excluded, send included)."""

    inbound: ClassVar[list[float]] = []  # per caller frame: Call + append to the model socket
    outbound: ClassVar[list[float]] = []  # per 20 ms agent frame: its share of media + mark out

    async def feed_twilio(self, event):
        started = time.perf_counter()
        await super().feed_twilio(event)
        if isinstance(event, Media):
            TimedShell.inbound.append(time.perf_counter() - started)

    async def perform(self, actions, received_at=None):
        started = time.perf_counter()
        await super().perform(actions, received_at)
        # Agent audio leaves in messages of several 20 ms frames: share the work among them.
        frames = sum(len(a.payload) for a in actions if isinstance(a, SendMedia)) // 160
        if frames:
            TimedShell.outbound.extend([(time.perf_counter() - started) / frames] * frames)


async def per_frame_cost(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    import phoneagent.twilio.routes.media_stream as server

    server.CallShell = TimedShell  # the server builds this shell for each call
    model = FakeRealtimeServer(speed=None, record_events=False)
    async with (
        LocalStack(PERSONAS, model=model) as stack,
        stack.caller(to=DENTAL, speed=0) as caller,
    ):
        await caller.dial()
        await caller.connect()
        await caller.wait_for_event("media", timeout=30)
        await caller.play_silence(args.frames * 20)
        await caller.wait_until_quiet(200, timeout=30)
        await caller.hangup()
    return TimedShell.inbound, TimedShell.outbound


def row(name: str, samples: list[float], scale: float, unit: str) -> str:
    values = np.array(samples) * scale
    p50, p99 = np.percentile(values, [50, 99])
    cells = [f"{v:.1f} {unit}" for v in (p50, p99, values.max())]
    return f"| {name} | {len(values)} | {' | '.join(cells)} |"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--handshake-ms", type=float, default=400.0)
    parser.add_argument("--twiml-to-stream-ms", type=float, default=300.0)
    parser.add_argument("--frames", type=int, default=1500, help="caller frames to time")
    args = parser.parse_args()
    configure_logging("console", "warning")  # the tables, not a log line per call

    cold = await first_audio_series(args, prewarm=False)
    warm = await first_audio_series(args, prewarm=True)
    inbound, outbound = await per_frame_cost(args)

    print(
        f"\n`start` → first agent audio frame ({args.calls} calls each; model handshake "
        f"{args.handshake_ms:.0f} ms; TwiML → stream {args.twiml_to_stream_ms:.0f} ms)\n"
    )
    print("| pre-warm | calls | p50 | p99 | max |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(row("off (connect on `start`)", cold, 1000, "ms"))
    print(row("on (connect during the webhook)", warm, 1000, "ms"))
    saving = np.median(cold) - np.median(warm)
    print(f"\nmedian saving: {saving * 1000:.0f} ms ({np.median(warm) / np.median(cold):.2f}×)")
    print("\nbridge work per frame (parse excluded; transcode and socket write included)\n")
    print("| direction | frames | p50 | p99 | max |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(row("caller → model (20 ms μ-law in, pcm16 24 kHz append out)", inbound, 1e6, "µs"))
    print(row("model → caller (per 20 ms frame: media + mark out)", outbound, 1e6, "µs"))


if __name__ == "__main__":
    asyncio.run(main())
