"""`phoneagent serve` as a real process for the delivery tests, with the test kit's fake model,
a persona whose webhook is a loopback sink and the scripted Twilio caller (imported by module
name, like delivery_helpers)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp

from phoneagent.testing.caller import TwilioCaller

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DENTAL = "+14155550100"
ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "twilio-auth-token-value"
API_KEY = "stepfun-api-key-value"
HOOK_SECRET_ENV = "HOOK_SECRET"
GUARD = 30.0  # seconds: only reached when something is broken


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def personas_with_webhook(directory: Path, url: str) -> Path:
    """The example personas, the dental one sending every event type to ``url``."""
    shutil.copytree(PROJECT_ROOT / "personas", directory)
    dental = directory / "bright-smile-dental.toml"
    dental.write_text(
        dental.read_text() + f'\n[webhook]\nurl = "{url}"\nsecret_env = "{HOOK_SECRET_ENV}"\n'
        'events = ["call.started", "call.transferred", "call.ended"]\n'
    )
    return directory


class ServerProcess:
    """``phoneagent serve`` on a free loopback port; ``wrapper`` runs it inside another command
    (``unshare …``); ``entry``: what Python runs instead of ``-m phoneagent.cli`` (a script that
    adjusts the server first, then calls its ``main``); ``env``: more variables
    (``PHONEAGENT_DATABASE_URL``…). stderr (the JSON log) goes to ``log_path``."""

    def __init__(
        self, *, personas: Path, data_dir: Path, model_url: str, log_path: Path,
        wrapper: Sequence[str] = (), entry: Sequence[str] = ("-m", "phoneagent.cli"),
        env: Mapping[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.env = os.environ | {
            "PUBLIC_URL": self.base, "PORT": str(self.port), "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN, "STEPFUN_API_KEY": API_KEY,
            "STEPFUN_REALTIME_URL": model_url, "PHONEAGENT_PERSONAS_DIR": str(personas),
            "PHONEAGENT_DATA_DIR": str(data_dir), HOOK_SECRET_ENV: "whsec_c2VjcmV0",
            "LOG_FORMAT": "json", "LOG_LEVEL": "info", "PYTHONPATH": str(PROJECT_ROOT),
            "PHONEAGENT_METRICS_PORT": str(self.metrics_port),
        } | dict(env or {})  # fmt: skip
        self.wrapper = list(wrapper)
        self.entry = list(entry)
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> ServerProcess:
        command = [sys.executable, *self.entry, "serve", "--host", "127.0.0.1"]
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.wrapper, *command, cwd=PROJECT_ROOT, env=self.env, stderr=log, stdout=log
            )
        async with asyncio.timeout(GUARD):
            while True:
                if self.process.returncode is not None:
                    raise AssertionError(f"the server exited: {self.log_path.read_text()}")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.close()
                    return self
                except OSError:
                    await asyncio.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def get_json(self, path: str) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as http, http.get(self.base + path) as response:
            return response.status, json.loads(await response.text())

    async def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"  # the operators' listener
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            return await response.text()

    async def stop(self) -> int:
        """SIGTERM (a graceful stop) and wait; SIGKILL if it does not stop."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.terminate()
            try:
                async with asyncio.timeout(GUARD):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        return self.process.returncode

    def caller(self) -> TwilioCaller:
        return TwilioCaller(
            self.base, account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, to=DENTAL, speed=0
        )


async def short_call(server: ServerProcess) -> str:
    """Dial, hear the agent's first audio, hang up; the CallSid."""
    async with server.caller() as caller:
        await caller.dial()
        await caller.connect()
        await caller.wait_for_event("media", timeout=GUARD)
        await caller.hangup()
    return caller.call_sid
