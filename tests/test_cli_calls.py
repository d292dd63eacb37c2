"""`phoneagent demo`, `serve` and `simulate` as real processes placing real (simulated) calls."""

import asyncio
import os
import sys
import wave

import pytest
from conftest import PROJECT_ROOT, VALID_ENV, free_port

from phoneagent.demo import CALLER_BOOKING_TEXT
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.wav import CALLER_RECORDINGS


def clean_env(**extra: str) -> dict[str, str]:
    names = {*VALID_ENV, "STEPFUN_API_KEY", "STEPFUN_REALTIME_URL", "PHONEAGENT_DATA_DIR"}
    return {k: v for k, v in os.environ.items() if k not in names} | extra


async def run(*args: str, env: dict[str, str], timeout: float = 120) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "phoneagent.cli", *args,
        cwd=PROJECT_ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode, out.decode(), err.decode()


def wav_seconds(path) -> float:
    with wave.open(str(path)) as wav:
        return wav.getnframes() / wav.getframerate()


async def test_demo_places_one_call_and_prints_the_transcript(tmp_path):
    code, out, err = await run(
        "demo", "--speed", "4", env=clean_env(PHONEAGENT_DATA_DIR=str(tmp_path))
    )
    assert code == 0, out + err
    assert "the built-in fake model stands in" in out
    lines = out.splitlines()
    agent = [line for line in lines if "agent: " in line]
    caller = [line for line in lines if "caller: " in line]
    assert "Thank you for calling Bright Smile Dental" in agent[0]
    assert caller == [next(line for line in lines if CALLER_BOOKING_TEXT in line)]
    assert len(agent) == 2
    heard = tmp_path / "demo-caller-heard.wav"
    assert f"what the caller heard: {heard}" in out
    assert wav_seconds(heard) > 5


@pytest.fixture
async def served(tmp_path):
    """`phoneagent serve` as a process, talking to a fake model running in this test."""
    async with FakeRealtimeServer(api_key=VALID_ENV["STEPFUN_API_KEY"]) as model:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = clean_env(**(VALID_ENV | {"PUBLIC_URL": base, "PORT": str(port),
                                        "PHONEAGENT_METRICS_PORT": str(free_port())}),
                        STEPFUN_REALTIME_URL=model.url)  # fmt: skip
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "phoneagent.cli", "serve", "--host", "127.0.0.1",
            cwd=PROJECT_ROOT, env=env, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        yield base, model
        process.terminate()
        await process.wait()


async def test_simulate_dials_a_running_server(served, tmp_path):
    base, model = served
    out_wav = tmp_path / "heard.wav"
    env = clean_env(
        TWILIO_ACCOUNT_SID=VALID_ENV["TWILIO_ACCOUNT_SID"],
        TWILIO_AUTH_TOKEN=VALID_ENV["TWILIO_AUTH_TOKEN"],
    )
    args = ("simulate", "--url", base, "--to", "+14155550142", "--out", str(out_wav))
    code, out, err = await run(*args, "--speed", "4", env=env)
    assert code == 0, out + err
    assert "Buonasera, Trattoria Luca!" in out  # the restaurant persona answered its number
    assert "caller: (caller spoke for" in out  # the fake model's honest transcription
    assert wav_seconds(out_wav) > 3
    assert model.sessions_opened == 1
    await model.wait_for(lambda: model.sessions_open == 0, 5)


async def test_simulate_with_the_wrong_auth_token_is_refused(served, tmp_path):
    base, model = served
    env = clean_env(TWILIO_ACCOUNT_SID=VALID_ENV["TWILIO_ACCOUNT_SID"], TWILIO_AUTH_TOKEN="wrong")
    code, out, _ = await run("simulate", "--url", base, "--to", "+14155550142", env=env)
    assert code == 1
    assert "did not connect a stream (HTTP 403)" in out
    assert model.sessions_opened == 0


async def test_simulate_names_missing_credentials():
    code, _, err = await run(
        "simulate", "--url", "http://127.0.0.1:9", "--to", "+1", env=clean_env()
    )
    assert code == 2
    assert "TWILIO_ACCOUNT_SID is not set" in err
    assert "TWILIO_AUTH_TOKEN is not set" in err


# --- a Mandarin line ----------------------------------------------------------------------------


async def test_demo_calls_the_mandarin_persona_with_a_mandarin_caller(tmp_path):
    code, out, err = await run(
        "demo", "--persona", "renxin-clinic", "--speed", "4",
        env=clean_env(PHONEAGENT_DATA_DIR=str(tmp_path)),
    )  # fmt: skip
    assert code == 0, out + err
    assert "persona 'renxin-clinic' answers +14155550160" in out
    assert "(caller plays caller_booking_zh.wav)" in out
    agent = [line for line in out.splitlines() if "agent: " in line]
    caller = [line for line in out.splitlines() if "caller: " in line]
    assert "您好，这里是仁心家庭诊所，我是前台小林。" in agent[0]
    assert caller[0].endswith(f"caller: {CALLER_RECORDINGS['zh'].text}")
    assert agent[1].endswith("agent: 这里是内置的模拟模型，我听到您说的话了。")
    assert wav_seconds(tmp_path / "demo-caller-heard.wav") > 10


async def test_demo_names_the_personas_when_asked_for_an_unknown_one(tmp_path):
    code, _, err = await run(
        "demo", "--persona", "nobody", env=clean_env(PHONEAGENT_DATA_DIR=str(tmp_path))
    )
    assert code == 2
    assert "no persona 'nobody'; the personas are: bright-smile-dental, renxin-clinic" in err
    # A persona that only calls out answers no call: the demo (an inbound call) says so.
    code, _, err = await run(
        "demo", "--persona", "bright-smile-reminders",
        env=clean_env(PHONEAGENT_DATA_DIR=str(tmp_path)),
    )  # fmt: skip
    assert code == 2
    assert "persona 'bright-smile-reminders' only places calls (phoneagent call)" in err


async def test_simulate_calls_a_persona_by_id_in_its_language(served, tmp_path):
    base, model = served
    env = clean_env(
        TWILIO_ACCOUNT_SID=VALID_ENV["TWILIO_ACCOUNT_SID"],
        TWILIO_AUTH_TOKEN=VALID_ENV["TWILIO_AUTH_TOKEN"],
        PHONEAGENT_PERSONAS_DIR=str(PROJECT_ROOT / "personas"),
    )
    args = (
        "simulate",
        "--url",
        base,
        "--persona",
        "renxin-clinic",
        "--out",
        str(tmp_path / "h.wav"),
    )
    code, out, err = await run(*args, "--speed", "4", env=env)
    assert code == 0, out + err
    assert "calling +14155550160" in out  # the persona's number
    assert "(caller plays caller_booking_zh.wav)" in out  # a caller speaking Mandarin
    assert "agent: 您好，这里是仁心家庭诊所" in out
    await model.wait_for(lambda: model.sessions_open == 0, 5)


async def test_simulate_needs_a_number_or_a_persona(tmp_path):
    env = clean_env(
        TWILIO_ACCOUNT_SID=VALID_ENV["TWILIO_ACCOUNT_SID"],
        TWILIO_AUTH_TOKEN=VALID_ENV["TWILIO_AUTH_TOKEN"],
        PHONEAGENT_PERSONAS_DIR=str(tmp_path),
    )
    code, _, err = await run("simulate", "--url", "http://127.0.0.1:9", env=env)
    assert (code, "simulate needs --to NUMBER, or --persona ID" in err) == (2, True)
    code, _, err = await run("simulate", "--url", "http://127.0.0.1:9", "--persona", "x", env=env)
    assert code == 2 and f"cannot read {tmp_path / 'x.toml'}" in err
