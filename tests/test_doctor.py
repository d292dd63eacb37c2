"""`phoneagent doctor` against the test kit's fakes on loopback: our real server, the fake
StepFun realtime API and the fake Twilio REST API (through the real `twilio` client)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import EXAMPLE_PERSONAS, PROJECT_ROOT, VALID_ENV

from phoneagent import cli, doctor
from phoneagent.config import Settings
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.stack import LocalStack

API_KEY = "sk-doctor-secret-stepfun-key-0123456789"
ACCOUNT_SID = "AC" + "d0c7" * 8
AUTH_TOKEN = "doctorsecrettwiliotoken0123456789"
# Short waits for a refusal: the fake answers at once (this is not a timing assertion).
LIMITS = doctor.Limits(refusal=0.3)

MANDARIN_PERSONA = """
name = "Golden Dragon reservations"
numbers = ["+14155550188"]
language = "zh-CN"
voice = "qingchunshaonv"
greeting = "您好，金龙餐厅，请问有什么可以帮您？"
instructions = "你是金龙餐厅的接待员，用普通话简短地回答。"
busy_message = "抱歉，金龙餐厅的电话都在忙，请稍后再拨。"
apology = "抱歉，我们的电话系统暂时出现故障。"

[end_call]
goodbye = "谢谢您的来电，再见！"
"""


@pytest.fixture
def personas_dir(tmp_path: Path) -> Path:
    """An English persona (one of the examples) and a Mandarin one."""
    directory = tmp_path / "personas"
    directory.mkdir()
    shutil.copy(EXAMPLE_PERSONAS / "bright-smile-dental.toml", directory)
    (directory / "golden-dragon.toml").write_text(MANDARIN_PERSONA, encoding="utf-8")
    return directory


def make_stack(personas_dir: Path, tmp_path: Path, **model_options) -> LocalStack:
    model = FakeRealtimeServer(api_key=API_KEY, speed=None, **model_options)
    settings = Settings(
        twilio_account_sid=ACCOUNT_SID,
        twilio_auth_token=AUTH_TOKEN,
        personas_dir=personas_dir,
        data_dir=tmp_path / "data",
    )
    return LocalStack(personas_dir, model=model, settings=settings)


def register_numbers(stack: LocalStack, **fields) -> None:
    """Every persona number on the fake account, its voice webhook pointing at our server."""
    personas, _ = doctor.load_personas(stack.personas_dir)
    options = {"voice_url": stack.settings.public_url + "/twilio/voice"} | fields
    for persona in personas:
        for number in persona.numbers:
            stack.twilio_api.add_number(number, **options)


def doctor_settings(stack: LocalStack, **changes) -> Settings:
    """What doctor would read on the server's machine: the server's own settings."""
    assert stack.model is not None
    settings = dataclasses.replace(
        stack.settings, stepfun_api_key=API_KEY, stepfun_realtime_url=stack.model.url
    )
    return dataclasses.replace(settings, **changes)


async def run_doctor(settings: Settings) -> list[doctor.Result]:
    personas, results = doctor.load_personas(settings.personas_dir)
    async for result in doctor.run_checks(settings, personas, limits=LIMITS, speed=None):
        results.append(result)
    return results


def by_check(results: list[doctor.Result]) -> dict[str, doctor.Result]:
    return {r.check: r for r in results}


def only(results: list[doctor.Result], status: str) -> list[doctor.Result]:
    return [r for r in results if r.status == status]


async def test_a_correct_setup_passes_everything(personas_dir, tmp_path):
    async with make_stack(personas_dir, tmp_path) as stack:
        register_numbers(stack)
        results = await run_doctor(doctor_settings(stack))

    checks = by_check(results)
    # The only WARN: PUBLIC_URL is loopback http here, which is fine for tests only.
    assert [(r.status, r.check) for r in results if r.status != doctor.PASS] == [
        (doctor.WARN, "twilio public url")
    ]
    assert doctor.exit_status(results) == 0
    for persona in ("bright-smile-dental", "golden-dragon"):
        for step in ("session", "greeting", "answer", "cancel", "truncate"):
            assert f"stepfun {step} [{persona}]" in checks
    assert "Mandarin" in checks["stepfun answer [golden-dragon]"].detail
    assert "word for word" in checks["stepfun greeting [golden-dragon]"].detail
    assert checks["twilio number +14155550188 [golden-dragon]"].status == doctor.PASS
    assert "TwiML" in checks["twilio voice webhook"].detail


async def test_the_greeting_is_sent_as_a_call_sends_it(personas_dir, tmp_path):
    async with make_stack(personas_dir, tmp_path) as stack:
        register_numbers(stack)
        await run_doctor(doctor_settings(stack))
        sessions = [s for s in stack.model.sessions if s.received_events("response.create")]

    persona, _ = doctor.load_personas(personas_dir)
    from phoneagent.call import Call, ToModel

    expected = [
        action.command
        for action in Call(persona=persona[0], stream_sid="MZ", call_sid="CA").begin()
        if isinstance(action, ToModel)
    ]
    import json

    from phoneagent.realtime.stepfun import StepFunDialect

    # The doctor sends the greeting's commands as the dialect encodes them for a call.
    first = sessions[0].received_events("response.create")[0]
    assert first == json.loads(StepFunDialect().encode(expected[-1]))
    assert persona[0].greeting in first["session"]["instructions"]


@pytest.mark.parametrize(
    ("status", "meaning"),
    [(401, "key rejected"), (402, "no balance"), (429, "rate or concurrency limit")],
)
async def test_a_refused_upgrade_is_named(personas_dir, tmp_path, status, meaning):
    async with make_stack(personas_dir, tmp_path) as stack:
        register_numbers(stack)
        stack.model.fail_next_handshakes(1, status)
        results = await run_doctor(doctor_settings(stack))

    key = by_check(results)["stepfun key"]
    assert key.status == doctor.FAIL
    assert meaning in key.detail and str(status) in key.detail
    assert key.fix
    assert not [r for r in results if r.check.startswith("stepfun session")]
    assert doctor.exit_status(results) == 1


async def test_a_wrong_key_is_rejected(personas_dir, tmp_path):
    async with make_stack(personas_dir, tmp_path) as stack:
        register_numbers(stack)
        results = await run_doctor(doctor_settings(stack, stepfun_api_key="sk-wrong"))

    assert by_check(results)["stepfun key"].status == doctor.FAIL
    assert "key rejected (HTTP 401)" in by_check(results)["stepfun key"].detail


async def test_both_model_names_refused_fails(personas_dir, tmp_path):
    async with make_stack(personas_dir, tmp_path, models={"step-audio-2"}) as stack:
        register_numbers(stack)
        results = await run_doctor(doctor_settings(stack))

    model = by_check(results)["stepfun model"]
    assert model.status == doctor.FAIL
    assert "step-2.5-realtime" in model.detail and "stepaudio-2.5-realtime" in model.detail
    assert doctor.exit_status(results) == 1


async def test_only_the_alias_accepted_warns_which_to_configure(personas_dir, tmp_path):
    async with make_stack(personas_dir, tmp_path, models={"stepaudio-2.5-realtime"}) as stack:
        register_numbers(stack)
        results = await run_doctor(doctor_settings(stack, stepfun_model="step-2.5-realtime"))

    model = by_check(results)["stepfun model"]
    assert model.status == doctor.WARN
    assert "STEPFUN_MODEL=stepaudio-2.5-realtime" in model.fix
    assert by_check(results)["stepfun session [golden-dragon]"].status == doctor.PASS
    assert doctor.exit_status(results) == 0


async def test_a_refused_voice_fails_naming_the_persona(personas_dir, tmp_path):
    async with make_stack(personas_dir, tmp_path, voices={"linjiajiejie"}) as stack:
        register_numbers(stack)
        results = await run_doctor(doctor_settings(stack))

    checks = by_check(results)
    assert checks["stepfun key"].status == doctor.PASS
    assert checks["stepfun session [bright-smile-dental]"].status == doctor.PASS
    refused = checks["stepfun session [golden-dragon]"]
    assert refused.status == doctor.FAIL
    assert "voice not found: qingchunshaonv" in refused.detail
    assert "qingchunshaonv" in refused.fix
    assert "stepfun greeting [golden-dragon]" not in checks
    assert doctor.exit_status(results) == 1


async def test_a_refused_truncate_warns(personas_dir, tmp_path):
    async with make_stack(personas_dir, tmp_path, truncate_error=True) as stack:
        register_numbers(stack)
        results = await run_doctor(doctor_settings(stack))

    truncate = by_check(results)["stepfun truncate [bright-smile-dental]"]
    assert truncate.status == doctor.WARN
    assert "conversation.item.truncate refused" in truncate.detail
    assert "barge-in still works" in truncate.fix
    assert by_check(results)["stepfun cancel [bright-smile-dental]"].status == doctor.PASS
    assert doctor.exit_status(results) == 0


async def test_a_paraphrased_greeting_warns_with_both_texts(personas_dir, tmp_path):
    async with make_stack(personas_dir, tmp_path) as stack:
        register_numbers(stack)
        stack.model.responder = lambda context: "Hello there, how can I help?"
        results = await run_doctor(doctor_settings(stack))

    greeting = by_check(results)["stepfun greeting [bright-smile-dental]"]
    assert greeting.status == doctor.WARN
    assert '"Hello there, how can I help?"' in greeting.detail
    assert "Thank you for calling Bright Smile Dental" in greeting.detail


def test_normalise_ignores_case_punctuation_and_spacing():
    assert doctor.normalise("Hello,  WORLD!") == doctor.normalise("hello world")
    assert doctor.normalise("您好，金龙餐厅。") == doctor.normalise("您好 金龙餐厅")
    assert doctor.normalise("Hello world") != doctor.normalise("Hello there world")


async def test_a_wrong_twilio_token_fails(personas_dir, tmp_path):
    async with make_stack(personas_dir, tmp_path) as stack:
        register_numbers(stack)
        results = await run_doctor(doctor_settings(stack, twilio_auth_token="not" + AUTH_TOKEN))

    account = by_check(results)["twilio account"]
    assert account.status == doctor.FAIL
    assert "SID or token wrong" in account.detail
    assert doctor.exit_status(results) == 1


async def test_a_missing_number_fails(personas_dir, tmp_path):
    async with make_stack(personas_dir, tmp_path) as stack:
        stack.twilio_api.add_number(
            "+14155550100", voice_url=stack.settings.public_url + "/twilio/voice"
        )
        results = await run_doctor(doctor_settings(stack))

    checks = by_check(results)
    assert checks["twilio number +14155550100 [bright-smile-dental]"].status == doctor.PASS
    missing = checks["twilio number +14155550188 [golden-dragon]"]
    assert missing.status == doctor.FAIL
    assert "not a number of this Twilio account" in missing.detail
    assert "golden-dragon.toml" in missing.fix


async def test_a_wrong_voice_url_or_method_fails_with_the_actual_value(personas_dir, tmp_path):
    async with make_stack(personas_dir, tmp_path) as stack:
        public = stack.settings.public_url
        stack.twilio_api.add_number("+14155550100", voice_url="https://old.example.com/voice")
        stack.twilio_api.add_number(
            "+14155550188", voice_url=public + "/twilio/voice", voice_method="GET"
        )
        results = await run_doctor(doctor_settings(stack))

    checks = by_check(results)
    url = checks["twilio number +14155550100 [bright-smile-dental]"]
    assert url.status == doctor.FAIL
    assert "'https://old.example.com/voice'" in url.detail
    assert f"{public}/twilio/voice" in url.fix
    method = checks["twilio number +14155550188 [golden-dragon]"]
    assert method.status == doctor.FAIL
    assert "'GET'" in method.detail


def test_public_url_must_be_https_except_locally():
    assert doctor.check_public_url("https://voice.example.com").status == doctor.PASS
    assert doctor.check_public_url("http://localhost:8080").status == doctor.WARN
    assert doctor.check_public_url("http://voice.example.com").status == doctor.FAIL


def test_an_http_public_url_fails_and_the_other_settings_still_load():
    env = VALID_ENV | {"PUBLIC_URL": "http://voice.example.com"}
    settings, results = doctor.load_configuration(env)
    assert [(r.status, r.check) for r in results] == [(doctor.FAIL, "config PUBLIC_URL")]
    assert "https" in results[0].detail and results[0].fix
    assert settings.public_url == ""  # the checks that need it are skipped
    assert settings.stepfun_api_key == VALID_ENV["STEPFUN_API_KEY"]


async def test_a_server_with_another_auth_token_refuses_the_signature(personas_dir, tmp_path):
    async with make_stack(personas_dir, tmp_path) as stack:
        register_numbers(stack)
        # Twilio knows the new token; the server still runs with the old one.
        stack.twilio_api.auth_token = "rotated" + AUTH_TOKEN
        results = await run_doctor(doctor_settings(stack, twilio_auth_token="rotated" + AUTH_TOKEN))

    checks = by_check(results)
    assert checks["twilio account"].status == doctor.PASS
    webhook = checks["twilio voice webhook"]
    assert webhook.status == doctor.FAIL
    assert "403" in webhook.detail
    assert "TWILIO_AUTH_TOKEN" in webhook.fix and "PUBLIC_URL" in webhook.fix


async def test_an_unreachable_public_url_warns(personas_dir, tmp_path):
    async with make_stack(personas_dir, tmp_path) as stack:
        register_numbers(stack)
        settings = doctor_settings(stack)
    # The stack is closed: nothing listens at PUBLIC_URL any more.
    result = await doctor.check_voice_webhook(settings, "+14155550100", LIMITS)
    assert result.status == doctor.WARN
    assert "cannot reach PUBLIC_URL from here; check from outside" in result.fix


def test_an_unknown_persona_is_a_clear_error(monkeypatch, capsys):
    for name, value in VALID_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PHONEAGENT_PERSONAS_DIR", str(EXAMPLE_PERSONAS))
    assert cli.main(["doctor", "--persona", "nope"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "no persona 'nope'" in err and "bright-smile-dental" in err


def test_redact_removes_secrets_from_every_field():
    result = doctor.failed("check " + API_KEY, f"said {API_KEY}", f"use {AUTH_TOKEN}")
    cleaned = doctor.redact(result, [API_KEY, AUTH_TOKEN])
    assert API_KEY not in str(cleaned) and AUTH_TOKEN not in str(cleaned)


# --- the command, as a real process ----------------------------------------------------------


async def phoneagent_doctor(stack: LocalStack, *args: str, **env: str) -> tuple[int, str, str]:
    assert stack.model is not None
    full_env = {k: v for k, v in os.environ.items() if k not in VALID_ENV} | {
        "PUBLIC_URL": stack.settings.public_url,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_API_BASE_URL": stack.twilio_api.base_url,
        "STEPFUN_API_KEY": API_KEY,
        "STEPFUN_REALTIME_URL": stack.model.url,
        "PHONEAGENT_PERSONAS_DIR": str(stack.personas_dir),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "phoneagent.cli",
        "doctor",
        *args,
        env=full_env | env,
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_the_command_prints_one_line_per_check_and_no_secret(personas_dir, tmp_path):
    async with make_stack(personas_dir, tmp_path) as stack:
        register_numbers(stack)
        code, out, err = await phoneagent_doctor(stack, "--persona", "golden-dragon")

    assert code == 0, out + err
    lines = out.splitlines()
    assert all(line.split(" ", 1)[0] in ("PASS", "WARN") for line in lines), out
    assert "PASS stepfun greeting [golden-dragon]: said word for word" in out
    assert "[bright-smile-dental]" not in out  # --persona: the other persona is not checked
    assert "WARN twilio public url:" in out and " — " in out
    for secret in (API_KEY, AUTH_TOKEN):
        assert secret not in out and secret not in err


async def test_the_command_fails_with_json_and_no_secret(personas_dir, tmp_path):
    async with make_stack(personas_dir, tmp_path) as stack:
        # A wrong key, a Twilio token the API refuses, no numbers: failures everywhere.
        stack.twilio_api.auth_token = "other-token"
        wrong_key = API_KEY + "-revoked"
        code, out, err = await phoneagent_doctor(
            stack, "--json", STEPFUN_API_KEY=wrong_key, PUBLIC_URL="http://voice.example.com"
        )

    assert code == 1, out + err
    results = json.loads(out)
    assert all(set(r) == {"status", "check", "detail", "fix"} for r in results)
    statuses = {r["check"]: r["status"] for r in results}
    assert statuses["stepfun key"] == "FAIL"
    assert statuses["twilio account"] == "FAIL"
    assert statuses["config PUBLIC_URL"] == "FAIL"
    for secret in (API_KEY, wrong_key, AUTH_TOKEN):
        assert secret not in out and secret not in err


@pytest.mark.parametrize(
    ("field", "value", "status", "text"),
    [
        ("account_type", "Trial", doctor.WARN, "trial account"),
        ("account_status", "suspended", doctor.FAIL, "the account is suspended"),
    ],
)
async def test_a_trial_or_suspended_account_is_reported(field, value, status, text):
    from phoneagent.testing.fake_twilio_api import FakeTwilioApi

    async with FakeTwilioApi(ACCOUNT_SID, AUTH_TOKEN) as api:
        setattr(api, field, value)
        settings = Settings(
            twilio_account_sid=ACCOUNT_SID,
            twilio_auth_token=AUTH_TOKEN,
            twilio_api_base_url=api.base_url,
        )
        client = doctor.twilio_client(settings)
        try:
            result = await doctor.check_twilio_account(client, settings, LIMITS)
        finally:
            await client.http_client.close()
    assert result.status == status
    assert text in result.detail and result.fix
    assert AUTH_TOKEN not in str(result)  # the Account resource carries the token
