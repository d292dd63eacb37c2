"""Barge-in reaction under load: `speech_started` → Twilio `clear`, N concurrent calls.

The server runs as its own process (`phoneagent serve`, pinned to CPU 0 when the machine has
two or more), the load — N scripted Twilio callers and the fake StepFun model — runs in this
process (pinned to CPU 1). Every call: the greeting plays, the caller talks over it, the fake
model's VAD sends `speech_started`, the server clears Twilio's buffer.

Two numbers per call:
- in the server: from the moment it has decoded `speech_started` to the moment its `clear` is
  written to Twilio's socket (read back from `GET /calls/{sid}`);
- end to end: from the fake model writing `speech_started` to the caller receiving `clear`
  (two loopback hops and this process's own event loop included, so it is an upper bound).

    python bench/barge_in.py [--calls 100] [--ramp 5]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from _harness import DENTAL, LOAD_CPU, bench_personas, pin, start_phoneagent, stop_process

from phoneagent.audio import pcm16_to_ulaw
from phoneagent.logs import configure_logging
from phoneagent.testing.caller import TwilioCaller
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.speech import synthesize
from phoneagent.testing.stack import demo_credentials

INTERRUPTION = "Sorry, can I ask something else?"


LONG_GREETING = (
    "Thank you for calling Bright Smile Dental, this is Maya. We are open Monday to Friday from "
    "eight to six and on Saturday morning. Doctor Park and Doctor Okafor are both seeing new "
    "patients this month, and parking is free behind the building. How can I help you today?"
)


@dataclass
class Load:
    base: str
    sid: str
    token: str
    speech: bytes
    calls: int
    ramp: float
    http: aiohttp.ClientSession
    cleared: int = 0
    all_cleared: asyncio.Event = field(default_factory=asyncio.Event)


async def one_call(load: Load, index: int) -> tuple[float, float, str]:
    """One call; returns the in-server reaction (ms), when the caller read `clear` (monotonic
    seconds) and the model session id.

    Calls start spread over the ramp, and each interrupts the agent one ramp after it started,
    so interruptions are spread too, and every call stays up until the last one has
    interrupted: each `clear` happens with all calls in progress."""
    base, sid, token = load.base, load.sid, load.token
    await asyncio.sleep(index * load.ramp / load.calls)
    async with TwilioCaller(base, account_sid=sid, auth_token=token, to=DENTAL,
                            speed=1.0, record_frames=False) as caller:  # fmt: skip
        await caller.dial()
        await caller.connect()
        caller.start_background_silence()
        await caller.wait_until_heard_ms(load.ramp * 1000, timeout=60)
        await caller.play(load.speech)
        await caller.wait_for_event("clear", timeout=60)
        clear_at = next(r.at for r in caller.received if r.event == "clear")
        load.cleared += 1
        if load.cleared == load.calls:
            load.all_cleared.set()
        await load.all_cleared.wait()
        await caller.hangup()
    http = load.http
    auth = {"Authorization": aiohttp.encode_basic_auth(sid, token)}
    for _ in range(100):  # the record is final once the server has seen the stream end
        async with http.get(f"{base}/calls/{caller.call_sid}", headers=auth) as response:
            record = await response.json()
        if record.get("ended_at"):
            break
        await asyncio.sleep(0.05)
    [in_server_ms] = record["stats"]["barge_in_reaction_ms"]
    return in_server_ms, clear_at, record["model_session"]


def percentiles(values: list[float]) -> str:
    p50, p99 = np.percentile(values, [50, 99])
    return f"{p50:.2f} ms | {p99:.2f} ms | {max(values):.2f} ms"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds over which calls start")
    args = parser.parse_args()
    configure_logging("console", "warning")
    pin(0, LOAD_CPU)
    sid, token = demo_credentials()
    speech = pcm16_to_ulaw(synthesize(INTERRUPTION, sample_rate=8000))
    with tempfile.TemporaryDirectory() as tmp:
        # The dental line with a long greeting (every call is still talking when the last one
        # interrupts) and no false barge-in guard (the reaction measured is to
        # `speech_started` itself).
        personas = bench_personas(Path(tmp), greeting=LONG_GREETING, barge_in_min_speech_ms=0)
        async with FakeRealtimeServer(api_key=None, speed=2.0, record_events=False) as model:
            server, base = await start_phoneagent(model.url, personas, sid, token, args.calls)
            try:
                wall = time.monotonic()
                async with aiohttp.ClientSession() as http:
                    load = Load(base, sid, token, speech, args.calls, args.ramp, http)
                    results = await asyncio.gather(*(one_call(load, i) for i in range(args.calls)))
                wall = time.monotonic() - wall
            finally:
                await stop_process(server)
            sessions = {session.id: session for session in model.sessions}
    in_server = [ms for ms, _, _ in results]
    end_to_end = []
    for _, clear_at, session_id in results:
        session = sessions[session_id]
        started = [t for kind, t in session.sent_at if kind == "input_audio_buffer.speech_started"]
        end_to_end.append((clear_at - started[0]) * 1000)
    print(
        f"\n`speech_started` → `clear` with {args.calls} calls in progress (interruptions "
        f"spread over {args.ramp:.0f} s), real-time audio\n"
    )
    print("| measured | calls | p50 | p99 | max |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| in the server (decoded → written) | {len(in_server)} | {percentiles(in_server)} |")
    print(
        f"| end to end (model wrote → caller read) | {len(end_to_end)} | "
        f"{percentiles(end_to_end)} |"
    )
    load_cpu = resource.getrusage(resource.RUSAGE_SELF)
    server_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        f"\nCPU over {wall:.1f} s of calls: load generator "
        f"{load_cpu.ru_utime + load_cpu.ru_stime:.1f} s, server "
        f"{server_cpu.ru_utime + server_cpu.ru_stime:.1f} s (a saturated load generator "
        "inflates the end-to-end column)"
    )


if __name__ == "__main__":
    asyncio.run(main())
