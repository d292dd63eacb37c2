import asyncio
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from conftest import EXAMPLE_PERSONAS

from phoneagent.config import load_settings
from phoneagent.logs import configure_logging
from phoneagent.personas import PersonaRegistry
from phoneagent.server import AccessLogger, create_app, create_metrics_app
from phoneagent.state import STATE

TWILIO_ROUTES = [
    ("POST", "/twilio/voice"),
    ("GET", "/twilio/stream"),
    ("POST", "/twilio/stream-status"),
    ("POST", "/twilio/call-status"),
    ("POST", "/twilio/dial-status"),
]
FORM_ROUTES = [path for method, path in TWILIO_ROUTES if method == "POST"]


@pytest.fixture
def personas_dir(tmp_path) -> Path:
    directory = tmp_path / "personas"
    shutil.copytree(EXAMPLE_PERSONAS, directory)
    return directory


@pytest.fixture
async def client(aiohttp_client, valid_env, personas_dir):
    settings = load_settings(valid_env)
    app = create_app(settings, PersonaRegistry(personas_dir, environ={}), reload_interval=0.05)
    server = TestServer(app)
    await server.start_server(access_log_class=AccessLogger)
    return await aiohttp_client(server)


async def test_healthz(client):
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_readyz_when_personas_loaded(client):
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {"status": "ready", "draining": False, "personas": 4}


async def test_readyz_turns_503_when_draining(client):
    client.app[STATE].draining = True
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["draining"] is True
    # Draining is not dying: liveness stays green so the orchestrator does not kill live calls.
    assert (await client.get("/healthz")).status == 200


async def test_metrics_in_prometheus_text_format(client, aiohttp_client):
    assert (await client.get("/metrics")).status == 404  # never on the port Twilio reaches
    metrics = await aiohttp_client(create_metrics_app(client.app[STATE]))
    response = await metrics.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert "phoneagent_active_calls 0.0" in text
    assert "# TYPE phoneagent_media_processing_seconds histogram" in text


@pytest.mark.parametrize(("method", "path"), TWILIO_ROUTES)
async def test_twilio_routes_refuse_unsigned_requests(client, method, path):
    response = await client.request(
        method, path, data={"CallSid": "CA1"} if method == "POST" else None
    )
    assert response.status == 403


# Twilio POSTs application/x-www-form-urlencoded; anything else is refused before the signature
# check, and never with a 500.
BAD_BODIES = {
    "multipart": (
        {"Content-Type": "multipart/form-data; boundary=b"},
        b'--b\r\nContent-Disposition: form-data; name="CallSid"; filename="x.txt"\r\n\r\n'
        b"CA1\r\n--b--\r\n",
        415,
    ),
    "json": ({"Content-Type": "application/json"}, b'{"CallSid": "CA1"}', 415),
    "invalid utf-8": (
        {"Content-Type": "application/x-www-form-urlencoded"},
        b"CallSid=CA1&From=\xff\xfe",
        400,
    ),
    "unknown charset": (
        {"Content-Type": "application/x-www-form-urlencoded; charset=klingon"},
        b"CallSid=CA1",
        400,
    ),
}


@pytest.mark.parametrize("path", FORM_ROUTES)
@pytest.mark.parametrize("body", BAD_BODIES, ids=str)
async def test_twilio_routes_refuse_bodies_that_are_not_a_form(client, path, body, capfd):
    headers, data, status = BAD_BODIES[body]
    configure_logging("json", "info")
    try:
        response = await client.post(path, data=data, headers=headers)
        assert response.status == status
        assert "Traceback" not in await response.text()
        err = capfd.readouterr().err
    finally:
        logging.getLogger().handlers.clear()
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    expected = "twilio_webhook_not_a_form" if status == 415 else "twilio_webhook_malformed_form"
    assert expected in events
    assert "Traceback" not in err


async def test_unknown_route_is_404(client):
    assert (await client.get("/nope")).status == 404


async def test_running_server_picks_up_persona_changes(client, personas_dir):
    registry = client.app[STATE].personas
    assert registry.current.for_number("+14155550142").id == "trattoria-luca"
    path = personas_dir / "trattoria-luca.toml"
    path.write_text(path.read_text().replace('"+14155550143"', '"+14155550144"'))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    for _ in range(100):
        if registry.current.for_number("+14155550144").id == "trattoria-luca":
            break
        await asyncio.sleep(0.02)
    assert registry.current.for_number("+14155550144").id == "trattoria-luca"
    assert registry.current.for_number("+14155550143").id == "bright-smile-dental"  # default


async def test_access_log_is_one_structured_json_line(client, capfd):
    configure_logging("json", "info")
    try:
        await client.get("/healthz?token=secret-in-query")
        await asyncio.sleep(0.05)
        lines = [line for line in capfd.readouterr().err.splitlines() if "http_request" in line]
    finally:
        logging.getLogger().handlers.clear()
    record = json.loads(lines[-1])
    assert record["event"] == "http_request"
    assert (record["method"], record["path"], record["status"]) == ("GET", "/healthz", 200)
    assert "secret-in-query" not in lines[-1]


async def test_oversized_request_bodies_are_refused(client):
    response = await client.post("/twilio/voice", data={"Body": "x" * 100_000})
    assert response.status == 413
