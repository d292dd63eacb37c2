"""Model set-up faults → the caller's apology: how long a caller waits in silence.

For each way a model can fail while its session is set up (refused, silent at any step, garbage),
the time from the stream's `start` to the moment Twilio has the apology TwiML (the test kit's
Twilio requests `<Connect action>` when phoneagent closes the stream), next to a healthy call's
time from `start` to the first agent audio in the same run. DESIGN's budget: the apology within
5 s of the stream's start.

Everything runs on loopback in this process: phoneagent's server, the scripted Twilio caller,
and a hostile model server (`phoneagent.testing.hostile_model`) or the protocol fake.

    python bench/setup_faults.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from phoneagent.logs import configure_logging
from phoneagent.realtime.connection import SETUP_BUDGET, ModelConnector
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.hostile_model import HostileModel, SetupFault
from phoneagent.testing.stack import LocalStack

PERSONAS = Path(__file__).resolve().parent.parent / "personas"
DENTAL = "+14155550100"
BUDGET_S = 5.0  # DESIGN.md: model unreachable or stalled at set-up → apology within 5 s


async def time_to_apology(url: str | None, refuse: int | None = None) -> float:
    """Seconds from `start` to the apology TwiML in the caller's hands."""
    model = FakeRealtimeServer() if url is None else None
    async with LocalStack(PERSONAS, model=model, use_fake_model=url is None) as stack:
        if url is not None:
            stack.state.prewarmer.connector = ModelConnector(url, "k", "stepaudio-2.5-realtime")
        elif refuse is not None:
            model.fail_next_handshakes(10, status=refuse)
        async with stack.caller(to=DENTAL, speed=0) as caller:
            await caller.dial()
            await caller.connect()
            after = await caller.wait_call_over(timeout=60)
            if after is None or not after.says:
                raise RuntimeError(f"no apology: {caller.describe()}")
            return time.monotonic() - caller.started_at


async def time_to_first_audio() -> float:
    async with (
        LocalStack(PERSONAS, model=FakeRealtimeServer()) as stack,
        stack.caller(to=DENTAL, speed=0) as caller,
    ):
        await caller.dial()
        await caller.connect()
        await caller.wait_for_event("media", timeout=30)
        return time.monotonic() - caller.started_at


async def main(repeat: int) -> None:
    configure_logging("console", "critical")
    rows: list[tuple[str, list[float]]] = []
    rows.append(("healthy call: start → first agent audio", [await time_to_first_audio()]))
    rows.append(("upgrade refused (HTTP 503)", [await time_to_apology(None, refuse=503)]))
    for fault in SetupFault:
        times = []
        for _ in range(repeat):
            async with HostileModel(fault) as hostile:
                times.append(await time_to_apology(hostile.url))
        rows.append((fault.value, times))
    print(f"set-up budget in the server: {SETUP_BUDGET:g} s; DESIGN budget: {BUDGET_S:g} s\n")
    print("| model fault at set-up | runs | start → apology, median (s) | max (s) | in budget |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, times in rows:
        within = "" if name.startswith("healthy") else ("yes" if max(times) <= BUDGET_S else "NO")
        median, worst = statistics.median(times), max(times)
        print(f"| {name} | {len(times)} | {median:.3f} | {worst:.3f} | {within} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per fault")
    asyncio.run(main(parser.parse_args().repeat))
