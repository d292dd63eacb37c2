"""``phoneagent keys create|list|revoke``: the API keys of ``/api/v1``.

The commands open the store the server uses (``key_store.py``): the PostgreSQL database of
``PHONEAGENT_DATABASE_URL`` when it is set, else ``api_keys.sqlite3`` in ``PHONEAGENT_DATA_DIR``
(``--data-dir`` picks a directory). They work while servers run; a revocation holds on every
server from its next request.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from phoneagent.api.key_store import KEYS_FILENAME, ApiKeyStore, open_api_key_store
from phoneagent.api.keys import MAX_NAME_CHARS, PERSONA_ID, ApiKey, new_key, valid_key_id
from phoneagent.delivery.outbox import OutboxError

__all__ = ["add_keys_commands"]

EXIT_OK, EXIT_NOT_FOUND, EXIT_CONFIG = 0, 1, 2
T = TypeVar("T")


def add_keys_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``keys create|list|revoke`` to the ``phoneagent`` command's subparsers."""
    keys = subparsers.add_parser("keys", help="API keys of /api/v1: create, list, revoke")
    commands = keys.add_subparsers(title="key commands", required=True)

    create = commands.add_parser(
        "create", help="create a key and print it (once: only its hash is kept)"
    )
    create.add_argument("--name", default="", help="what the key is for (shown by `keys list`)")
    create.add_argument(
        "--persona",
        action="append",
        default=[],
        metavar="ID",
        help="limit the key to this persona (repeat for several; default: every persona)",
    )
    _data_dir_option(create)
    create.set_defaults(handler=cmd_keys_create)

    listing = commands.add_parser("list", help="list keys (never their secrets)")
    _data_dir_option(listing)
    listing.set_defaults(handler=cmd_keys_list)

    revoke = commands.add_parser("revoke", help="revoke a key: refused from the next request on")
    revoke.add_argument("id", metavar="ID", help="the key's id (the 12 hex digits after pa_)")
    _data_dir_option(revoke)
    revoke.set_defaults(handler=cmd_keys_revoke)
    return keys


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="data directory (default: $PHONEAGENT_DATABASE_URL if set, else "
        "$PHONEAGENT_DATA_DIR, else ./data)",
    )


def cmd_keys_create(args: argparse.Namespace) -> int:
    name = args.name.strip()
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        print(f"phoneagent: --name: at most {MAX_NAME_CHARS} printable characters",
              file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    for persona in args.persona:
        if not PERSONA_ID.fullmatch(persona):
            print(f"phoneagent: --persona {persona!r}: not a persona id (its file's name "
                  "without .toml)", file=sys.stderr)  # fmt: skip
            return EXIT_CONFIG
    where = _where(args)
    if where is None:
        return EXIT_CONFIG
    data_dir, database_url, personas_dir = where
    for persona in args.persona:
        if personas_dir.is_dir() and not (personas_dir / f"{persona}.toml").exists():
            print(f"phoneagent: warning: no persona {persona!r} in {personas_dir} (yet): the "
                  "key may use it once it exists", file=sys.stderr)  # fmt: skip
    key, text = new_key(name, args.persona, now=time.time())
    if _run(data_dir, database_url, lambda store: store.add(key)) is _FAILED:
        return EXIT_CONFIG
    print(text)
    print(
        f"phoneagent: created API key {key.id} ({_personas(key)}). The key is printed above "
        "and never again (only its hash is kept): store it now. Use it as "
        "`Authorization: Bearer <key>`; revoke it with `phoneagent keys revoke "
        f"{key.id}`.",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace) -> int:
    where = _where(args)
    if where is None:
        return EXIT_CONFIG
    keys = [] if _no_file_yet(where) else _run(where[0], where[1], lambda store: store.list())
    if keys is _FAILED:
        return EXIT_CONFIG
    if not keys:
        print("no API keys: create one with `phoneagent keys create`")
        return EXIT_OK
    rows = [("ID", "NAME", "PERSONAS", "CREATED (UTC)", "REVOKED (UTC)")]
    rows += [
        (k.id, k.name or "-", _personas(k), _utc(k.created_at), _utc(k.revoked_at) or "-")
        for k in keys
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    key_id = args.id.removeprefix("pa_")
    if not valid_key_id(key_id):
        print(f"phoneagent: {args.id!r} is not a key id (12 hex digits, as `keys list` shows)",
              file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    where = _where(args)
    if where is None:
        return EXIT_CONFIG
    revoked_at = time.time()
    key = None
    if not _no_file_yet(where):
        key = _run(where[0], where[1], lambda store: store.revoke(key_id, at=revoked_at))
    if key is _FAILED:
        return EXIT_CONFIG
    if key is None:
        print(f"phoneagent: no API key {key_id}", file=sys.stderr)
        return EXIT_NOT_FOUND
    assert key.revoked_at is not None
    when = "now" if key.revoked_at == revoked_at else f"already, at {_utc(key.revoked_at)} UTC"
    print(f"revoked API key {key.id} ({key.name or 'no name'}) {when}: refused from the next "
          "request on")  # fmt: skip
    return EXIT_OK


_FAILED: Any = object()


def _run(data_dir: Path, database_url: str, work: Callable[[ApiKeyStore], Awaitable[T]]) -> T:
    """``work`` on the configured store, then the store closed; _FAILED after saying why."""

    async def go() -> T:
        store, close = await open_api_key_store(data_dir, database_url)
        try:
            return await work(store)
        finally:
            await close()

    try:
        return asyncio.run(go())
    except OutboxError as exc:
        print(f"phoneagent: API key store error: {exc}", file=sys.stderr)
        return _FAILED


def _where(args: argparse.Namespace) -> tuple[Path, str, Path] | None:
    """(data directory, database URL or "", personas directory); None after printing a
    configuration error."""
    from phoneagent.config import ConfigError, load_settings

    try:
        settings = load_settings(require_credentials=False)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"phoneagent: configuration error: {problem}", file=sys.stderr)
        return None
    if args.data_dir is not None:
        return args.data_dir, "", settings.personas_dir
    return settings.data_dir, settings.database_url, settings.personas_dir


def _no_file_yet(where: tuple[Path, str, Path]) -> bool:
    """No SQLite file yet: no keys (and reading would create one)."""
    data_dir, database_url, _ = where
    return not database_url and not (data_dir / KEYS_FILENAME).exists()


def _personas(key: ApiKey) -> str:
    return ", ".join(key.personas) if key.personas else "every persona"


def _utc(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")
