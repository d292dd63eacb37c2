"""Shared pieces of the multi-process benchmarks (`barge_in.py`, `load.py`).

The server under test runs as its own process pinned to CPU 0; the load (scripted Twilio callers,
fake StepFun model) runs on CPU 1, so the two do not steal each other's core. Process CPU time
and memory are read from /proc (Linux), with no extra dependency.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DENTAL = "+14155550100"  # the example dental persona's number
SERVER_CPU = 0
LOAD_CPU = 1
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def bench_personas(
    directory: Path, *, greeting: str | None = None, barge_in_min_speech_ms: int | None = None
) -> Path:
    """The example personas copied to *directory*, the dental line's greeting and false
    barge-in guard replaced when given."""
    shutil.copytree(ROOT / "personas", directory, dirs_exist_ok=True)
    path = directory / "bright-smile-dental.toml"
    lines = path.read_text().splitlines()
    if greeting is not None:
        if '"' in greeting or "\\" in greeting:
            raise ValueError("the greeting goes into a TOML string: no quotes or backslashes")
        lines = [f'greeting = "{greeting}"' if s.startswith("greeting =") else s for s in lines]
    if barge_in_min_speech_ms is not None:
        at = lines.index("max_call_seconds = 900")
        lines.insert(at, f"barge_in_min_speech_ms = {barge_in_min_speech_ms}")
    path.write_text("\n".join(lines) + "\n")
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(pid: int, cpus: int | Iterable[int]) -> None:
    """Run process *pid* (0: this one) on *cpus* only, if the machine has them."""
    cpus = {cpus} if isinstance(cpus, int) else set(cpus)
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > max(cpus):
        os.sched_setaffinity(pid, cpus)


async def start_process(
    argv: Sequence[str], port: int, env: Mapping[str, str] | None = None, cpu: int = SERVER_CPU
) -> asyncio.subprocess.Process:
    """Start a server process pinned to *cpu* and wait until it accepts connections on
    127.0.0.1:*port*."""
    process = await asyncio.create_subprocess_exec(*argv, env={**os.environ, **(env or {})})
    pin(process.pid, cpu)
    for _ in range(400):
        if process.returncode is not None:
            raise RuntimeError(f"{argv[1:]} exited with {process.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return process
        except OSError:
            await asyncio.sleep(0.05)
    process.terminate()
    raise RuntimeError(f"{argv[1:]} did not start")


async def start_phoneagent(
    model_url: str, personas: Path, sid: str, token: str, max_calls: int, cpu: int = SERVER_CPU
) -> tuple[asyncio.subprocess.Process, str]:
    """`phoneagent serve` on a free loopback port, talking to the model at *model_url* and
    taking up to *max_calls* calls at once; returns the process and its base URL."""
    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="phoneagent-bench-")  # not the checkout's ./data
    atexit.register(shutil.rmtree, data_dir, ignore_errors=True)
    env = {
        "PHONEAGENT_DATA_DIR": data_dir,
        "PORT": str(port),
        "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "TWILIO_ACCOUNT_SID": sid,
        "TWILIO_AUTH_TOKEN": token,
        "STEPFUN_API_KEY": "bench",
        "STEPFUN_REALTIME_URL": model_url,
        "PHONEAGENT_PERSONAS_DIR": str(personas),
        "PHONEAGENT_MAX_CALLS": str(max_calls),
        "LOG_LEVEL": "warning",
        # This checkout's phoneagent, wherever the benchmark is started from.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    argv = [sys.executable, "-m", "phoneagent.cli", "serve", "--host", "127.0.0.1"]
    process = await start_process(argv, port, env, cpu)
    return process, f"http://127.0.0.1:{port}"


async def stop_process(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        await process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process *pid* (all its threads) so far, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces; the fields after it are plain numbers.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14, 15)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process *pid*, of its children alive now and of the children
    it has waited for, from /proc: a server that forks a process per connection (PostgreSQL)
    with all its connections, past and present. 0.0 for a process that has gone."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        # The process or a child of it (field 4, ppid): utime, stime, cutime, cstime (14–17).
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += sum(int(v) for v in fields[11:15]) / _CLOCK_TICKS
    return total


def rss_bytes(pid: int) -> int:
    """Resident memory (VmRSS) of process *pid*, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_busy_seconds() -> dict[int, float]:
    """CPU number → seconds it has been busy (anything but idle and iowait; steal counts as
    busy: the hypervisor gave the time away), from /proc/stat."""
    busy = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks = [int(v) for v in values[:8]]
                busy[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICKS
    return busy
