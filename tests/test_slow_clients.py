"""Slow clients on the port Twilio reaches: a request head or body that trickles is cut at its
deadline, clients waiting to be authenticated are bounded, and real calls still get through.

Real sockets on loopback; deadlines of a second or two (settings), never a long sleep. Timing
is asserted only as "closed before a generous guard"."""

import asyncio
import contextlib
import logging
import re
from pathlib import Path

import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.config import Settings
from phoneagent.logs import configure_logging
from phoneagent.testing.stack import LocalStack, demo_credentials

DENTAL = "+14155550100"
GUARD_SECONDS = 15  # far above every deadline here: only a server that never cuts hits it
BODY = b"CallSid=CA" + b"0" * 32 + b"&To=%2B14155550100&From=%2B14155550123&AccountSid=AC00"


@pytest.fixture
def logs(caplog):
    configure_logging("json", "info")
    yield lambda: [r.msg for r in caplog.records if isinstance(r.msg, dict)]
    logging.getLogger().handlers.clear()


def stack_with(tmp_path: Path, **settings) -> LocalStack:
    account_sid, auth_token = demo_credentials()
    return LocalStack(
        EXAMPLE_PERSONAS,
        settings=Settings(
            twilio_account_sid=account_sid,
            twilio_auth_token=auth_token,
            personas_dir=EXAMPLE_PERSONAS,
            data_dir=tmp_path,
            **settings,
        ),
        webhooks=False,
    )


async def open_socket(stack: LocalStack) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = int(stack.base_url.rsplit(":", 1)[1])
    return await asyncio.open_connection("127.0.0.1", port)


def request_head(length: int = len(BODY)) -> bytes:
    return (
        "POST /twilio/voice HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the guard)."""
    received = b""
    async with asyncio.timeout(GUARD_SECONDS):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(4096):
                received += chunk
    return received


async def trickle_head(stack: LocalStack, stop: asyncio.Event) -> bool:
    """Send a request head a byte at a time; True when the server closed the connection first."""
    reader, writer = await open_socket(stack)
    try:
        for byte in request_head():
            if stop.is_set():
                return False
            writer.write(bytes([byte]))
            with contextlib.suppress(ConnectionResetError):
                await writer.drain()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):  # a byte every 250 ms, or the server's close
                    if await reader.read(1) == b"":
                        return True
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    finally:
        writer.close()


async def stall_body(stack: LocalStack) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request whose head and half its body arrive, then nothing more."""
    reader, writer = await open_socket(stack)
    writer.write(request_head() + BODY[: len(BODY) // 2])
    await writer.drain()
    return reader, writer


async def test_a_request_head_sent_byte_by_byte_is_cut_at_the_header_deadline(tmp_path):
    async with stack_with(tmp_path, header_seconds=1) as stack:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(GUARD_SECONDS):
            closed = await trickle_head(stack, asyncio.Event())
        elapsed = loop.time() - started
    # The whole head takes ~40 s at this pace: the server closed the connection long before.
    assert closed
    assert elapsed < GUARD_SECONDS


async def test_a_body_that_stalls_is_answered_408_at_the_body_deadline(tmp_path, logs):
    async with stack_with(tmp_path, body_seconds=1) as stack:
        reader, writer = await stall_body(stack)
        answer = await read_until_closed(reader)  # the server answers, then closes
        writer.close()
        metrics = stack.state.metrics.exposition().decode()
        assert stack.state.unauthenticated.count == 0
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 'phoneagent_http_refused_total{reason="body_timeout"} 1.0' in metrics
    [event] = [e for e in logs() if e["event"] == "request_body_timeout"]
    assert (event["path"], event["count"]) == ("/twilio/voice", 1)


async def test_slow_clients_do_not_keep_a_signed_twilio_request_from_an_answer(tmp_path):
    async with stack_with(tmp_path, header_seconds=5, body_seconds=5) as stack:
        stop = asyncio.Event()
        trickling = [asyncio.create_task(trickle_head(stack, stop)) for _ in range(20)]
        stalled = [await stall_body(stack) for _ in range(10)]
        try:
            for _ in range(100):  # every stalled body is being read
                if stack.state.unauthenticated.count == len(stalled):
                    break
                await asyncio.sleep(0.02)
            assert stack.state.unauthenticated.count == len(stalled)
            async with stack.caller(to=DENTAL, speed=0) as caller:
                answer = await caller.dial()
        finally:
            stop.set()
            for _, writer in stalled:
                writer.close()
            await asyncio.gather(*trickling, return_exceptions=True)
    assert answer.status == 200 and answer.ok
    assert answer.stream_url is not None


async def test_past_the_bound_unauthenticated_requests_get_503_logged_and_counted(tmp_path, logs):
    async with stack_with(tmp_path, max_unauthenticated=3, body_seconds=30) as stack:
        stalled = [await stall_body(stack) for _ in range(3)]
        for _ in range(100):
            if stack.state.unauthenticated.count == 3:
                break
            await asyncio.sleep(0.02)
        # One more slow client is refused at once; a real webhook (sent at once) still passes.
        extra_reader, extra_writer = await stall_body(stack)
        refusal = await read_until_closed(extra_reader)
        extra_writer.close()
        async with stack.caller(to=DENTAL, speed=0) as real:
            answer = await real.dial()
        metrics = stack.state.metrics.exposition().decode()
        for _, writer in stalled:
            writer.close()
        for _ in range(100):  # the slots come back as the stalled clients go
            if stack.state.unauthenticated.count == 0:
                break
            await asyncio.sleep(0.02)
        assert stack.state.unauthenticated.count == 0
        # A media stream holds a slot only until its `start` and token check out.
        async with stack.caller(to=DENTAL, speed=0) as caller:
            admitted = await caller.dial()
            await caller.connect()
            await caller.wait_for_event("media", timeout=10)
            during_call = stack.state.unauthenticated.count
            await caller.hangup()
    assert refusal.startswith(b"HTTP/1.1 503 ")
    assert answer.status == 200 and answer.stream_url is not None
    assert 'phoneagent_http_refused_total{reason="unauthenticated_limit"} 1.0' in metrics
    assert re.search(r"^phoneagent_unauthenticated_requests 3.0$", metrics, re.MULTILINE)
    [event] = [e for e in logs() if e["event"] == "unauthenticated_limit_reached"]
    assert (event["path"], event["limit"], event["count"]) == ("/twilio/voice", 3, 1)
    assert admitted.status == 200 and admitted.stream_url is not None
    assert during_call == 0


async def test_health_and_readiness_answer_while_the_bound_is_reached(tmp_path):
    async with stack_with(tmp_path, max_unauthenticated=1, body_seconds=30) as stack:
        _, writer = await stall_body(stack)
        for _ in range(100):
            if stack.state.unauthenticated.count == 1:
                break
            await asyncio.sleep(0.02)
        probe_reader, probe_writer = await open_socket(stack)
        probe_writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await read_until_closed(probe_reader)
        probe_writer.close()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_settings_bound_the_deadlines_and_the_limit():
    from conftest import VALID_ENV

    from phoneagent.config import ConfigError, load_settings

    settings = load_settings(VALID_ENV)
    assert (settings.header_seconds, settings.body_seconds, settings.max_unauthenticated) == (
        10,
        10,
        64,
    )
    env = VALID_ENV | {
        "PHONEAGENT_HEADER_SECONDS": "3",
        "PHONEAGENT_BODY_SECONDS": "4",
        "PHONEAGENT_MAX_UNAUTHENTICATED": "5",
    }
    bounded = load_settings(env)
    assert (bounded.header_seconds, bounded.body_seconds, bounded.max_unauthenticated) == (3, 4, 5)
    with pytest.raises(ConfigError) as caught:
        load_settings(
            VALID_ENV | {"PHONEAGENT_HEADER_SECONDS": "0", "PHONEAGENT_BODY_SECONDS": "x"}
        )
    assert [p.split()[0] for p in caught.value.problems] == [
        "PHONEAGENT_HEADER_SECONDS",
        "PHONEAGENT_BODY_SECONDS",
    ]


async def test_a_console_sign_in_body_that_stalls_is_answered_408_at_the_body_deadline(tmp_path):
    # The sign-in form is the console's one route that reads a body without a session: a client
    # sending half of it and then nothing must not hold its socket (and its handler) for ever.
    async with stack_with(tmp_path, body_seconds=1, console_password="pw") as stack:
        form = b"password=guess&next=%2Fconsole%2Flines"
        reader, writer = await open_socket(stack)
        writer.write(
            b"POST /console/login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            + f"Content-Length: {len(form)}\r\n\r\n".encode()
            + form[: len(form) // 2]
        )
        await writer.drain()
        answer = await read_until_closed(reader)
        writer.close()
        assert stack.state.unauthenticated.count == 0
    assert answer.startswith(b"HTTP/1.1 408 ")
