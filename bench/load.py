"""Load: N concurrent calls in real time through phoneagent, Pipecat and a pure relay, in one run.

For each server in turn — `phoneagent serve`, `bench/pipecat_server.py` (Pipecat as its Twilio
dial-in example builds it, with its OpenAI realtime service) and `bench/relay_server.py` (no
transcoding, no marks, as Twilio's sample) — the server runs as its own process pinned to CPU
0, and the load runs on CPU 1 in two processes: the load generator (`bench/_callers.py`: N
Twilio media streams paced by one task, pre-built messages), and the fake StepFun model. Every
call is full duplex for its whole length: the caller's line sends 20 ms frames of silence in
real time (Twilio streams the caller's side continuously), and the model speaks one long answer
paced at real time, keeping `--lead-ms` ahead of playback, so the caller hears agent audio all
the time. Calls start over `--ramp` seconds; after `--warmup` seconds more, a window of
`--seconds` is measured with all N calls in progress. Per run:

- server CPU time (/proc/PID/stat) over the window ÷ (N × window);
- server memory (VmRSS) with N calls minus before the first call, ÷ N;
- frame latency each way: caller → model, from the caller writing a `media` frame to the fake
  model reading the append that completes that audio; model → caller, from the model writing an
  audio delta to the caller reading the `media` frame that delta completes. Audio positions are
  matched by byte counts (every server keeps every sample, in order); the clock is the
  machine's monotonic clock, shared by the load processes;
- underruns: see bench/README.md.

A run's figures are not reported when the load generator lagged (its event loops' lag p99 over
`--max-lag-ms`, or a load process near a full core) or other processes took the server's core.
Then, unless `--no-find`, a search per server for the most calls within the budget (p99 ≤ 20 ms
each way, no underrun): calls per core, found by trying, not extrapolated.

    python bench/load.py [--calls 50] [--seconds 30] [--warmup 5] [--ramp 10] [--no-find]
        [--find-start 25] [--find-seconds 10] [--max-lag-ms 5] [--servers phoneagent,pipecat,relay]
        [--pipecat-python PATH] [--lead-ms 100] [--load-cpus 1] [--caller-processes 1]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import math
import multiprocessing
import os
import sys
import tempfile
import time
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# This checkout's phoneagent, not an installed copy elsewhere (an editable install of another
# checkout would otherwise serve the callers and the fake model; the spawned load processes
# inherit this path, and the server runs with this directory as its working directory).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import numpy as np
from _callers import Callers
from _harness import (
    DENTAL,
    LOAD_CPU,
    SERVER_CPU,
    bench_personas,
    cpu_busy_seconds,
    cpu_seconds,
    free_port,
    pin,
    rss_bytes,
    start_phoneagent,
    start_process,
    stop_process,
)

from phoneagent.logs import configure_logging
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.speech import synthesize
from phoneagent.testing.stack import demo_credentials

RELAY = Path(__file__).resolve().with_name("relay_server.py")
PIPECAT = Path(__file__).resolve().with_name("pipecat_server.py")
SERVERS = ("phoneagent", "pipecat", "relay", "relay-pcm16")
# What the model hears per μ-law byte from the caller: phoneagent appends pcm16 at 24 kHz (6
# bytes per μ-law byte), the relay the μ-law itself, relay-pcm16 pcm16 at 24 kHz (audioop).
MODEL_BYTES_PER_ULAW_BYTE = {"phoneagent": 6, "pipecat": 6, "relay": 1, "relay-pcm16": 6}
# pcm16 24 kHz model audio per μ-law byte to the caller (the relay keeps one byte in six).
PCM_BYTES_PER_ULAW_BYTE = 6
ULAW_BYTES_PER_MS = 8
FRAME_MS = 20
MIB = 1024 * 1024
SATURATED = 0.9  # share of a core above which a side is called saturated

# The agent's one long answer: repeated to outlast the call (about 10 s per repetition).
PARAGRAPH = (
    "Thank you for calling Bright Smile Dental, this is Maya. We are open Monday to Friday from "
    "eight to six and on Saturday morning. Doctor Park and Doctor Okafor are both seeing new "
    "patients this month, and parking is free behind the building."
)

BUDGETS = {
    "cpu_ms": 4.0,  # server CPU per call-second
    "ratio": 1.5,  # the same, over a pure relay's
    "p99_ms": 20.0,  # frame latency each way, 200 calls
    "bridge_p99_ms": 5.0,  # bridge added latency, frame in → frame out, 100 calls
    "mib_per_call": 2.0,
}


# --- the load processes (pinned to the load CPUs) --------------------------------------------


def _start_load_process(cpus: list[int]) -> None:
    pin(0, cpus)
    configure_logging("console", "warning")
    # These processes hold a minute of per-frame records; a full collection over them would
    # stall every call they play at once. The load is short-lived: leave garbage to the exit.
    gc.disable()


async def _next_command(conn: Connection) -> Any:
    while not conn.poll():
        await asyncio.sleep(0.05)
    return conn.recv()


async def _watch_lag(times: array, lags: array) -> None:
    """How late this process's event loop wakes a 10 ms sleep: the load generator's own delay."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(0.01)
        now = time.monotonic()
        times.append(now)
        lags.append(now - before - 0.01)


def model_process(conn: Connection, cpus: list[int], greeting: str, lead_ms: float) -> None:
    _start_load_process(cpus)
    asyncio.run(_model_main(conn, greeting, lead_ms))


async def _model_main(conn: Connection, greeting: str, lead_ms: float) -> None:
    # (in times, in bytes, out times, out bytes) per model session.
    traces: dict[str, tuple[array, array, array, array]] = defaultdict(
        lambda: (array("d"), array("q"), array("d"), array("q"))
    )

    def trace(session: Any, kind: str, n: int, now=time.monotonic) -> None:
        in_t, in_n, out_t, out_n = traces[session.id]
        if kind == "in":
            in_t.append(now())
            in_n.append(n)
        else:
            out_t.append(now())
            out_n.append(n)

    synthesize(greeting, 24000)  # once, before 200 sessions ask for it at the same moment
    lag = array("d"), array("d")
    watcher = asyncio.create_task(_watch_lag(*lag))
    fake = FakeRealtimeServer(
        api_key=None, speed=1.0, lead_ms=lead_ms, record_events=False, audio_trace=trace
    )
    async with fake:
        conn.send(("ready", fake.url))
        await _next_command(conn)
    watcher.cancel()
    conn.send(({sid: tuple(t) for sid, t in traces.items()}, lag))


def callers_process(conn: Connection, cpus: list[int], base: str, sid: str, token: str,
                    mine: range, calls: int, ramp: float) -> None:  # fmt: skip
    _start_load_process(cpus)
    asyncio.run(_callers_main(conn, base, sid, token, mine, calls, ramp))


async def _callers_main(
    conn: Connection, base: str, sid: str, token: str, mine: range, calls: int, ramp: float
) -> None:
    """Calls number *mine* of *calls*, started over *ramp* seconds in all (bench/_callers.py)."""
    failures: list[str] = []
    async with Callers(base, sid, token, DENTAL) as callers:
        pacing = asyncio.create_task(callers.tick())

        async def one_call(index: int) -> None:
            await asyncio.sleep(index * ramp / calls)
            try:
                await callers.call()
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

        await asyncio.gather(*(one_call(i) for i in mine))
        conn.send(("connected", len(callers.lines), failures[:3]))
        await _next_command(conn)
        pacing.cancel()
        await callers.hang_up()
        traces = {line.call_sid: line.trace() for line in callers.lines}
    conn.send((traces, (callers.lag_t, callers.lag)))


# --- one run: a server under N calls ---------------------------------------------------------


@dataclass
class Plan:
    calls: int
    seconds: float
    warmup: float
    ramp: float
    lead_ms: float
    load_cpus: list[int] = field(default_factory=lambda: [LOAD_CPU])
    caller_processes: int = 1
    pipecat_python: str = sys.executable


@dataclass
class Run:
    """What one server did under the load."""

    server: str
    calls: int  # calls in progress through the whole window
    window_s: float
    server_cpu_s: float
    rss_idle: int
    rss_loaded: int
    load_cpu_s: dict[str, float]  # per load process (and this one)
    load_busy_s: float  # the load CPUs' busy time, whoever used them
    server_cpu_busy_s: float  # the server CPU's busy time, whoever used it
    load_lag_p99_ms: dict[str, float]
    inbound_ms: np.ndarray  # per frame
    outbound_ms: np.ndarray
    lost_inbound: int
    underruns: int
    underrun_ms: float
    least_buffered_ms: float
    per_call_second: dict[str, float]  # messages of each kind per call-second
    problems: Counter[str]  # what went wrong → in how many calls
    connect_s: float = math.nan  # from the first call's start to the last one streaming
    load_lag_max_ms: dict[str, float] = field(default_factory=dict)
    load_cpus: int = 1

    @property
    def cpu_ms_per_call_second(self) -> float:
        return self.server_cpu_s * 1000 / (self.calls * self.window_s)

    @property
    def mib_per_call(self) -> float:
        return (self.rss_loaded - self.rss_idle) / self.calls / MIB

    @property
    def realtime(self) -> float:
        """Audio that got through per second of call, as a share of real time (the worse
        direction): below 1 the load could not keep up."""
        rates = self.per_call_second
        return min(rates.get("caller audio ms", 0), rates.get("agent audio ms", 0)) / 1000

    @property
    def load_share(self) -> float:
        """How busy the load generator's CPUs were (by the load or anything else), per CPU."""
        return self.load_busy_s / self.window_s / self.load_cpus

    @property
    def server_share(self) -> float:
        """The share of its core the server used."""
        return self.server_cpu_s / self.window_s

    @property
    def server_core_busy(self) -> float:
        """How busy the server's core was (by the server or anything else)."""
        return self.server_cpu_busy_s / self.window_s


async def _receive(conn: Connection, process: multiprocessing.Process, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not conn.poll():
        if not process.is_alive():
            raise RuntimeError(f"the {process.name} process exited ({process.exitcode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer from the {process.name} process in {timeout:.0f} s")
        await asyncio.sleep(0.05)
    return conn.recv()


async def _model_session_ids(server: str, base: str, sid: str, token: str, call_sids) -> dict:
    """CallSid → model session id, as the server under test recorded it."""
    path = "/calls/{}" if server == "phoneagent" else "/sessions/{}"
    auth = {"Authorization": aiohttp.encode_basic_auth(sid, token)}
    ids = {}
    async with aiohttp.ClientSession(headers=auth) as http:
        for call_sid in call_sids:
            async with http.get(base + path.format(call_sid)) as response:
                if response.status == 200:
                    ids[call_sid] = (await response.json())["model_session"]
    return ids


async def run_server(server: str, plan: Plan, greeting: str, personas: Path) -> Run:
    return (await run_servers([server], plan, greeting, personas))[server]


async def _start_server(
    server: str, plan: Plan, model_url: str, greeting: str, personas: Path, sid: str, token: str
) -> tuple[asyncio.subprocess.Process, str]:
    if server == "phoneagent":
        return await start_phoneagent(model_url, personas, sid, token, plan.calls)
    port = free_port()
    python, script = (plan.pipecat_python, PIPECAT) if server == "pipecat" else (
        sys.executable, RELAY)  # fmt: skip
    argv = [python, str(script), "--port", str(port), "--model-url", model_url,
            "--greeting", greeting]  # fmt: skip
    if server == "relay-pcm16":
        argv.append("--pcm16")
    return await start_process(argv, port), f"http://127.0.0.1:{port}"


async def run_servers(
    servers: list[str], plan: Plan, greeting: str, personas: Path
) -> dict[str, Run]:
    """*servers* under load at the same time (usually one), each pinned to the server CPU with
    `plan.calls` calls of its own, one fake model for all: figures taken together share the
    host's speed of the moment, which moves by tens of percent between runs minutes apart."""
    sid, token = demo_credentials()
    spawn = multiprocessing.get_context("spawn")
    model_conn, child = spawn.Pipe()
    model = spawn.Process(
        target=model_process,
        args=(child, plan.load_cpus, greeting, plan.lead_ms),
        name="fake model",
    )
    model.start()
    callers: dict[str, list[tuple[multiprocessing.Process, Connection]]] = {}
    processes: dict[str, asyncio.subprocess.Process] = {}
    bases: dict[str, str] = {}
    try:
        _, model_url = await _receive(model_conn, model, 60)
        for server in servers:
            processes[server], bases[server] = await _start_server(
                server, plan, model_url, greeting, personas, sid, token
            )
        await asyncio.sleep(1.0)
        rss_idle = {server: rss_bytes(process.pid) for server, process in processes.items()}

        started = time.monotonic()
        for server in servers:
            callers[server] = []
            for k in range(plan.caller_processes):
                conn, child = spawn.Pipe()
                mine = range(k, plan.calls, plan.caller_processes)
                args = (child, plan.load_cpus, bases[server], sid, token, mine, plan.calls,
                        plan.ramp)  # fmt: skip
                name = f"callers {k + 1}" + (f" ({server})" if len(servers) > 1 else "")
                caller = spawn.Process(target=callers_process, args=args, name=name)
                caller.start()
                callers[server].append((caller, conn))
        connected: Counter[str] = Counter()
        failures: dict[str, list[str]] = defaultdict(list)
        for server in servers:
            for caller, conn in callers[server]:
                _, ok, failed = await _receive(conn, caller, plan.ramp + 120)
                connected[server] += ok
                failures[server] += failed
        connect_s = time.monotonic() - started
        await asyncio.sleep(plan.warmup)

        all_callers = [pair for server in servers for pair in callers[server]]
        pids = {server: process.pid for server, process in processes.items()}
        pids |= {"fake model": model.pid, "this process": os.getpid()}
        pids |= {caller.name: caller.pid for caller, _ in all_callers}
        t0 = time.monotonic()
        cpu0, busy0 = {name: cpu_seconds(pid) for name, pid in pids.items()}, cpu_busy_seconds()
        await asyncio.sleep(plan.seconds)
        cpu1, busy1 = {name: cpu_seconds(pid) for name, pid in pids.items()}, cpu_busy_seconds()
        t1 = time.monotonic()
        rss_loaded = {server: rss_bytes(process.pid) for server, process in processes.items()}

        calls: dict[str, dict] = {server: {} for server in servers}
        lags = {}
        for _, conn in all_callers:
            conn.send(("hang up", t0, t1))
        for server in servers:
            for caller, conn in callers[server]:
                some, lags[caller.name] = await _receive(conn, caller, 60)
                calls[server] |= some
        model_conn.send("report")
        sessions, lags["fake model"] = await _receive(model_conn, model, 60)
        session_ids = {
            server: await _model_session_ids(server, bases[server], sid, token, calls[server])
            for server in servers
        }
    finally:
        for process in processes.values():
            await stop_process(process)
        for child_process in [model, *(c for pairs in callers.values() for c, _ in pairs)]:
            child_process.join(10)
            if child_process.is_alive():
                child_process.terminate()

    cpu = {name: cpu1[name] - cpu0[name] for name in cpu1}
    server_cpu = {server: cpu.pop(server) for server in servers}
    runs = {}
    for server in servers:
        problems: Counter[str] = Counter()
        if connected[server] < plan.calls:
            reasons = "; ".join(failures[server][:3])
            problems[f"failed to connect ({reasons})"] = plan.calls - connected[server]
        run = analyse(server, calls[server], sessions, session_ids[server], t0, t1, problems)
        run.connect_s = connect_s
        run.server_cpu_s = server_cpu[server]
        run.load_cpu_s = cpu
        run.load_busy_s = sum(busy1[n] - busy0[n] for n in plan.load_cpus)
        # The server core's busy time apart from the other servers measured with this one.
        siblings = sum(seconds for other, seconds in server_cpu.items() if other != server)
        run.server_cpu_busy_s = busy1[SERVER_CPU] - busy0[SERVER_CPU] - siblings
        run.rss_idle, run.rss_loaded = rss_idle[server], rss_loaded[server]
        run.load_lag_p99_ms = {name: _lag_p99(lag, t0, t1) for name, lag in lags.items()}
        run.load_lag_max_ms = {name: _lag_p99(lag, t0, t1, 100) for name, lag in lags.items()}
        run.load_cpus = len(plan.load_cpus)
        runs[server] = run
    return runs


def _lag_p99(lag: tuple[array, array], t0: float, t1: float, percentile: float = 99) -> float:
    times, lags = np.frombuffer(lag[0]), np.frombuffer(lag[1])
    inside = lags[(times >= t0) & (times <= t1)]
    return float(np.percentile(inside, percentile) * 1000) if inside.size else math.nan


# --- analysis --------------------------------------------------------------------------------


def analyse(server, calls, sessions, session_ids, t0, t1, problems) -> Run:
    inbound, outbound = [], []
    lost = underruns = 0
    underrun_s = 0.0
    least_buffered = math.inf
    counts = defaultdict(int)
    active = 0
    for call_sid, call in calls.items():
        if call["ended_early"]:
            problems["the server ended the call before the hang-up"] += 1
            continue
        session = sessions.get(session_ids.get(call_sid) or "")
        if session is None or not len(call["recv_t"]):
            problems["no model session or no agent audio"] += 1
            continue
        active += 1
        in_t, in_n, out_t, out_n = (np.frombuffer(a, dtype=a.typecode) for a in session)
        sent_t, sent_ts = np.frombuffer(call["sent_t"]), np.frombuffer(call["sent_ts"], "q")
        recv_t, recv_n = np.frombuffer(call["recv_t"]), np.frombuffer(call["recv_n"], "q")

        # Caller → model: the model has a frame once its appends reach the frame's end.
        frame_end_ms = sent_ts - sent_ts[0] + FRAME_MS
        needed = frame_end_ms * ULAW_BYTES_PER_MS * MODEL_BYTES_PER_ULAW_BYTE[server]
        appended = np.searchsorted(np.cumsum(in_n), needed)
        in_window = (sent_t >= t0) & (sent_t <= t1)
        arrived = in_window & (appended < len(in_n))
        lost += int(np.count_nonzero(in_window & ~arrived))
        inbound.append(in_t[appended[arrived]] - sent_t[arrived])
        counts["caller frames"] += int(np.count_nonzero(in_window))
        counts["caller audio ms"] += FRAME_MS * int(np.count_nonzero(in_window))
        counts["appends"] += int(np.count_nonzero((in_t >= t0) & (in_t <= t1)))

        # Model → caller: a frame can leave once the delta holding its last sample was sent.
        needed = np.cumsum(recv_n) * PCM_BYTES_PER_ULAW_BYTE
        delta = np.searchsorted(np.cumsum(out_n), needed)
        in_window = (recv_t >= t0) & (recv_t <= t1)
        if np.any(delta[in_window] >= len(out_n)):
            problems["the caller got audio the model never sent (matching failed)"] += 1
            print(f"  matching failed for {call_sid}: the caller got {int(recv_n.sum())} μ-law "
                  f"bytes ({len(recv_n)} messages, first at {recv_t[0] - t0:+.2f} s), session "
                  f"{session_ids.get(call_sid)} sent {int(out_n.sum())} pcm bytes ({len(out_n)} "
                  f"deltas, first at {(out_t[0] - t0) if len(out_t) else math.nan:+.2f} s); "
                  f"the model had {len(sessions)} sessions for {len(calls)} calls",
                  file=sys.stderr)  # fmt: skip
            continue
        outbound.append(recv_t[in_window] - out_t[delta[in_window]])
        counts["media to caller"] += int(np.count_nonzero(in_window))
        counts["agent audio ms"] += int(recv_n[in_window].sum()) / ULAW_BYTES_PER_MS
        counts["deltas"] += int(np.count_nonzero((out_t >= t0) & (out_t <= t1)))
        mark_t, echo_t = np.frombuffer(call["mark_t"]), np.frombuffer(call["echo_t"])
        counts["marks"] += int(np.count_nonzero((mark_t >= t0) & (mark_t <= t1)))
        counts["mark echoes"] += int(np.count_nonzero((echo_t >= t0) & (echo_t <= t1)))
        if out_t[-1] < t1 - 0.2:  # deltas are at most 130 ms apart
            problems["the model's answer ended before the window's end"] += 1
        if call["clears"]:
            problems["Twilio `clear` received (unexpected barge-in)"] += 1

        # Playback as Twilio's buffer runs it: each frame plays from its arrival or from the end
        # of the one before, whichever is later. A frame arriving after the previous one has
        # finished is an underrun: a gap the caller hears in the middle of the answer.
        play_end = recv_t[0] + recv_n[0] / ULAW_BYTES_PER_MS / 1000
        for t, n in zip(recv_t[1:].tolist(), recv_n[1:].tolist(), strict=True):
            if t0 <= t <= t1:
                least_buffered = min(least_buffered, play_end - t)
                if t > play_end:
                    underruns += 1
                    underrun_s += t - play_end
            play_end = max(t, play_end) + n / ULAW_BYTES_PER_MS / 1000

    window = t1 - t0
    per_call_second = {k: v / (active * window) for k, v in counts.items()}
    return Run(
        server=server,
        calls=active,
        window_s=window,
        server_cpu_s=math.nan,
        rss_idle=0,
        rss_loaded=0,
        load_cpu_s={},
        load_busy_s=math.nan,
        server_cpu_busy_s=math.nan,
        load_lag_p99_ms={},
        inbound_ms=np.concatenate(inbound) * 1000,
        outbound_ms=np.concatenate(outbound) * 1000,
        lost_inbound=lost,
        underruns=underruns,
        underrun_ms=underrun_s * 1000,
        least_buffered_ms=max(0.0, least_buffered) * 1000,
        per_call_second=per_call_second,
        problems=problems,
    )


# --- is the figure the server's? ------------------------------------------------------------

MAX_LAG_MS = 5.0  # the load generator's event-loop lag p99 above which a figure is refused
MAX_LOAD_SHARE = 0.85  # a load process's share of a core above which it is called saturated
MAX_OTHERS_SHARE = 0.1  # other processes' share of the server's core that voids a run


def generator_problem(run: Run, max_lag_ms: float = MAX_LAG_MS) -> str | None:
    """Why the load generator (callers and fake model) may have shaped this run's figures, or
    None: a load process's event loop lagging more than *max_lag_ms* (p99, over the window) or
    once more than the latency budget (a stall: the machine's or the generator's), a load
    process using more than MAX_LOAD_SHARE of a core, or the load CPUs busy (whoever used
    them) above SATURATED."""
    for name, lag in run.load_lag_p99_ms.items():
        if not lag <= max_lag_ms:
            return f"generator saturated: {name}'s event-loop lag p99 {lag:.1f} ms > {max_lag_ms:g}"
    for name, lag in run.load_lag_max_ms.items():
        if not lag <= BUDGETS["p99_ms"]:  # one stall this long is in the latency figures
            return f"generator stalled: {name}'s event loop once {lag:.0f} ms late"
    for name, seconds in run.load_cpu_s.items():
        if seconds / run.window_s >= MAX_LOAD_SHARE:
            return f"generator saturated: {name} used {seconds / run.window_s:.0%} of a core"
    if run.load_share >= SATURATED:
        return f"generator saturated: the load CPUs {run.load_share:.0%} busy"
    others = run.server_core_busy - run.server_share
    if others >= MAX_OTHERS_SHARE:
        return f"machine busy: other processes took {others:.0%} of the server's core"
    return None


def within_budget(run: Run, latency: bool = True) -> str | None:
    """Why the server did not carry this run's calls within the latency budget, or None: p99
    frame latency ≤ 20 ms each way, no underrun, every call connected and streaming in real
    time. With *latency* False, only the last: every call connected and in real time, the
    server below SATURATED of its core."""
    if run.problems:
        return "; ".join(f"{n} calls: {p}" for p, n in run.problems.items())
    if run.realtime < 0.98:
        return f"only {run.realtime:.0%} of the audio got through"
    if not latency:
        share = run.server_share
        return f"the server used {share:.0%} of its core" if share >= SATURATED else None
    inbound, outbound = p99s(run)
    if max(inbound, outbound) > BUDGETS["p99_ms"]:
        return f"p99 {inbound:.1f} / {outbound:.1f} ms"
    if run.underruns:
        return f"{run.underruns} underruns"
    return None


def p99s(run: Run) -> tuple[float, float]:
    return float(np.percentile(run.inbound_ms, 99)), float(np.percentile(run.outbound_ms, 99))


@dataclass
class Capacity:
    """The most calls one server carried within the budget, found by trying."""

    server: str
    found: int | None = None  # the most calls that passed (None: not even the first step)
    failed: int | None = None  # the fewest that failed
    run: Run | None = None  # the run at *found*
    stopped: str | None = None  # why the search stopped short (the load generator)
    steps: list[tuple[int, str]] = field(default_factory=list)  # calls → verdict
    realtime: Capacity | None = None  # when none is within budget: the most in real time


async def find_capacity(
    server: str,
    plan: Plan,
    greeting: str,
    personas: Path,
    start: int,
    resolution: float,
    max_lag_ms: float,
    retries: int,
    latency: bool = True,
) -> Capacity:
    """Doubling from *start* calls until a step misses the budget, then bisection until the
    bracket is narrower than *resolution* (a share of the calls). Each step is a fresh run of
    *plan* (a short window). A step where the load generator lagged (or the machine was busy)
    is tried again up to *retries* times; if refused still, it bounds the search like a miss,
    and a result bounded by it is a lower bound, and says so."""
    capacity = Capacity(server)
    calls, refused, refusal = start, None, ""
    while True:
        for attempt in range(1 + retries):  # a neighbour's burst passes: try the step again
            print(f"  {server}: trying {calls} calls …", file=sys.stderr)
            step = dataclasses.replace(plan, calls=calls)
            run = await run_server(server, step, greeting, personas)
            problem = generator_problem(run, max_lag_ms)
            if problem is None:
                break
            if attempt < retries:
                capacity.steps.append((calls, f"{problem}; tried again"))
        if problem is not None:
            capacity.steps.append((calls, problem))
            if refused is None or calls < refused:
                refused, refusal = calls, f"at {calls} calls: {problem}"
        elif (miss := within_budget(run, latency)) is None:
            capacity.steps.append((calls, "within budget"))
            capacity.found, capacity.run = calls, run
        else:
            capacity.steps.append((calls, miss))
            capacity.failed = min(calls, capacity.failed or calls)
        bounds = [n for n in (capacity.failed, refused) if n is not None]
        if not bounds:
            calls *= 2
            continue
        upper = min(bounds)
        # The search stopped short of the server's limit when a refused step bounds it.
        capacity.stopped = refusal if upper == refused else None
        if capacity.found is None:
            calls = upper // 2
            if calls < 1 or any(c == calls for c, _ in capacity.steps):
                return capacity
        elif upper - capacity.found <= max(1, resolution * capacity.found):
            return capacity
        else:
            calls = (capacity.found + upper) // 2


def median_run(runs: list[Run]) -> Run:
    """The run whose CPU per call-second is the median (the lower one of an even count), of
    the runs whose figures can be reported if there are any."""
    reportable = [run for run in runs if generator_problem(run) is None] or runs
    ordered = sorted(reportable, key=lambda run: run.cpu_ms_per_call_second)
    return ordered[(len(ordered) - 1) // 2]


def median_round(rounds: list[dict[str, Run]], servers: list[str]) -> int:
    """The round whose phoneagent ÷ relay ratio is the median (the lower one of an even
    count), of the rounds whose figures can all be reported if there are any; without both
    servers, the round of the first server's median run."""
    if "phoneagent" not in servers or "relay" not in servers:
        median = median_run([r[servers[0]] for r in rounds])
        return next(i for i, r in enumerate(rounds) if r[servers[0]] is median)
    reportable = [
        i for i, r in enumerate(rounds) if all(generator_problem(run) is None for run in r.values())
    ] or list(range(len(rounds)))

    def ratio(i: int) -> float:
        return (
            rounds[i]["phoneagent"].cpu_ms_per_call_second
            / rounds[i]["relay"].cpu_ms_per_call_second
        )

    ordered = sorted(reportable, key=ratio)
    return ordered[(len(ordered) - 1) // 2]


def rounds_table(
    rounds: list[dict[str, Run]], servers: list[str], max_lag_ms: float
) -> float | None:
    """Each round's CPU per call-second and phoneagent's ratios within the round; returns the
    median of phoneagent's ratios to the relay (None if no round had both)."""
    bases = [s for s in ("relay", "relay-pcm16") if s in servers and "phoneagent" in servers]
    print(f"\nCPU per call-second (ms), round by round ({len(rounds)} rounds, the order "
          "alternating; a figure from a refused run in brackets):\n")  # fmt: skip
    ratio_heads = "".join(f" | phoneagent ÷ {b}" for b in bases)
    print("| round | " + " | ".join(servers) + ratio_heads + " |")
    print("| ---: |" + " ---: |" * (len(servers) + len(bases)))
    ratios: dict[str, list[float]] = {b: [] for b in bases}
    for number, this in enumerate(rounds, 1):
        ok = {s: generator_problem(this[s], max_lag_ms) is None for s in servers}
        cells = [
            f"{this[s].cpu_ms_per_call_second:.2f}" if ok[s] else
            f"({this[s].cpu_ms_per_call_second:.2f})"
            for s in servers
        ]  # fmt: skip
        for base in bases:
            if ok["phoneagent"] and ok[base]:
                cpu = this["phoneagent"].cpu_ms_per_call_second
                value = cpu / this[base].cpu_ms_per_call_second
                ratios[base].append(value)
                cells.append(f"{value:.2f}×")
            else:
                cells.append("—")
        print(f"| {number} | " + " | ".join(cells) + " |")
    medians = {b: float(np.median(v)) if v else None for b, v in ratios.items()}
    print("| median | " + " | ".join("" for _ in servers) + "".join(
        f" | {m:.2f}×" if m is not None else " | —" for m in medians.values()) + " |")  # fmt: skip
    return medians.get("relay")


def side_by_side(runs: list[Run], capacities: dict[str, Capacity], max_lag_ms: float) -> None:
    """One line per server: the fixed-load figures, the found capacity, the ratios to the relay."""
    relay = next((r for r in runs if r.server == "relay"), None)
    relay_cap = capacities.get("relay")
    refused = {r.server: generator_problem(r, max_lag_ms) for r in runs}

    def ratio(value: float | None, base: float | None) -> str:
        if value is None or base is None or not base or math.isnan(value) or math.isnan(base):
            return "—"
        return f"{value / base:.2f}×"

    def found_ratio(cap: Capacity | None) -> str:
        """Found calls over the relay's; a bound when either is a lower bound."""
        if cap is None or relay_cap is None or cap.found is None or relay_cap.found is None:
            return "—"
        if cap.stopped and relay_cap.stopped:
            return "—"
        prefix = "≥ " if cap.stopped else "≤ " if relay_cap.stopped else ""
        return prefix + ratio(cap.found, relay_cap.found)

    print(
        "| server | calls | CPU per call-second (ms) | ÷ relay | calls per core (found) | "
        "÷ relay | memory per call (MiB) | ÷ relay | caller → model p50 / p99 (ms) | "
        "model → caller p50 / p99 (ms) | underruns |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    relay_ok = relay is not None and refused.get("relay") is None
    for run in runs:
        cap = capacities.get(run.server)
        found = cap.found if cap is not None else None
        if cap is None:
            found_cell = "not searched"
        elif found is None:
            found_cell = "none" if cap.stopped is None else "not found: not reported"
        else:
            found_cell = f"≥ {found} (search stopped)" if cap.stopped else f"{found}"
        if cap is not None and found is None and cap.realtime is not None:
            rt = cap.realtime
            calls_rt = "none" if rt.found is None else f"{'≥ ' if rt.stopped else ''}{rt.found}"
            found_cell = f"none within budget; {calls_rt} in real time"
        problem = refused[run.server]
        if problem is not None:
            label, _, detail = problem.partition(": ")
            print(
                f"| {run.server} | {run.calls} | {label}: not reported ({detail}) "
                f"| | {found_cell} | {found_ratio(cap)} | | | | | |"
            )
            continue
        cpu, mib = run.cpu_ms_per_call_second, run.mib_per_call
        (i50, i99), (o50, o99) = (np.percentile(v, [50, 99]) for v in (run.inbound_ms,
                                                                     run.outbound_ms))  # fmt: skip
        print(
            f"| {run.server} | {run.calls} | {cpu:.2f} | "
            f"{ratio(cpu, relay.cpu_ms_per_call_second) if relay_ok else '—'} | {found_cell} | "
            f"{found_ratio(cap)} | {mib:.3f} | "
            f"{ratio(mib, relay.mib_per_call) if relay_ok else '—'} | {i50:.2f} / {i99:.2f} | "
            f"{o50:.2f} / {o99:.2f} | {run.underruns} |"
        )
    for cap in capacities.values():
        for kind, c in (("", cap), (" (real time only)", cap.realtime)):
            if c is None:
                continue
            steps = ", ".join(f"{calls}: {verdict}" for calls, verdict in c.steps)
            share = f"; the server used {c.run.server_share:.0%} of its core there" if c.run else ""
            print(f"- {cap.server} search{kind}{share}: {steps}")


# --- report ----------------------------------------------------------------------------------


def _ms(values: np.ndarray) -> str:
    p50, p99 = np.percentile(values, [50, 99])
    return f"{p50:.2f} | {p99:.2f} | {values.max():.1f}"


def report(runs: list[Run], plan: Plan, relay_ratio: float | None = None) -> None:
    print(
        "\nConcurrent calls, full duplex in real time (caller: 20 ms frames; agent: one long "
        f"answer, the model {plan.lead_ms:.0f} ms ahead of playback). Calls started over "
        f"{plan.ramp:.0f} s; measured over {plan.seconds:.0f} s after {plan.warmup:.0f} s of "
        f"warm-up. Server pinned to CPU {SERVER_CPU}; {plan.caller_processes} callers "
        f"process(es) and the fake model on CPU {','.join(map(str, plan.load_cpus))}.\n"
    )
    print(
        "| server | calls | CPU per call-second (ms) | calls per core | memory idle (MiB) | "
        "memory with calls (MiB) | memory per call (MiB) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in runs:
        cpu = run.cpu_ms_per_call_second
        print(
            f"| {run.server} | {run.calls} | {cpu:.2f} | {1000 / cpu:.0f} | "
            f"{run.rss_idle / MIB:.1f} | {run.rss_loaded / MIB:.1f} | {run.mib_per_call:.3f} |"
        )
    print(
        "\n| server | calls | caller → model p50 / p99 / max (ms) | model → caller p50 / p99 / "
        "max (ms) | frames lost | underruns (total gap ms) | least audio buffered (ms) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in runs:
        print(
            f"| {run.server} | {run.calls} | {_ms(run.inbound_ms)} | {_ms(run.outbound_ms)} | "
            f"{run.lost_inbound} | {run.underruns} ({run.underrun_ms:.0f}) | "
            f"{run.least_buffered_ms:.0f} |"
        )
    kinds = ["caller frames", "appends", "deltas", "media to caller", "marks", "mark echoes"]
    print(
        "\n| per call-second | calls | caller audio (ms) | agent audio (ms) | "
        + " | ".join(kinds)
        + " |\n| --- |"
        + " ---: |" * (len(kinds) + 3)
    )
    for run in runs:
        rates = run.per_call_second
        cells = [f"{rates.get(k, 0):.0f}" for k in ("caller audio ms", "agent audio ms")]
        cells += [f"{rates.get(k, 0):.1f}" for k in kinds]
        print(f"| {run.server} | {run.calls} | {' | '.join(cells)} |")

    print()
    for run in runs:
        name, window, lag = f"{run.server}, {run.calls} calls", run.window_s, run.load_lag_p99_ms
        parts = [
            f"{process} {seconds / window:.0%}"
            + (f" (loop lag p99 {lag[process]:.1f} ms)" if process in lag else "")
            for process, seconds in run.load_cpu_s.items()
        ]
        others = run.load_busy_s - sum(run.load_cpu_s.values())
        parts.append(f"other processes {max(0.0, others) / window:.0%}")
        state = "SATURATED" if run.load_share >= SATURATED else "not saturated"
        print(f"{name}: load CPU: {', '.join(parts)} — {state}")
        others = run.server_cpu_busy_s - run.server_cpu_s
        state = "SATURATED" if run.server_core_busy >= SATURATED else "not saturated"
        print(
            f"{name}: server CPU: server {run.server_cpu_s / window:.0%}, other processes "
            f"{max(0.0, others) / window:.0%} — {state}; all calls streaming "
            f"{run.connect_s:.1f} s after the first started"
        )
        if run.realtime < 0.98:
            print(
                f"  the load fell behind real time ({run.realtime:.0%} of the audio got through "
                "in the worse direction): CPU per call-second is underestimated"
            )
        for problem, count in run.problems.items():
            print(f"  problem in {count} calls: {problem}")
    budgets(runs, plan, relay_ratio)


def budgets(runs: list[Run], plan: Plan, relay_ratio: float | None = None) -> None:
    """The design budgets' verdicts; *relay_ratio*, when given, is phoneagent's CPU over the
    relay's as the median of several rounds (see ``rounds_table``)."""
    main = next((r for r in runs if r.server == "phoneagent"), None)
    if main is None:
        return
    relay = next((r for r in runs if r.server == "relay" and r.calls == main.calls), None)
    light = next((r for r in runs[1:] if r.server == "phoneagent" and r is not main), None)

    def timing(run: Run, ok: bool, limit_ms: float) -> str:
        """The verdict on a timing budget of *limit_ms*, unless the run cannot tell."""
        if ok:
            return "meets"
        others = run.server_core_busy - run.server_share
        lag = max(run.load_lag_p99_ms.values())
        if run.server_core_busy >= SATURATED and others >= 0.1:
            return (
                f"NOT MEASURED: other processes took {others:.0%} of the server's core "
                f"(the server itself {run.server_share:.0%})"
            )
        if run.server_core_busy >= SATURATED:
            return f"MISSES (the server used {run.server_share:.0%} of its core)"
        if run.load_share >= SATURATED or lag >= limit_ms:
            return (
                f"NOT MEASURED: the load CPU was {run.load_share:.0%} busy and the load "
                f"generator's own event loops lagged {lag:.0f} ms (p99): this measures the "
                "load generator more than the server"
            )
        return "MISSES"

    def p99(run: Run) -> tuple[float, float]:
        return float(np.percentile(run.inbound_ms, 99)), float(np.percentile(run.outbound_ms, 99))

    cpu = main.cpu_ms_per_call_second
    lower_bound = ""
    if main.server_share >= SATURATED or main.realtime < 0.98:
        lower_bound = (
            f" (a lower bound: the server used {main.server_share:.0%} of its core and "
            f"{main.realtime:.0%} of the audio got through)"
        )
    lines = [
        f"server CPU per call-second ≤ {BUDGETS['cpu_ms']:.0f} ms: {cpu:.2f} ms at "
        f"{main.calls} calls{lower_bound} — "
        + ("MISSES" if cpu > BUDGETS["cpu_ms"] else "cannot tell" if lower_bound else "meets")
    ]
    if relay is not None or relay_ratio is not None:
        ratio = relay_ratio if relay_ratio is not None else cpu / relay.cpu_ms_per_call_second
        verdict = "MISSES" if ratio > BUDGETS["ratio"] else "meets"
        if lower_bound and verdict == "meets":
            verdict = "cannot tell (phoneagent's CPU is a lower bound)"
        how = " (the median of the rounds' ratios)" if relay_ratio is not None else ""
        lines.append(
            f"the same over a pure relay's ≤ {BUDGETS['ratio']}×: {ratio:.2f}×{how} — {verdict}"
        )
    inbound, outbound = p99(main)
    lines += [
        f"200 calls, p99 frame latency ≤ {BUDGETS['p99_ms']:.0f} ms (measured at {main.calls}): "
        f"caller → model {inbound:.2f} ms, model → caller {outbound:.2f} ms — "
        + timing(main, max(inbound, outbound) <= BUDGETS["p99_ms"], BUDGETS["p99_ms"]),
        f"200 calls, no underrun (measured at {main.calls}): {main.underruns} — "
        + timing(main, main.underruns == 0, plan.lead_ms),
        f"memory per active call ≤ {BUDGETS['mib_per_call']:.0f} MiB: "
        f"{main.mib_per_call:.3f} MiB — "
        + ("meets" if main.mib_per_call <= BUDGETS["mib_per_call"] else "MISSES"),
    ]
    if light is not None:
        worst = max(p99(light))
        lines.append(
            f"bridge added latency p99 ≤ {BUDGETS['bridge_p99_ms']:.0f} ms (100 calls; measured "
            f"at {light.calls}): bounded above by the end-to-end p99, {worst:.2f} ms (loopback and "
            "load generator included) — "
            + timing(light, worst <= BUDGETS["bridge_p99_ms"], BUDGETS["bridge_p99_ms"])
        )
    print("\nBudgets (DESIGN.md):")
    for line in lines:
        print(f"- {line}")


# --- main ------------------------------------------------------------------------------------


def long_answer(seconds: float) -> str:
    """Text whose speech lasts at least *seconds*."""
    once = len(synthesize(PARAGRAPH, 24000)) / 48_000
    return " ".join([PARAGRAPH] * (math.ceil(seconds / once) + 1))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=50, help="concurrent calls")
    parser.add_argument(
        "--latency-calls", type=int, default=0, help="calls of an extra phoneagent run (0: none)"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds after the ramp")
    parser.add_argument("--ramp", type=float, default=10.0, help="seconds over which calls start")
    parser.add_argument("--lead-ms", type=float, default=100.0, help="model ahead of playback")
    parser.add_argument("--servers", default=",".join(SERVERS), help="phoneagent,relay")
    parser.add_argument(
        "--together",
        action="store_true",
        help="the fixed-load runs of all --servers at the same time, all on the server CPU",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="fixed-load runs of every server, in alternating order; each shows its median",
    )
    parser.add_argument(
        "--load-cpus",
        default=str(LOAD_CPU),
        help=f"CPUs for the load (the server has CPU {SERVER_CPU})",
    )
    parser.add_argument("--caller-processes", type=int, default=1, help="split the callers")
    parser.add_argument(
        "--find",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="search each server's most calls within the budget (--no-find: skip)",
    )
    parser.add_argument("--find-start", type=int, default=25, help="the search's first step")
    parser.add_argument("--find-seconds", type=float, default=10.0, help="each step's window")
    parser.add_argument("--find-retries", type=int, default=1, help="tries again of a refused step")
    parser.add_argument(
        "--find-resolution", type=float, default=0.1, help="stop when the bracket is this narrow"
    )
    parser.add_argument(
        "--max-lag-ms",
        type=float,
        default=MAX_LAG_MS,
        help="refuse figures when a load process's event loop lagged more (p99)",
    )
    parser.add_argument(
        "--pipecat-python",
        default=os.environ.get("PIPECAT_PYTHON", sys.executable),
        help="a Python with pipecat-ai (the bench extra): default $PIPECAT_PYTHON or this one",
    )
    args = parser.parse_args()
    load_cpus = [int(cpu) for cpu in args.load_cpus.split(",")]
    if SERVER_CPU in load_cpus or max(load_cpus) >= (os.cpu_count() or 1):
        parser.error(f"--load-cpus: CPUs other than {SERVER_CPU}, below {os.cpu_count()}")
    plan = Plan(args.calls, args.seconds, args.warmup, args.ramp, args.lead_ms, load_cpus,
                args.caller_processes, args.pipecat_python)  # fmt: skip
    configure_logging("console", "warning")
    pin(0, load_cpus)
    # Every call hears agent audio until the hang-up, even if the calls take long to connect.
    greeting = long_answer(2 * plan.ramp + plan.warmup + plan.seconds + 60)
    servers = args.servers.split(",")
    rounds: list[dict[str, Run]] = []
    capacities: dict[str, Capacity] = {}
    step = dataclasses.replace(plan, seconds=args.find_seconds, warmup=3.0, ramp=5.0)
    with tempfile.TemporaryDirectory() as tmp:
        personas = bench_personas(Path(tmp), greeting=greeting)
        for number in range(args.rounds):
            # The host's speed drifts over minutes: alternating the order puts every server
            # as often early as late.
            this: dict[str, Run] = {}
            if args.together:
                print(f"{args.servers} together, {plan.calls} calls each (round {number + 1}) …",
                      file=sys.stderr)  # fmt: skip
                this = await run_servers(servers, plan, greeting, personas)
            for server in servers if number % 2 == 0 else servers[::-1]:
                if server not in this:
                    print(f"{server}, {plan.calls} calls (round {number + 1}) …", file=sys.stderr)
                    this[server] = await run_server(server, plan, greeting, personas)
            rounds.append(this)
        if args.together:  # one round for all: its ratios are taken in the same seconds
            runs = [rounds[median_round(rounds, servers)][server] for server in servers]
        else:
            runs = [median_run([r[server] for r in rounds]) for server in servers]
        if args.latency_calls:
            print(f"phoneagent, {args.latency_calls} calls …", file=sys.stderr)
            latency = dataclasses.replace(plan, calls=args.latency_calls)
            runs.append(await run_server("phoneagent", latency, greeting, personas))
        if args.find:
            for server in args.servers.split(","):
                print(f"{server}: searching the most calls within the budget …", file=sys.stderr)
                capacities[server] = await find_capacity(server, step, greeting, personas,
                    args.find_start, args.find_resolution, args.max_lag_ms,
                    args.find_retries)  # fmt: skip
                cap = capacities[server]
                if cap.found is None and cap.stopped is None:
                    print(f"{server}: none within budget; the most in real time …", file=sys.stderr)
                    cap.realtime = await find_capacity(server, step, greeting, personas,
                        args.find_start, args.find_resolution, args.max_lag_ms,
                        args.find_retries, latency=False)  # fmt: skip
    print(
        f"\nSide by side ({plan.calls} calls, {plan.seconds:.0f} s window; calls per core found "
        f"by search, {args.find_seconds:.0f} s per step; a figure measured while the load "
        f"generator lagged more than {args.max_lag_ms:g} ms p99 is not reported):\n"
    )
    side_by_side(runs, capacities, args.max_lag_ms)
    ratio = None
    if len(rounds) > 1:
        ratio = rounds_table(rounds, servers, args.max_lag_ms)
    report(runs, plan, ratio)


if __name__ == "__main__":
    asyncio.run(main())
