import socket
from pathlib import Path

import pytest

from phoneagent.config import CREDENTIALS, ConfigError, load_settings, redact_database_url


def problems_for(env: dict[str, str], **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(env, **kwargs)
    return caught.value.problems


def test_defaults_apply_when_only_credentials_are_set(valid_env):
    settings = load_settings(valid_env)
    assert settings.port == 8080
    assert settings.twilio_api_base_url == "https://api.twilio.com"
    assert settings.stepfun_realtime_url == "wss://api.stepfun.com/v1/realtime"
    assert settings.stepfun_model == "stepaudio-2.5-realtime"
    assert settings.personas_dir == Path("personas")
    assert settings.data_dir == Path("data")
    assert (settings.log_format, settings.log_level) == ("json", "info")


def test_every_variable_is_read(valid_env):
    env = valid_env | {
        "PORT": "9000",
        "PUBLIC_URL": "https://voice.example.com/",
        "TWILIO_API_BASE_URL": "http://127.0.0.1:4010",
        "STEPFUN_REALTIME_URL": "ws://127.0.0.1:4020/v1/realtime",
        "STEPFUN_MODEL": "stepaudio-2.5-realtime",
        "PHONEAGENT_PERSONAS_DIR": "/etc/phoneagent/personas",
        "PHONEAGENT_DATA_DIR": "/var/lib/phoneagent",
        "LOG_FORMAT": "console",
        "LOG_LEVEL": "DEBUG",
    }
    settings = load_settings(env)
    assert settings.port == 9000
    assert settings.public_url == "https://voice.example.com"  # trailing slash dropped
    assert settings.twilio_api_base_url == "http://127.0.0.1:4010"
    assert settings.stepfun_realtime_url == "ws://127.0.0.1:4020/v1/realtime"
    assert settings.stepfun_model == "stepaudio-2.5-realtime"
    assert settings.personas_dir == Path("/etc/phoneagent/personas")
    assert settings.data_dir == Path("/var/lib/phoneagent")
    assert (settings.log_format, settings.log_level) == ("console", "debug")


def test_each_missing_credential_is_named_on_its_own_line():
    problems = problems_for({})
    assert len(problems) == len(CREDENTIALS)
    for name, problem in zip(CREDENTIALS, problems, strict=True):
        assert problem.startswith(f"{name} is not set")


@pytest.mark.parametrize("name", list(CREDENTIALS))
def test_one_missing_credential(valid_env, name):
    del valid_env[name]
    assert problems_for(valid_env) == [f"{name} is not set: {CREDENTIALS[name]}"]


def test_blank_credential_counts_as_missing(valid_env):
    valid_env["STEPFUN_API_KEY"] = "   "
    assert problems_for(valid_env)[0].startswith("STEPFUN_API_KEY is not set")


def test_credentials_not_required_for_offline_commands():
    assert load_settings({}, require_credentials=False).public_url == ""


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("PORT", "http", "PORT must be a TCP port number from 1 to 65535, not 'http'"),
        ("PORT", "70000", "PORT must be a TCP port number"),
        ("PORT", "-1", "PORT must be a TCP port number"),
        ("PUBLIC_URL", "http://voice.example.com", "PUBLIC_URL must be an https:// URL"),
        ("PUBLIC_URL", "voice.example.com", "PUBLIC_URL must be an https:// URL"),
        ("PUBLIC_URL", "https://voice.example.com/?a=1", "PUBLIC_URL must not have a query"),
        ("TWILIO_ACCOUNT_SID", "AC123", "TWILIO_ACCOUNT_SID is malformed"),
        ("TWILIO_ACCOUNT_SID", "SK" + "0" * 32, "TWILIO_ACCOUNT_SID is malformed"),
        ("TWILIO_API_BASE_URL", "api.twilio.com", "TWILIO_API_BASE_URL must be an absolute"),
        ("STEPFUN_REALTIME_URL", "https://api.stepfun.com", "STEPFUN_REALTIME_URL must be an"),
        ("STEPFUN_MODEL", "step 2.5", "STEPFUN_MODEL is malformed"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT must be one of json, console, not 'xml'"),
        ("LOG_LEVEL", "loud", "LOG_LEVEL must be one of debug, info, warning"),
    ],
)
def test_malformed_values_are_named(valid_env, name, value, expected):
    valid_env[name] = value
    problems = problems_for(valid_env)
    assert len(problems) == 1
    assert problems[0].startswith(expected)


def test_http_public_url_allowed_for_localhost(valid_env):
    valid_env["PUBLIC_URL"] = "http://127.0.0.1:8080"
    settings = load_settings(valid_env)
    assert settings.stream_url == "ws://127.0.0.1:8080/twilio/stream"


def test_stream_url_is_wss_on_the_public_host(valid_env):
    valid_env["PUBLIC_URL"] = "https://voice.example.com/agent/"
    assert load_settings(valid_env).stream_url == "wss://voice.example.com/agent/twilio/stream"


def test_all_problems_reported_together(valid_env):
    valid_env |= {"PORT": "x", "LOG_FORMAT": "xml"}
    del valid_env["TWILIO_AUTH_TOKEN"]
    problems = problems_for(valid_env)
    assert [p.split()[0] for p in problems] == ["TWILIO_AUTH_TOKEN", "PORT", "LOG_FORMAT"]


def test_secrets_never_appear_in_errors_or_repr(valid_env):
    secret_token = "tok en-with-space-secret"
    valid_env["TWILIO_AUTH_TOKEN"] = secret_token
    problems = problems_for(valid_env)
    assert problems == ["TWILIO_AUTH_TOKEN is malformed: it contains whitespace"]
    assert secret_token not in "\n".join(problems)

    settings = load_settings(valid_env | {"TWILIO_AUTH_TOKEN": "abc123secret"})
    text = repr(settings) + str(settings)
    assert "abc123secret" not in text
    assert valid_env["STEPFUN_API_KEY"] not in text
    assert settings.twilio_account_sid in text  # not a secret: it helps operators


def test_webhook_shared_key_is_optional_secret_and_checked(valid_env):
    assert load_settings(valid_env).twilio_webhook_shared_key == ""
    settings = load_settings(valid_env | {"TWILIO_WEBHOOK_SHARED_KEY": " sharedsecret42 "})
    assert settings.twilio_webhook_shared_key == "sharedsecret42"
    assert "sharedsecret42" not in repr(settings) + str(settings)
    problems = problems_for(valid_env | {"TWILIO_WEBHOOK_SHARED_KEY": "shared secret42"})
    assert problems == ["TWILIO_WEBHOOK_SHARED_KEY is malformed: it contains whitespace"]


def test_instance_name_defaults_to_the_host_name_and_is_checked(valid_env):
    assert load_settings(valid_env).instance_name == socket.gethostname()
    settings = load_settings(valid_env | {"PHONEAGENT_INSTANCE_NAME": " voice-7f9c-x2 "})
    assert settings.instance_name == "voice-7f9c-x2"
    for bad in ("voice 1", "x" * 201, "voix-é"):
        [problem] = problems_for(valid_env | {"PHONEAGENT_INSTANCE_NAME": bad})
        assert problem.startswith("PHONEAGENT_INSTANCE_NAME is malformed")


def test_database_url_is_optional_checked_and_never_shown_with_its_password(valid_env):
    assert load_settings(valid_env).database_url == ""  # SQLite in PHONEAGENT_DATA_DIR
    url = "postgresql://phoneagent:pg-secret-pw@db.internal:5432/phoneagent?sslmode=require"
    settings = load_settings(valid_env | {"PHONEAGENT_DATABASE_URL": url})
    assert settings.database_url == url
    assert "pg-secret-pw" not in repr(settings) + str(settings)
    assert redact_database_url(url) == (
        "postgresql://phoneagent:***@db.internal:5432/phoneagent?sslmode=require"
    )
    assert redact_database_url("postgres://u@h/d?password=pg-secret-pw") == (
        "postgres://u@h/d?password=***"
    )
    for bad, expected in [
        ("mysql://phoneagent:pg-secret-pw@db/phoneagent", "must be a postgresql:// URL"),
        ("postgresql://phoneagent:pg-secret-pw@db.internal:5432", "names no database"),
        ("postgresql://phoneagent:pg-secret-pw@db.internal:port/db", "invalid host or port"),
    ]:
        [problem] = problems_for(valid_env | {"PHONEAGENT_DATABASE_URL": bad})
        assert problem.startswith("PHONEAGENT_DATABASE_URL") and expected in problem
        assert "pg-secret-pw" not in problem
