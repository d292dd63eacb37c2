"""The ``phoneagent`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from phoneagent import __version__
from phoneagent.config import ConfigError, load_settings
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
        for problem in exc.problems:
            print(f"phoneagent: configuration error: {problem}", file=sys.stderr)
        return EXIT_CONFIG

    # Imported here so `personas check` and `--version` stay quick and need no server stack.
    from phoneagent.logs import configure_logging
    from phoneagent.server import run

    configure_logging(settings.log_format, settings.log_level)
    try:
        registry = PersonaRegistry(settings.personas_dir)
    except PersonaError as exc:
        for problem in exc.problems:
            print(f"phoneagent: persona error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    run(settings, registry, host=args.host, port=args.port or settings.port)
    return EXIT_OK


def cmd_personas_check(args: argparse.Namespace) -> int:
    directory = args.directory
    if directory is None:
        try:
            directory = load_settings(require_credentials=False).personas_dir
        except ConfigError as exc:
            for problem in exc.problems:
                print(f"phoneagent: configuration error: {problem}", file=sys.stderr)
            return EXIT_CONFIG
    report = check_directory(directory)
    files = set(report.files)
    for problem in report.problems:  # problems with the directory itself, not a file in it
        if problem.file not in files:
            print(f"ERROR {problem}")
    for path in report.files:
        problems = report.problems_for(path)
        if problems:
            for problem in problems:
                print(f"ERROR {problem}")
        else:
            print(f"OK    {path}")
    if report.problems:
        print(f"{len(report.problems)} problem(s) in {directory}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
