"""``phoneagent call``: places the call through Twilio's REST API (the fake, on loopback) with
the server's configuration, or through the running server's API (``--server``), prints the
SID; refusals are clear, with a non-zero exit. The server the call's answer reaches greets the
callee with the outbound greeting, filled with the call's ``--var`` values."""

import asyncio
import os
import re
import sys
import time

import pytest
from conftest import PROJECT_ROOT
from outbound_kit import DENTAL, PERSONA, personas_calling_any_time

from phoneagent.api.keys import new_key
from phoneagent.api.routes import API_KEYS
from phoneagent.outbound.context import ANSWER_PATH
from phoneagent.testing.fake_model import FakeRealtimeServer
from phoneagent.testing.stack import LocalStack

CALLEE = "+14155550177"


@pytest.fixture
def personas(tmp_path):
    return personas_calling_any_time(tmp_path / "personas")


@pytest.fixture
async def stack(personas):
    model = FakeRealtimeServer(speed=None, script=["Great."])
    async with LocalStack(personas, model=model) as stack:
        stack.twilio_api.add_number(DENTAL)
        yield stack


def environment(stack, personas, **more):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "PHONEAGENT_"))}
    return (
        env
        | {
            "PUBLIC_URL": stack.settings.public_url,
            "TWILIO_ACCOUNT_SID": stack.settings.twilio_account_sid,
            "TWILIO_AUTH_TOKEN": stack.settings.twilio_auth_token,
            "TWILIO_API_BASE_URL": stack.twilio_api.base_url,
            "PHONEAGENT_PERSONAS_DIR": str(personas),
            "PYTHONPATH": str(PROJECT_ROOT),
        }
        | more
    )


async def phoneagent_call(env, *args):
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "phoneagent.cli", "call", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


async def test_the_cli_places_a_call_the_server_then_answers(stack, personas):
    env = environment(stack, personas)
    code, out, err = await phoneagent_call(env, "--to", CALLEE, "--persona", PERSONA)
    assert code == 0, err
    call_sid = out.strip()
    assert re.fullmatch(r"CA[0-9a-f]{32}", call_sid)
    (created,) = stack.twilio_api.created
    assert (created.params["To"], created.params["From"]) == (CALLEE, DENTAL)
    assert created.params["Url"] == f"{stack.settings.public_url}{ANSWER_PATH}?persona={PERSONA}"
    assert stack.settings.twilio_auth_token not in out + err
    # The server never saw the call (no shared database): it answers by the signed URL's
    # persona, with the outbound greeting filled with the defaults.
    async with await stack.twilio_api.answer(call_sid, "human", speed=4.0) as callee:
        await callee.connect()
        callee.start_background_silence()
        await callee.wait_until_heard_ms(1000, timeout=20)  # the greeting has started
        await callee.wait_until_quiet(400, timeout=20)
        await callee.hangup()
    await stack.model.wait_for(lambda: stack.model.sessions_open == 0, 5)
    record = stack.state.calls.get(call_sid)
    assert record.transcript[0]["text"].startswith("Hello there, this is Maya")
    assert (record.direction, dict(record.variables)) == (
        "outbound",
        {"caller_name": "there", "appointment": "none on file"},
    )


async def test_variables_without_a_database_are_refused_not_lost(stack, personas):
    env = environment(stack, personas)
    code, out, err = await phoneagent_call(
        env, "--to", CALLEE, "--persona", PERSONA, "--var", "caller_name=Dana"
    )
    assert (code, out) == (2, "")
    assert "PHONEAGENT_DATABASE_URL is not set" in err and "--server" in err
    assert stack.twilio_api.created == []


async def test_through_the_servers_api_the_variables_reach_the_greeting(stack, personas):
    key, text = new_key("cli", (), now=time.time())
    await stack._runner.app[API_KEYS].add(key)
    # No Twilio credentials here: the server places the call.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "PHONEAGENT_"))}
    env |= {"PHONEAGENT_API_KEY": text, "PYTHONPATH": str(PROJECT_ROOT)}
    code, out, err = await phoneagent_call(
        env, "--server", stack.base_url, "--to", CALLEE, "--persona", PERSONA,
        "--var", "caller_name=Dana",
    )  # fmt: skip
    assert code == 0, err
    call_sid = out.strip()
    assert text not in out + err
    (created,) = stack.twilio_api.created
    assert created.params["To"] == CALLEE
    async with await stack.twilio_api.answer(call_sid, "human", speed=4.0) as callee:
        await callee.connect()
        callee.start_background_silence()
        await callee.wait_until_heard_ms(1000, timeout=20)
        await callee.wait_until_quiet(400, timeout=20)
        await callee.hangup()
    await stack.model.wait_for(lambda: stack.model.sessions_open == 0, 5)
    record = stack.state.calls.get(call_sid)
    assert record.transcript[0]["text"].startswith("Hello Dana, this is Maya")
    assert record.variables["caller_name"] == "Dana"
    # A refusal is the API's, said as such; a wrong key is configuration (2).
    code, _, err = await phoneagent_call(
        env, "--server", stack.base_url, "--to", CALLEE, "--persona", PERSONA,
        "--var", "nickname=D",
    )  # fmt: skip
    assert code == 1 and "call refused: invalid_request: variables.nickname: " in err
    env["PHONEAGENT_API_KEY"] = text + "x"
    code, _, err = await phoneagent_call(env, "--server", stack.base_url, "--to", CALLEE,
                                         "--persona", PERSONA)  # fmt: skip
    assert code == 2 and "call refused: unauthorized" in err
    assert len(stack.twilio_api.created) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "415 555 0177", "--persona", PERSONA],
         "call refused: invalid_request [to]: 'to' is not an E.164 number"),
        (["--to", CALLEE, "--persona", "nobody"],
         "call refused: invalid_request [persona]: no persona"),
        (["--to", CALLEE, "--persona", "trattoria-luca"],
         "call refused: invalid_request [persona]: persona 'trattoria-luca' has no [outbound]"),
        (["--to", "+14155550142", "--persona", PERSONA],
         "call refused: invalid_request [to]: 'to' is a number a persona of this server answers"),
        (["--to", CALLEE, "--persona", PERSONA, "--from", "+14155550999"],
         "call refused: invalid_request [from]: 'from' must be one of the persona's own numbers"),
    ],
)  # fmt: skip
async def test_refusals_are_clear_with_exit_1(stack, personas, args, message):
    code, out, err = await phoneagent_call(environment(stack, personas), *args)
    assert (code, out) == (1, "")
    assert message in err
    assert stack.settings.twilio_auth_token not in err


async def test_missing_configuration_and_bad_variables_exit_2(stack, personas):
    env = environment(stack, personas)
    del env["TWILIO_AUTH_TOKEN"]
    code, _, err = await phoneagent_call(env, "--to", CALLEE, "--persona", PERSONA)
    assert code == 2
    assert "TWILIO_AUTH_TOKEN is not set" in err
    env = environment(stack, personas)
    code, _, err = await phoneagent_call(env, "--to", CALLEE, "--persona", PERSONA, "--var", "x")
    assert code == 2
    assert "--var 'x' is not NAME=VALUE" in err
    assert stack.twilio_api.created == []


async def test_the_api_key_never_leaves_in_clear_nor_follows_a_redirect(stack, personas):
    """--server over plain http to another host is refused before anything is sent; a server
    that answers with a redirect is not followed (the key and the call would go there)."""
    from aiohttp import web

    env = environment(stack, personas, PHONEAGENT_API_KEY="pa_secret_key_text")
    code, out, err = await phoneagent_call(
        env, "--server", "http://api.example.com", "--to", CALLEE, "--persona", PERSONA
    )
    assert (code, out) == (2, "")
    assert "--server must be an https:// URL" in err and "pa_secret_key_text" not in err

    elsewhere: list[dict] = []

    async def record(request):
        elsewhere.append(dict(request.headers))
        return web.json_response({"call_sid": "CA" + "0" * 32}, status=201)

    async def redirect(request):
        raise web.HTTPTemporaryRedirect(f"http://localhost:{ports[1]}/api/v1/calls")

    runners, ports = [], []
    for handler in (redirect, record):
        app = web.Application()
        app.router.add_post("/api/v1/calls", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        ports.append(site._server.sockets[0].getsockname()[1])
    try:
        code, out, err = await phoneagent_call(
            env, "--server", f"http://127.0.0.1:{ports[0]}", "--to", CALLEE, "--persona", PERSONA
        )
    finally:
        for runner in runners:
            await runner.cleanup()
    assert (code, out, elsewhere) == (2, "", [])
    assert "HTTP 307" in err and "pa_secret_key_text" not in err
