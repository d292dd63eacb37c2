"""``phoneagent call``: a persona calls a number, from the command line (the dialer, as the
server's API uses it). Prints the new call's SID.

The server answers the call when the callee picks up, so PUBLIC_URL and the Twilio credentials
are the server's. With ``PHONEAGENT_DATABASE_URL`` the call is recorded in the shared database:
the servers then know its variables and count it against the persona's concurrency limit;
without it, this command counts only itself (0 calls) and the server knows the call by its
persona alone (from the answer URL Twilio signs).
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
    try:
        settings = load_settings(require_credentials=False)
    except ConfigError as exc:
        return config_errors(exc)
    missing = [f"{name} is not set: {CREDENTIALS[name]}" for name in NEEDED
               if not _setting(settings, name)]  # fmt: skip
    if missing:
        return config_errors(ConfigError(missing))
    variables: dict[str, str] = {}
    for item in args.var:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            print(f"phoneagent: --var {item!r} is not NAME=VALUE", file=sys.stderr)
            return EXIT_CONFIG
        variables[name.strip()] = value
    try:
        personas = load_directory(settings.personas_dir)
    except PersonaError as exc:
        return persona_errors(exc)
    try:
        call = asyncio.run(_place(settings, personas.personas.get, args, variables))
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


async def _place(settings: Settings, persona, args: argparse.Namespace, variables) -> dict:
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
        persona=persona, calls=records, rest=rest, public_url=lambda: settings.public_url
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
