"""The `phoneagent` command, run as a real process."""

import os
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import BROKEN_PERSONAS, EXAMPLE_PERSONAS, PROJECT_ROOT, VALID_ENV, free_port

from phoneagent import __version__


def phoneagent(*args, env=None, timeout=30):
    full_env = {k: v for k, v in os.environ.items() if k not in VALID_ENV} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "phoneagent.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=PROJECT_ROOT,
        timeout=timeout,
    )


def test_version():
    result = phoneagent("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"phoneagent {__version__}"


def test_personas_check_passes_the_examples():
    result = phoneagent("personas", "check", str(EXAMPLE_PERSONAS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        f"OK    {EXAMPLE_PERSONAS / 'bright-smile-dental.toml'}",
        f"OK    {EXAMPLE_PERSONAS / 'bright-smile-reminders.toml'}",
        f"OK    {EXAMPLE_PERSONAS / 'renxin-clinic.toml'}",
        f"OK    {EXAMPLE_PERSONAS / 'trattoria-luca.toml'}",
    ]


def test_personas_check_reports_a_bad_keypad_action_with_file_field_and_reason(tmp_path):
    bad = tmp_path / "line.toml"
    text = (EXAMPLE_PERSONAS / "bright-smile-dental.toml").read_text()
    bad.write_text(text.replace('"0" = "transfer:front_desk"', '"0" = "transfer:reception"'))
    result = phoneagent("personas", "check", str(tmp_path))
    assert result.returncode != 0
    assert (
        f"ERROR {bad}: keypad.0: 'transfer:reception' is not end_call or one of: " in result.stdout
    )


def test_personas_check_defaults_to_the_configured_directory():
    result = phoneagent("personas", "check", env={"PHONEAGENT_PERSONAS_DIR": str(BROKEN_PERSONAS)})
    assert result.returncode == 1
    assert "bad-e164.toml" in result.stdout


def test_personas_check_reports_every_broken_file():
    result = phoneagent("personas", "check", str(BROKEN_PERSONAS), env={"HOME": "/root"})
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f"OK    {BROKEN_PERSONAS / 'claims-number.toml'}" in lines
    errors = [line for line in lines if line.startswith("ERROR ")]
    assert len(errors) == 14
    assert (
        f"ERROR {BROKEN_PERSONAS / 'unknown-key.toml'}: voise: "
        "unknown key (check the spelling against the README)"
    ) in errors
    assert "14 problem(s)" in result.stderr


def test_serve_names_each_missing_credential():
    result = phoneagent("serve")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert [line.split(": ")[2].split()[0] for line in lines] == [
        "PUBLIC_URL",
        "TWILIO_ACCOUNT_SID",
        "TWILIO_AUTH_TOKEN",
        "STEPFUN_API_KEY",
    ]


def test_serve_refuses_broken_personas():
    env = VALID_ENV | {"PHONEAGENT_PERSONAS_DIR": str(BROKEN_PERSONAS)}
    result = phoneagent("serve", "--port", "1", env=env)
    assert result.returncode == 2
    assert "persona error:" in result.stderr
    assert "bad-e164.toml: numbers[0]" in result.stderr


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def server():
    port = free_port()
    env = os.environ | VALID_ENV | {"PORT": str(port), "PHONEAGENT_METRICS_PORT": str(free_port())}
    process = subprocess.Popen(
        [sys.executable, "-m", "phoneagent.cli", "serve", "--host", "127.0.0.1"],
        cwd=PROJECT_ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            get(base + "/healthz")
            break
        except OSError:
            time.sleep(0.05)
    yield base, process
    process.terminate()
    process.wait(timeout=10)


def test_serve_answers_health_and_readiness(server):
    base, process = server
    assert get(base + "/healthz") == (200, '{"status": "ok"}')
    status, body = get(base + "/readyz")
    assert status == 200
    assert '"personas": 4' in body  # the four examples
    process.terminate()
    logs = process.communicate(timeout=10)[1]
    assert process.returncode == 0
    assert '"event": "server_starting"' in logs
    assert '"path": "/readyz"' in logs
    for secret in (VALID_ENV["TWILIO_AUTH_TOKEN"], VALID_ENV["STEPFUN_API_KEY"]):
        assert secret not in logs


def test_serve_refuses_a_corrupt_outbox_at_start_up(tmp_path):
    (tmp_path / "outbox.sqlite3").write_bytes(b"this is not a database" * 100)
    env = VALID_ENV | {
        "PHONEAGENT_DATA_DIR": str(tmp_path),
        "PORT": str(free_port()),
        "PHONEAGENT_METRICS_PORT": str(free_port()),
    }
    result = phoneagent("serve", "--host", "127.0.0.1", env=env)
    assert result.returncode == 2
    assert "webhook outbox error" in result.stderr
    assert "outbox.sqlite3" in result.stderr


def test_events_commands_are_wired(tmp_path):
    env = {"PHONEAGENT_DATA_DIR": str(tmp_path)}
    listed = phoneagent("events", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    missing = phoneagent("events", "redeliver", "evt_nothing", env=env)
    assert missing.returncode == 1


def deep_toml(directory, depth=5000):
    """A persona file holding an array nested ``depth`` deep (valid TOML, past any stack)."""
    directory.mkdir(exist_ok=True)
    path = directory / "deep.toml"
    path.write_text('name = "Deep"\nv = ' + "[" * depth + "1" + "]" * depth + "\n")
    return path


def test_personas_check_reports_a_deeply_nested_file_like_any_bad_file(tmp_path):
    path = deep_toml(tmp_path / "personas")
    result = phoneagent("personas", "check", str(tmp_path / "personas"))
    assert result.returncode == 1
    assert f"ERROR {path}: is not valid TOML: arrays or inline tables nested too deeply" in (
        result.stdout + result.stderr
    )
    assert "RecursionError" not in result.stdout + result.stderr


def test_serve_refuses_a_deeply_nested_persona_file(tmp_path):
    deep_toml(tmp_path / "personas")
    env = VALID_ENV | {"PHONEAGENT_PERSONAS_DIR": str(tmp_path / "personas")}
    result = phoneagent("serve", "--port", "1", env=env)
    assert result.returncode == 2
    assert "persona error:" in result.stderr and "deep.toml: is not valid TOML" in result.stderr
    assert "RecursionError" not in result.stderr
