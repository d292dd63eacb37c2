"""The ``phoneagent`` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tomllib
from pathlib import Path

from phoneagent import __version__
from phoneagent.api.cli import add_keys_commands
from phoneagent.config import ConfigError, load_settings
from phoneagent.delivery.cli import add_events_commands
from phoneagent.delivery.outbox import OutboxError
from phoneagent.outbound.cli import add_call_command
from phoneagent.personas import PersonaError, PersonaRegistry, check_directory

EXIT_OK, EXIT_INVALID, EXIT_CONFIG = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_CONFIG
    return args.handler(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="phoneagent",
        description="A Twilio phone line answered by a realtime speech model.",
    )
    parser.add_argument("--version", action="version", version=f"phoneagent {__version__}")
    commands = parser.add_subparsers(title="commands")

    serve = commands.add_parser("serve", help="run the HTTP/WebSocket server")
    serve.add_argument("--host", default="0.0.0.0", help="interface to bind (default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port to bind (default: $PORT, else 8080)")
    serve.set_defaults(handler=cmd_serve)

    demo = commands.add_parser(
        "demo", help="start everything on loopback and place one simulated call"
    )
    demo.add_argument(
        "--keep-serving", action="store_true", help="leave the server up for `simulate` calls"
    )
    demo.add_argument("--speed", type=float, default=1.0, help="call time per wall time")
    demo.add_argument(
        "--persona", metavar="ID", help="call this persona (default: the default persona)"
    )
    demo.set_defaults(handler=cmd_demo)

    simulate = commands.add_parser("simulate", help="dial a running server as Twilio would")
    simulate.add_argument("--url", required=True, help="the server's base URL")
    simulate.add_argument("--to", help="the number called (selects the persona)")
    simulate.add_argument(
        "--persona",
        metavar="ID",
        help="call this persona of $PHONEAGENT_PERSONAS_DIR: its first number (unless --to), "
        "and a bundled recording in its language (unless --wav)",
    )
    simulate.add_argument("--from", dest="from_", default="+14155550123", help="the caller")
    simulate.add_argument(
        "--wav",
        type=Path,
        help="what the caller says: 8 kHz 16-bit mono WAV (default: a bundled booking request, "
        "in the persona's language with --persona)",
    )
    simulate.add_argument(
        "--out", type=Path, default=Path("caller-heard.wav"), help="where to write what was heard"
    )
    simulate.add_argument(
        "--public-url", help="the URL Twilio would sign (the server's PUBLIC_URL; default --url)"
    )
    simulate.add_argument("--speed", type=float, default=1.0, help="call time per wall time")
    simulate.set_defaults(handler=cmd_simulate)

    doctor = commands.add_parser(
        "doctor", help="check the configuration against StepFun, Twilio and PUBLIC_URL"
    )
    doctor.add_argument(
        "--json", action="store_true", help="print a JSON list of {status, check, detail, fix}"
    )
    doctor.add_argument("--persona", metavar="ID", help="check this persona only")
    doctor.set_defaults(handler=cmd_doctor)

    add_events_commands(commands)
    add_keys_commands(commands)
    add_call_command(commands, config_errors=_config_errors, persona_errors=_persona_errors)

    db = commands.add_parser("db", help="the shared PostgreSQL database: schema status, migrate")
    db_commands = db.add_subparsers(title="database commands", required=True)
    migrate = db_commands.add_parser(
        "migrate", help="apply pending schema steps (servers also do at start-up)"
    )
    migrate.set_defaults(handler=cmd_db, apply=True)
    status = db_commands.add_parser(
        "status", help="the schema version: current and latest (exit 1 if not current)"
    )
    status.set_defaults(handler=cmd_db, apply=False)

    console = commands.add_parser("console", help="the web console at /console")
    console_commands = console.add_subparsers(title="console commands", required=True)
    hash_password = console_commands.add_parser(
        "hash-password",
        help="print the scrypt hash of a console password, for PHONEAGENT_CONSOLE_PASSWORD "
        "(asked for without echo; read from stdin when it is not a terminal)",
    )
    hash_password.set_defaults(handler=cmd_console_hash_password)

    personas = commands.add_parser("personas", help="work with persona files")
    persona_commands = personas.add_subparsers(title="persona commands", required=True)
    check = persona_commands.add_parser("check", help="validate persona files")
    check.add_argument(
        "directory",
        nargs="?",
        type=Path,
        help="directory of persona files (default: $PHONEAGENT_PERSONAS_DIR, else ./personas)",
    )
    check.set_defaults(handler=cmd_personas_check)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        return _config_errors(exc)

    # Imported here so `personas check` and `--version` stay quick and need no server stack.
    from phoneagent.logs import configure_logging
    from phoneagent.server import run

    configure_logging(settings.log_format, settings.log_level)
    try:
        registry = PersonaRegistry(settings.personas_dir)
    except PersonaError as exc:
        return _persona_errors(exc)
    port = args.port or settings.port
    if port == settings.metrics_port:
        print(
            f"phoneagent: configuration error: PHONEAGENT_METRICS_PORT must differ from the "
            f"port served ({port}): metrics stay off the port Twilio reaches",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        run(settings, registry, host=args.host, port=port)
    except OutboxError as exc:
        print(f"phoneagent: webhook outbox error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # a port already taken, an address not on this host
        print(f"phoneagent: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(require_credentials=False)
    except ConfigError as exc:
        return _config_errors(exc)
    from phoneagent.demo import UnknownPersona, run_demo
    from phoneagent.logs import configure_logging

    # The demo prints the conversation; only problems should interrupt it.
    configure_logging("console", "warning")
    try:
        return asyncio.run(
            run_demo(
                settings, keep_serving=args.keep_serving, speed=args.speed, persona_id=args.persona
            )
        )
    except UnknownPersona as exc:
        print(f"phoneagent: {exc} (in {settings.personas_dir})", file=sys.stderr)
        return EXIT_CONFIG
    except PersonaError as exc:
        for problem in exc.problems:
            print(f"phoneagent: persona error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    account_sid = os.environ.get("TWILIO_ACCOUNT_SID", "").strip()
    auth_token = os.environ.get("TWILIO_AUTH_TOKEN", "").strip()
    missing = [n for n, v in (("TWILIO_ACCOUNT_SID", account_sid),
                              ("TWILIO_AUTH_TOKEN", auth_token)) if not v]  # fmt: skip
    for name in missing:
        print(
            f"phoneagent: configuration error: {name} is not set: the server's own value, "
            "so the simulated Twilio signs requests the server accepts",
            file=sys.stderr,
        )
    if missing:
        return EXIT_CONFIG
    from phoneagent.simulate import SimulatedCall
    from phoneagent.testing.wav import CALLER_BOOKING_WAV, caller_recording

    to, wav = args.to, args.wav
    if args.persona is not None:
        line = _persona_line(args.persona)
        if line is None:
            return EXIT_CONFIG
        number, language = line
        to = to or number
        wav = wav or caller_recording(language).wav
    if not to:
        print(
            "phoneagent: simulate needs --to NUMBER, or --persona ID with a number",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    call = SimulatedCall(
        base_url=args.url.rstrip("/"),
        public_url=args.public_url,
        account_sid=account_sid,
        auth_token=auth_token,
        to=to,
        from_=args.from_,
        wav=wav or CALLER_BOOKING_WAV,
        out=args.out,
        speed=args.speed,
    )
    try:
        return asyncio.run(call.run())
    except (OSError, TimeoutError) as exc:
        print(f"phoneagent: simulate failed: {exc}", file=sys.stderr)
        return EXIT_INVALID


def _persona_line(persona_id: str) -> tuple[str, str] | None:
    """The first number and the language of the persona ``simulate --persona`` names, read
    from its file in $PHONEAGENT_PERSONAS_DIR (the server's files: only these two keys are
    needed, so a webhook secret this shell lacks does not matter); None after saying why not."""
    directory = Path(os.environ.get("PHONEAGENT_PERSONAS_DIR", "./personas"))
    path = directory / f"{persona_id}.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        print(f"phoneagent: persona {persona_id!r}: cannot read {path}: {exc}", file=sys.stderr)
        return None
    numbers, language = data.get("numbers") or [""], data.get("language", "")
    if (
        not isinstance(numbers, list)
        or not isinstance(numbers[0], str)
        or not isinstance(language, str)
    ):
        print(f"phoneagent: {path}: run `phoneagent personas check`", file=sys.stderr)
        return None
    return numbers[0], language


def cmd_doctor(args: argparse.Namespace) -> int:
    # Imported here so the other commands stay quick.
    from phoneagent import doctor
    from phoneagent.logs import configure_logging, secret_values

    # Library warnings (a refused model name) go to stderr; the checks say what matters.
    configure_logging("console", "error")
    settings, results = doctor.load_configuration(os.environ)
    personas, persona_results = doctor.load_personas(settings.personas_dir)
    results += persona_results
    if args.persona is not None and personas:
        chosen = [p for p in personas if p.id == args.persona]
        if not chosen:
            known = ", ".join(p.id for p in personas)
            print(f"phoneagent: no persona {args.persona!r}; known: {known}", file=sys.stderr)
            return EXIT_CONFIG
        personas = chosen
    secrets = secret_values()  # every secret-named variable: keys, tokens, shared key

    def show(result: doctor.Result) -> doctor.Result:
        result = doctor.redact(result, secrets)
        if not args.json:
            print(doctor.format_line(result), flush=True)
        return result

    async def run() -> list[doctor.Result]:
        shown = [show(r) for r in results]
        async for result in doctor.run_checks(settings, personas):
            shown.append(show(result))
        return shown

    try:
        shown = asyncio.run(run())
    except KeyboardInterrupt:
        return EXIT_INVALID
    if args.json:
        print(doctor.format_json(shown))
    else:
        counts = {s: sum(r.status == s for r in shown) for s in (doctor.FAIL, doctor.WARN)}
        print(f"{counts[doctor.FAIL]} failed, {counts[doctor.WARN]} warnings", file=sys.stderr)
    return doctor.exit_status(shown)


def cmd_db(args: argparse.Namespace) -> int:
    """``db migrate``: apply the pending steps under the advisory lock (as a starting server
    does; safe while servers run), print the version. ``db status``: print the database's and
    this version's schema; exit 1 unless they are the same. A database that cannot be reached:
    exit 2, naming the URL without its password."""
    try:
        settings = load_settings(require_credentials=False)
    except ConfigError as exc:
        return _config_errors(exc)
    if not settings.database_url:
        print(
            "phoneagent: PHONEAGENT_DATABASE_URL is not set: the embedded SQLite outbox "
            "(PHONEAGENT_DATA_DIR) migrates itself when opened",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    from phoneagent.config import redact_database_url
    from phoneagent.delivery.pg_outbox import database_schema

    shown = redact_database_url(settings.database_url)
    try:
        current, latest = asyncio.run(database_schema(settings.database_url, apply=args.apply))
    except OutboxError as exc:
        print(f"phoneagent: database error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.apply:
        print(f"{shown}: schema version {current} (latest)")
        return EXIT_OK
    print(f"{shown}: schema version {current}, latest {latest}")
    if current < latest:
        print("phoneagent: the schema is behind: run `phoneagent db migrate`", file=sys.stderr)
        return EXIT_INVALID
    if current > latest:
        print("phoneagent: the schema is newer than this phoneagent: upgrade it", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def cmd_console_hash_password(args: argparse.Namespace) -> int:
    """Ask for the password twice without echo at a terminal; read one line of stdin otherwise
    (``… | phoneagent console hash-password`` in a provisioning script). Only the hash goes to
    stdout, so it can be captured; it is safe to store where a password is not."""
    import getpass

    from phoneagent.config import MIN_CONSOLE_PASSWORD_LENGTH
    from phoneagent.console.auth import hash_password

    if sys.stdin.isatty():
        try:
            password = getpass.getpass("Console password: ")
            again = getpass.getpass("Again: ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return EXIT_INVALID
        if password != again:
            print("phoneagent: the two passwords differ; nothing printed", file=sys.stderr)
            return EXIT_INVALID
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if len(password) < MIN_CONSOLE_PASSWORD_LENGTH:
        print(
            f"phoneagent: the password is too short: at least {MIN_CONSOLE_PASSWORD_LENGTH} "
            "characters (the console is on the port the internet reaches)",
            file=sys.stderr,
        )
        return EXIT_INVALID
    print(hash_password(password))
    print(
        "phoneagent: set PHONEAGENT_CONSOLE_PASSWORD to the line above (single-quoted in a "
        "shell: it contains $; $$ for each $ in a Compose file)",
        file=sys.stderr,
    )
    return EXIT_OK


def _config_errors(exc: ConfigError) -> int:
    for problem in exc.problems:
        print(f"phoneagent: configuration error: {problem}", file=sys.stderr)
    return EXIT_CONFIG


def _persona_errors(exc: PersonaError) -> int:
    for problem in exc.problems:
        print(f"phoneagent: persona error: {problem}", file=sys.stderr)
    return EXIT_CONFIG


def cmd_personas_check(args: argparse.Namespace) -> int:
    directory = args.directory
    if directory is None:
        try:
            directory = load_settings(require_credentials=False).personas_dir
        except ConfigError as exc:
            return _config_errors(exc)
    report = check_directory(directory)
    for line in report.lines():
        print(line)
    if report.problems:
        print(f"{len(report.problems)} problem(s) in {directory}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
