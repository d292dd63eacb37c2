"""No log level prints a secret: not ours, not a library's (the websockets server in the test
kit's fake model writes every handshake header at debug level, the StepFun key among them; the
model connection's client, aiohttp, must print none of it)."""

import asyncio
import io
import logging

import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.logs import REDACTED, configure_logging, redact, secret_values
from phoneagent.realtime.base import SessionConfig
from phoneagent.realtime.connection import ModelConnector, ModelUnavailable
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.stack import LocalStack
from phoneagent.testing.twilio_signing import Signature
from phoneagent.testing.wav import CALLER_BOOKING_WAV

STEPFUN_KEY = "sk-stepfun-0123456789abcdef"
DENTAL = "+14155550100"


@pytest.fixture
def log_output():
    """Log lines as `phoneagent serve` writes them, kept in memory instead of stderr."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def capture_logging(stream, *args, **kwargs) -> None:
    configure_logging(*args, **kwargs)
    logging.getLogger().handlers[0].setStream(stream)


@pytest.mark.parametrize("log_format", ["json", "console"])
@pytest.mark.parametrize("level", ["debug", "info", "warning"])
async def test_a_whole_call_logs_no_secret_at_any_level(log_output, level, log_format):
    model = FakeRealtimeServer(api_key=STEPFUN_KEY, speed=None)
    stack = LocalStack(EXAMPLE_PERSONAS, model=model)
    token = stack.settings.twilio_auth_token
    capture_logging(log_output, log_format, level, secrets={STEPFUN_KEY, token})
    async with stack, stack.caller(to=DENTAL, speed=0) as caller:
        stack.state.prewarmer.connector.api_key = STEPFUN_KEY
        await caller.dial(signature=Signature.WRONG)  # a forgery: logged as a warning
        await caller.dial()
        await caller.connect()
        await caller.play_wav(CALLER_BOOKING_WAV)
        await caller.wait_for_event("media", timeout=10)
        await caller.hangup()
    logging.getLogger("test").debug("headers: %s", {"Authorization": f"Bearer {STEPFUN_KEY}"})
    written = log_output.getvalue()
    assert written  # something was logged at every level tried
    assert STEPFUN_KEY not in written and token not in written
    if level == "debug":  # the fake's websockets printed the handshake: a key to redact
        assert f"Authorization: {REDACTED}" in written


async def test_the_model_client_prints_no_key_at_debug_level(log_output):
    """aiohttp's own loggers at debug, through a refused upgrade (its error carries the request's
    headers), the model-name fallback, a session, and a model gone: the key appears nowhere,
    not even to be redacted, and not in the errors the connection raises."""
    capture_logging(log_output, "console", "debug", secrets=set())  # nothing to redact by value
    config = SessionConfig("Be brief.", "linjiajiejie", 600, 300, 1000)
    async with FakeRealtimeServer(api_key=STEPFUN_KEY) as model:
        model.models = frozenset({"stepaudio-2.5-realtime"})
        connector = ModelConnector(url=model.url, api_key=STEPFUN_KEY, model="step-2.5-realtime")
        model.fail_next_handshakes(1, status=401)
        with pytest.raises(ModelUnavailable) as refused:
            await connector.open(config)
        session = await connector.open(config)  # 400 for this name, then its alias
        closing = asyncio.create_task(model.close())  # answered as the session reads
        _ = [event async for event in session.events()]
        await closing
        with pytest.raises(ModelUnavailable) as unreachable:
            await connector.open(config)
        await connector.close()
    written = log_output.getvalue()
    assert "model_name_refused" in written  # the connection's own lines were captured
    # Only the fake's websockets server prints headers (its own logger): from the client side
    # no line carries one, redacted or not.
    client_lines = [line for line in written.splitlines() if "websockets.server" not in line]
    assert not [line for line in client_lines if REDACTED in line or "Bearer" in line]
    for text in (written, str(refused.value), repr(refused.value), str(unreachable.value)):
        assert STEPFUN_KEY not in text


@pytest.mark.parametrize(
    "line",
    [
        "> Authorization: Bearer abc.def-ghi",
        '{"headers": {"Authorization": "Basic QUM6dG9rZW4="}}',
        "authorization=Bearer xyz123",
        "X-Twilio-Signature: 0Oz1bTWqlCpRQKTp7jFp7rCe4Tk=",
    ],
)
def test_credential_headers_are_redacted_in_any_shape(line):
    cleaned = redact(line)
    assert REDACTED in cleaned
    for secret in ("abc.def-ghi", "QUM6dG9rZW4=", "xyz123", "0Oz1bTWqlCpRQKTp7jFp7rCe4Tk="):
        assert secret not in cleaned


def test_secret_named_variables_are_secrets():
    env = {
        "STEPFUN_API_KEY": "sk-0123456789",
        "TWILIO_AUTH_TOKEN": "0123456789abcdef",
        "BRIGHT_SMILE_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "PUBLIC_URL": "https://voice.example.com",
        "SHORT_KEY": "abc",
    }
    assert secret_values(env) == {
        "sk-0123456789",
        "0123456789abcdef",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    }


def test_passwords_in_urls_are_secrets_whatever_the_variable_is_called():
    env = {
        "PHONEAGENT_DATABASE_URL": "postgresql://phoneagent:s3cr%2Ft-pa55@db:5432/pa",
        "OTHER_DSN": "postgresql://db/pa?sslmode=require&password=query-pa55word",
        "PUBLIC_URL": "https://voice.example.com",
        "SHORT_URL": "postgresql://u:pw@db/x",
    }
    secrets = secret_values(env)
    for password in ("s3cr%2Ft-pa55", "s3cr/t-pa55", "query-pa55word"):
        assert password in secrets
    assert "pw" not in secrets
    line = "connecting to postgresql://phoneagent:s3cr/t-pa55@db with password=query-pa55word"
    assert "pa55" not in redact(line, secrets)
