"""``phoneagent call``: a persona calls a number, from the command line. Prints the new call's
SID.

Two ways, one result. With ``--server URL`` (and the key in ``PHONEAGENT_API_KEY``) the
running server places the call through its own API (``POST /api/v1/calls``): it records the
call's context and counts it, database or not. Without it, this command asks Twilio itself
with the dialer the server uses; the server answers the call when the callee picks up, so
PUBLIC_URL and the Twilio credentials are the server's. The call's variables then reach the
server only through the shared database (``PHONEAGENT_DATABASE_URL``), which also counts the
call against the persona's concurrency limit. Without a database the server knows the call by
its persona alone (from the answer URL Twilio signs) and fills its texts with the defaults: a
call with ``--var``, or for a persona with required variables, is refused rather than placed
with values nobody would hear.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from phoneagent.config import CREDENTIALS, ConfigError, Settings, load_settings

EXIT_OK, EXIT_INVALID, EXIT_CONFIG = 0, 1, 2
# Seconds the call's record may take to reach the shared database before the command exits.
RECORD_FLUSH_SECONDS = 5.0
NEEDED = ("PUBLIC_URL", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN")


def add_call_command(
    commands: Any,
    *,
    config_errors: Callable[[ConfigError], int],
    persona_errors: Callable[[Exception], int],
) -> None:
    """``call`` among ``commands``; configuration and persona problems are printed (and their
    exit status chosen) by the command line's own ``config_errors`` and ``persona_errors``."""
    call = commands.add_parser(
        "call", help="place an outbound call: a persona (with an [outbound] section) calls a number"
    )
    call.add_argument("--to", required=True, help="the number to call, E.164 (+14155550123)")
    call.add_argument("--persona", required=True, metavar="ID", help="the persona calling")
    call.add_argument(
        "--from", dest="from_", help="the caller ID (default: the persona's outbound `from`, "
        "else its first number)",
    )  # fmt: skip
    call.add_argument(
        "--var", action="append", default=[], metavar="NAME=VALUE",
        help="a variable of the call (repeat for more)",
    )  # fmt: skip
    call.add_argument(
        "--server", metavar="URL", help="place the call through this running server's API "
        "(https://…, its API key in $PHONEAGENT_API_KEY) instead of asking Twilio here",
    )  # fmt: skip
    call.set_defaults(handler=partial(cmd_call, config_errors=config_errors,
                                      persona_errors=persona_errors))  # fmt: skip


def cmd_call(
    args: argparse.Namespace,
    *,
    config_errors: Callable[[ConfigError], int],
    persona_errors: Callable[[Exception], int],
) -> int:
    # Imported here so the other commands stay quick.
    from phoneagent.delivery.outbox import OutboxError
    from phoneagent.logs import configure_logging
    from phoneagent.outbound.rules import OutboundRefused
    from phoneagent.personas import PersonaError, load_directory

    configure_logging("console", "error")  # the SID alone on stdout; refusals said below
    variables: dict[str, str] = {}
    for item in args.var:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            print(f"phoneagent: --var {item!r} is not NAME=VALUE", file=sys.stderr)
            return EXIT_CONFIG
        variables[name.strip()] = value
    if args.server:
        return _call_through_api(args, variables)
    try:
        settings = load_settings(require_credentials=False)
    except ConfigError as exc:
        return config_errors(exc)
    missing = [f"{name} is not set: {CREDENTIALS[name]}" for name in NEEDED
               if not _setting(settings, name)]  # fmt: skip
    if missing:
        return config_errors(ConfigError(missing))
    try:
        personas = load_directory(settings.personas_dir)
    except PersonaError as exc:
        return persona_errors(exc)
    persona = personas.personas.get(args.persona)
    if (
        not settings.database_url
        and persona is not None
        and (variables or any(v.required for v in persona.variables.values()))
    ):
        print(
            "phoneagent: call not placed: the server learns a call's variables from the shared "
            "database, and PHONEAGENT_DATABASE_URL is not set; set it (as the server has it), "
            "or place the call through the server: --server URL with PHONEAGENT_API_KEY",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        call = asyncio.run(_place(settings, personas, args, variables))
    except OutboundRefused as exc:
        where = f" [{exc.field}]" if exc.field else ""
        print(f"phoneagent: call refused: {exc.code}{where}: {exc.message}", file=sys.stderr)
        return EXIT_INVALID
    except OutboxError as exc:
        print(f"phoneagent: database error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(call["call_sid"])
    return EXIT_OK


def _setting(settings: Settings, name: str) -> str:
    return {
        "PUBLIC_URL": settings.public_url,
        "TWILIO_ACCOUNT_SID": settings.twilio_account_sid,
        "TWILIO_AUTH_TOKEN": settings.twilio_auth_token,
    }[name]


async def _place(settings: Settings, personas, args: argparse.Namespace, variables) -> dict:
    from phoneagent.outbound.dialer import Dialer
    from phoneagent.records import CallRecords
    from phoneagent.twilio.rest.calls import TwilioCalls

    outbox, records = None, CallRecords()
    if settings.database_url:
        from phoneagent.delivery.stores import call_records, open_outbox

        outbox = await open_outbox(
            settings.data_dir, settings.database_url, instance_name=settings.instance_name
        )
        records = CallRecords(call_records(outbox))
    rest = TwilioCalls(
        settings.twilio_account_sid, settings.twilio_auth_token, settings.twilio_api_base_url
    )
    dialer = Dialer(
        persona=personas.personas.get,
        calls=records,
        rest=rest,
        public_url=lambda: settings.public_url,
        our_lines=lambda: personas.by_number,
    )
    try:
        return await dialer.place(
            to=args.to, persona=args.persona, from_=args.from_, variables=variables, metadata={}
        )
    finally:
        await rest.close()
        await records.close(RECORD_FLUSH_SECONDS)
        if outbox is not None:
            await outbox.close()


def _call_through_api(args: argparse.Namespace, variables: dict[str, str]) -> int:
    """``POST /api/v1/calls`` on the running server: it checks, places and records the call."""
    import os

    import aiohttp

    key = os.environ.get("PHONEAGENT_API_KEY", "")
    if not key:
        print("phoneagent: PHONEAGENT_API_KEY is not set: the key of the server's API "
              "(phoneagent keys create)", file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    from urllib.parse import urlsplit

    from phoneagent.config import is_local_host

    server = urlsplit(args.server)
    if server.scheme != "https" and not (
        server.scheme == "http" and is_local_host(server.hostname)
    ):
        # The key goes in the Authorization header: never in clear over a network.
        print("phoneagent: --server must be an https:// URL (http:// for localhost only): "
              "the API key would cross the network in clear", file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    body: dict[str, Any] = {"to": args.to, "persona": args.persona, "variables": variables}
    if args.from_:
        body["from"] = args.from_
    try:
        status, answer = asyncio.run(_post_call(args.server.rstrip("/"), key, body))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        print(f"phoneagent: the server at {args.server} could not be reached: "
              f"{type(exc).__name__}", file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    if status == 201 and isinstance(answer.get("call_sid"), str):
        print(answer["call_sid"])
        return EXIT_OK
    error = answer.get("error") if isinstance(answer.get("error"), dict) else {}
    code, message = error.get("code", f"HTTP {status}"), error.get("message", "")
    print(f"phoneagent: call refused: {code}: {message}", file=sys.stderr)
    # A refusal of the call itself is 1, as when this command asks Twilio; the key, the
    # server or the URL being wrong is configuration: 2.
    configuration = status in (401, 403, 404, 405) or 300 <= status < 400 or status >= 500
    return EXIT_CONFIG if configuration else EXIT_INVALID


async def _post_call(server: str, key: str, body: dict[str, Any]) -> tuple[int, dict]:
    import aiohttp

    headers = {"Authorization": f"Bearer {key}"}
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        # Not followed: a redirect would carry the key (and the call) to wherever it points.
        session.post(
            f"{server}/api/v1/calls", json=body, headers=headers, allow_redirects=False
        ) as response,  # fmt: skip
    ):
        try:
            answer = await response.json(content_type=None)
        except ValueError:
            answer = {}
        return response.status, answer if isinstance(answer, dict) else {}
