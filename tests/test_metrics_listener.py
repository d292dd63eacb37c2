"""/metrics lives on its own listener, never on the port Twilio reaches; a bearer token, when
set, is required there. Real sockets throughout, and `phoneagent serve` as a real process."""

import asyncio
import dataclasses
import logging
import os
import sys

import aiohttp
import pytest
from conftest import EXAMPLE_PERSONAS, PROJECT_ROOT, VALID_ENV, free_port, wait_for_port

from phoneagent.config import ConfigError, load_settings
from phoneagent.logs import configure_logging
from phoneagent.testing.stack import LocalStack

TOKEN = "metrics-token-0123456789abcdef"


@pytest.fixture
def logs(caplog):
    configure_logging("json", "info")
    yield lambda: [r.msg for r in caplog.records if isinstance(r.msg, dict)]
    logging.getLogger().handlers.clear()


async def status_and_text(url: str, **headers: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        return response.status, await response.text()


async def test_metrics_are_served_on_their_listener_and_not_on_the_public_port():
    async with LocalStack(EXAMPLE_PERSONAS, webhooks=False) as stack:
        public_status, _ = await status_and_text(f"{stack.base_url}/metrics")
        status, text = await status_and_text(stack.metrics_url)
        # The metrics listener serves metrics only.
        healthz_status, _ = await status_and_text(stack.metrics_url.replace("/metrics", "/healthz"))
    assert public_status == 404
    assert status == 200
    assert "# TYPE phoneagent_active_calls gauge" in text
    assert healthz_status == 404


async def test_with_a_token_the_metrics_listener_requires_it(logs):
    async with LocalStack(EXAMPLE_PERSONAS, webhooks=False) as stack:
        stack.state.settings = dataclasses.replace(stack.state.settings, metrics_token=TOKEN)
        without = await status_and_text(stack.metrics_url)
        wrong = await status_and_text(stack.metrics_url, Authorization="Bearer not-the-token")
        basic = await status_and_text(stack.metrics_url, Authorization=f"Basic {TOKEN}")
        right = await status_and_text(stack.metrics_url, Authorization=f"Bearer {TOKEN}")
        public = await status_and_text(f"{stack.base_url}/metrics", Authorization=f"Bearer {TOKEN}")
    assert [without[0], wrong[0], basic[0]] == [401, 401, 401]
    assert right[0] == 200 and "phoneagent_active_calls" in right[1]
    assert public[0] == 404  # the token opens nothing on the public port
    refusals = [e for e in logs() if e["event"] == "metrics_unauthorized"]
    assert [e["had_token"] for e in refusals] == [False, True, False]
    assert TOKEN not in repr(logs())


def test_metrics_settings_are_validated_one_line_each():
    with pytest.raises(ConfigError) as caught:
        load_settings(
            VALID_ENV
            | {
                "PHONEAGENT_METRICS_HOST": "not a host",
                "PHONEAGENT_METRICS_PORT": "8080",  # PORT's default
                "PHONEAGENT_METRICS_TOKEN": "short-secret",
            }
        )
    problems = caught.value.problems
    assert [p.split()[0] for p in problems] == [
        "PHONEAGENT_METRICS_HOST",
        "PHONEAGENT_METRICS_PORT",
        "PHONEAGENT_METRICS_TOKEN",
    ]
    assert "short-secret" not in "\n".join(problems)
    with pytest.raises(ConfigError) as caught:
        load_settings(VALID_ENV | {"PHONEAGENT_METRICS_TOKEN": "has a space in it, long enough"})
    assert caught.value.problems == [
        "PHONEAGENT_METRICS_TOKEN is malformed: visible ASCII only, no spaces"
    ]
    settings = load_settings(VALID_ENV | {"PHONEAGENT_METRICS_TOKEN": TOKEN})
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9090)
    assert settings.metrics_token == TOKEN and TOKEN not in repr(settings)


async def test_serve_starts_both_listeners_and_keeps_the_token_out_of_its_output(tmp_path):
    port, metrics_port = free_port(), free_port()
    env = os.environ | VALID_ENV | {
        "PORT": str(port), "PHONEAGENT_METRICS_PORT": str(metrics_port),
        "PHONEAGENT_METRICS_HOST": "127.0.0.1", "PHONEAGENT_METRICS_TOKEN": TOKEN,
        "PHONEAGENT_DATA_DIR": str(tmp_path), "PHONEAGENT_PERSONAS_DIR": str(EXAMPLE_PERSONAS),
    }  # fmt: skip
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "phoneagent.cli", "serve", "--host", "127.0.0.1",
        cwd=PROJECT_ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_for_port(port)
        await wait_for_port(metrics_port)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        public = await status_and_text(f"http://127.0.0.1:{port}/metrics")
        health = await status_and_text(f"http://127.0.0.1:{port}/healthz")
        without = await status_and_text(metrics_url)
        right = await status_and_text(metrics_url, Authorization=f"Bearer {TOKEN}")
    finally:
        server.terminate()
        out, err = await asyncio.wait_for(server.communicate(), 30)
    assert (public[0], health[0], without[0], right[0]) == (404, 200, 401, 200)
    assert "phoneagent_active_calls" in right[1]
    logs = err.decode() + out.decode()
    assert '"event": "metrics_listening"' in logs
    assert '"event": "metrics_unauthorized"' in logs
    assert TOKEN not in logs
    assert server.returncode == 0


async def test_serve_refuses_a_metrics_port_equal_to_the_served_port(tmp_path):
    port = free_port()
    env = os.environ | VALID_ENV | {
        "PHONEAGENT_METRICS_PORT": str(port), "PHONEAGENT_DATA_DIR": str(tmp_path),
    }  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "phoneagent.cli", "serve", "--host", "127.0.0.1",
        "--port", str(port), cwd=PROJECT_ROOT, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "PHONEAGENT_METRICS_PORT must differ" in err.decode()


async def test_serve_says_when_the_metrics_port_is_taken(tmp_path):
    taken = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    metrics_port = taken.sockets[0].getsockname()[1]
    env = os.environ | VALID_ENV | {
        "PORT": str(free_port()), "PHONEAGENT_METRICS_PORT": str(metrics_port),
        "PHONEAGENT_DATA_DIR": str(tmp_path),
    }  # fmt: skip
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "phoneagent.cli", "serve", "--host", "127.0.0.1",
            cwd=PROJECT_ROOT, env=env, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        taken.close()
    assert process.returncode == 2
    assert f"cannot listen for metrics on 127.0.0.1:{metrics_port}" in err.decode()
