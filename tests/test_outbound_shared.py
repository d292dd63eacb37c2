"""Outbound calls across instances: two servers sharing one PostgreSQL database count each
other's calls placed and not yet ended, ``phoneagent call`` with the database counts the
servers' calls too and gives them its variables, and a call's context recorded by one instance
is what another reports."""

import asyncio
import os
import sys

import pytest
from conftest import PROJECT_ROOT
from outbound_kit import DENTAL, PERSONA, personas_sending_events

from phoneagent.config import Settings
from phoneagent.outbound.routes import DIALER
from phoneagent.outbound.rules import OutboundRefused
from phoneagent.testing.stack import LocalStack, demo_credentials
from phoneagent.testing.webhook_sink import WebhookSink


@pytest.fixture
async def sink():
    async with WebhookSink() as sink:
        yield sink


@pytest.fixture
def personas(tmp_path, sink, monkeypatch):
    return personas_sending_events(tmp_path / "personas", sink.url("/hooks"), monkeypatch)


@pytest.fixture
async def pair(tmp_path, personas, pg_database):
    account_sid, auth_token = demo_credentials()
    stacks = []
    for name in ("a", "b"):
        settings = Settings(
            twilio_account_sid=account_sid, twilio_auth_token=auth_token,
            personas_dir=personas, data_dir=tmp_path / name, database_url=pg_database,
        )  # fmt: skip
        (tmp_path / name).mkdir()
        stack = LocalStack(personas, settings=settings, webhooks=True)
        await stack.start()
        stack.twilio_api.add_number(DENTAL)
        stacks.append(stack)
    try:
        yield stacks
    finally:
        for stack in stacks:
            await stack.close()


async def phoneagent_call(stack, personas, *args):
    """`phoneagent call` with ``stack``'s configuration and its database: (exit, out, err)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "PHONEAGENT_"))}
    env |= {
        "PUBLIC_URL": stack.settings.public_url,
        "TWILIO_ACCOUNT_SID": stack.settings.twilio_account_sid,
        "TWILIO_AUTH_TOKEN": stack.settings.twilio_auth_token,
        "TWILIO_API_BASE_URL": stack.twilio_api.base_url,
        "PHONEAGENT_PERSONAS_DIR": str(personas),
        "PHONEAGENT_DATABASE_URL": stack.settings.database_url,
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "phoneagent.cli", "call", "--to", "+14155550219",
        "--persona", PERSONA, *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


async def place(stack, to):
    dialer = stack._runner.app[DIALER]
    return await dialer.place(to=to, persona=PERSONA, from_=None, variables={}, metadata={})


async def test_instances_count_each_others_calls(pair):
    a, b = pair
    first = await place(a, "+14155550201")
    await place(a, "+14155550202")
    await place(b, "+14155550203")
    for stack in (a, b):
        with pytest.raises(OutboundRefused) as refused:
            await place(stack, "+14155550204")
        assert (refused.value.code, refused.value.status) == ("too_many_calls", 429)
    # One of A's calls ends busy (Twilio tells A): B sees a free place through the database.
    assert await a.twilio_api.finish(first["call_sid"], "busy") == 204
    await a.state.calls.close(5)  # A's record of the end is in the database
    again = await place(b, "+14155550204")
    assert again["status"] == "queued"


async def test_the_cli_with_the_database_counts_the_servers_calls(pair, personas):
    a, _ = pair
    for i in range(3):
        await place(a, f"+1415555021{i}")
    await a.state.calls.close(5)
    code, _, err = await phoneagent_call(a, personas)
    assert code == 1, err
    assert "call refused: too_many_calls" in err
    assert len(a.twilio_api.created) == 3


async def test_the_cli_with_the_database_gives_the_server_the_calls_variables(pair, personas):
    """`phoneagent call --var` asks Twilio itself; the server that answers learns the
    variables from the call's record in the shared database."""
    a, _ = pair
    code, out, err = await phoneagent_call(a, personas, "--var", "caller_name=Dana")
    assert code == 0, err
    call_sid = out.strip()
    async with await a.twilio_api.answer(call_sid, "machine_end_beep") as callee:
        assert callee.answer.ok, callee.answer.problems
        (said,) = callee.answer.says
    assert said.startswith("Hello Dana, this is Bright Smile Dental")
    record = await a.state.calls.fetch(call_sid)
    assert (record.direction, record.variables["caller_name"]) == ("outbound", "Dana")


async def test_a_call_placed_on_one_instance_is_reported_with_its_context_by_another(pair, sink):
    """The status callback of a call A placed reaches B (a load balancer's choice): B's
    ``call.ended`` carries the variables and metadata A recorded, not the defaults."""
    a, b = pair
    call = await a._runner.app[DIALER].place(
        to="+14155550231", persona=PERSONA, from_=None,
        variables={"caller_name": "Dana"}, metadata={"crm": 7},
    )  # fmt: skip
    await a.state.calls.close(5)  # A's record (its context) is in the database
    fake_call = a.twilio_api.calls[call["call_sid"]]
    fake_call.status_callback = fake_call.status_callback.replace(
        a.settings.public_url, b.settings.public_url
    )
    assert await a.twilio_api.finish(call["call_sid"], "no-answer") == 204
    (request,) = await sink.wait_for(1, timeout=15)
    data = request.json["data"]
    assert (data["end_reason"], data["direction"]) == ("no_answer", "outbound")
    assert data["variables"] == {"caller_name": "Dana", "appointment": "none on file"}
    assert data["metadata"] == {"crm": 7}


async def test_a_person_gone_before_the_stream_is_reported_once_whichever_instance_is_asked(
    pair, sink
):
    """A answers the pick-up with the agent's TwiML; the person hangs up before the stream
    starts, and Twilio's completed callback reaches B. B claims the stream token in the shared
    database and reports the call; the stream arriving late at A finds the token spent, so A
    reports nothing."""
    a, b = pair
    call = await a._runner.app[DIALER].place(
        to="+14155550231", persona=PERSONA, from_=None, variables={}, metadata={}
    )
    callee = await a.twilio_api.answer(call["call_sid"], "human", speed=0)
    async with callee:
        assert callee.answer.ok and callee.answer.stream_url
        fake_call = a.twilio_api.calls[call["call_sid"]]
        fake_call.status_callback = fake_call.status_callback.replace(
            a.settings.public_url, b.settings.public_url
        )
        assert await a.twilio_api.finish(call["call_sid"], "completed") == 204
        (request,) = await sink.wait_for(1, timeout=15)
        await callee.connect()  # to A, too late
        await callee.wait_closed(timeout=5)
        assert callee.closed_by_server and callee.messages("media") == []
    assert (request.json["type"], request.json["data"]["end_reason"]) == (
        "call.ended",
        "caller_hung_up",
    )
    await asyncio.sleep(0.5)
    assert len(sink.received) == 1


async def test_a_stream_refused_on_one_instance_is_reported_once_when_another_hears_the_end(
    pair, sink
):
    """A places the call; the callee's answer and the agent's stream reach B, whose model is
    away: B refuses the stream after claiming its token and reports the call with the values A
    recorded. Twilio's completed callback then reaches A, which finds the token spent in the
    shared database and reports nothing more: one call.ended."""
    a, b = pair
    call = await a._runner.app[DIALER].place(
        to="+14155550231", persona=PERSONA, from_=None,
        variables={"caller_name": "Dana"}, metadata={"crm": 7},
    )  # fmt: skip
    await a.state.calls.close(5)  # A's record (its context) is in the database
    fake_call = a.twilio_api.calls[call["call_sid"]]
    fake_call.url = fake_call.url.replace(a.settings.public_url, b.settings.public_url)
    b.model.fail_next_handshakes(50, status=503)
    async with await a.twilio_api.answer(call["call_sid"], "human", speed=0) as callee:
        assert callee.answer.ok and b.settings.stream_url in callee.answer.stream_url
        await callee.connect()  # to B
        after = await callee.wait_call_over(timeout=10)
        assert after is not None and after.says == [b.state.persona(PERSONA).apology]
        (request,) = await sink.wait_for(1, timeout=15)
        assert await a.twilio_api.finish(call["call_sid"], "completed") == 204  # to A
    data = request.json["data"]
    assert (request.json["type"], data["end_reason"], data["direction"]) == (
        "call.ended", "error", "outbound"
    )  # fmt: skip
    assert (data["variables"]["caller_name"], data["metadata"]) == ("Dana", {"crm": 7})
    await asyncio.sleep(0.5)
    assert len(sink.received) == 1
    await b.state.calls.close(5)
    record = await a.state.calls.fetch(call["call_sid"])
    assert (record.end_reason, record.status) == ("agent_unavailable", "completed")
