"""structlog set-up: JSON lines in production, coloured console lines for humans.

Standard-library loggers (aiohttp, websockets, asyncio) go through the same renderer, so an
operator reads one format. Per-call context (``call_sid``, ``stream_sid``, ``persona``) is bound
with ``structlog.contextvars`` by the call handlers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import structlog

REDACTED = "[redacted]"
# Credentials in HTTP headers as libraries print them at debug level (websockets, in the test
# kit's fake model and the benchmark's relay, writes every handshake header: "> Authorization:
# Bearer …"; an aiohttp error's request_info holds the request's headers), in any of the shapes
# a renderer produces.
_HEADER_CREDENTIAL = re.compile(
    r"(?i)\b(authorization|proxy-authorization|x-twilio-signature|cookie|set-cookie)"
    r"((?:\\?['\"])?\s*[:=,]\s*(?:\\?['\"])?)(?:(?:bearer|basic|digest)\s+)?[^\s'\",\\]+"
)
# The HTTP API's keys (api/keys.py), wherever one turns up (a client that put its key in a URL):
# the id stays, it names the key; the secret goes.
_API_KEY = re.compile(r"(pa_[0-9a-f]{12}_)[0-9a-f]{64}")
# Environment variables whose values are secrets by their name (API keys, tokens, the webhook
# signing secrets personas name in `secret_env`): their values never reach a log line.
_SECRET_NAME = re.compile(r"(?i)(secret|token|key|password|credential)")
_SHORTEST_SECRET = 8  # shorter values are not credentials, and would redact ordinary words


def secret_values(environ: Mapping[str, str] | None = None) -> set[str]:
    """The values of the environment variables that hold secrets, judged by their names, as
    set and as the settings read them (stripped: a secret mounted from a file ends in a
    newline), and in the forms a log line may carry them (URL-encoded, JSON-escaped)."""
    env = os.environ if environ is None else environ
    values = {
        form
        for name, value in env.items()
        if _SECRET_NAME.search(name) and len(value.strip()) >= _SHORTEST_SECRET
        for form in (value, value.strip())
    }
    # A URL may carry a password whatever its variable is called (PHONEAGENT_DATABASE_URL).
    values |= {p for value in env.values() for p in _url_passwords(value)}
    return values | {spelling for value in values for spelling in _spellings(value)}


def _url_passwords(value: str) -> set[str]:
    """The passwords in ``value`` if it is a URL: its user info's, and a ``password=`` query
    parameter's (libpq accepts both), as written and decoded."""
    if "://" not in value:
        return set()
    try:
        parts = urlsplit(value.strip())
        found = [parts.password or ""]
    except ValueError:
        return set()
    found += [v for k, v in parse_qsl(parts.query) if k.lower() == "password"]
    return {form for p in found for form in (p, unquote(p)) if len(form) >= _SHORTEST_SECRET}


def _spellings(secret: str) -> set[str]:
    return {quote(secret, safe=""), json.dumps(secret)[1:-1]} - {secret}


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without credential headers and without any of ``secrets``."""
    text = _HEADER_CREDENTIAL.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _API_KEY.sub(lambda m: f"{m.group(1)}{REDACTED}", text)
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: no partial leftovers
        text = text.replace(secret, REDACTED)
    return text


class _RedactingFormatter(structlog.stdlib.ProcessorFormatter):
    """The last step of every line, whatever logger wrote it: no level may print a secret."""

    def __init__(self, *args, secrets: Iterable[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.secrets = {s for s in secrets if len(s) >= _SHORTEST_SECRET}

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


def configure_logging(
    log_format: str = "json", level: str = "info", secrets: Iterable[str] | None = None
) -> None:
    """Route structlog and the standard library through one renderer. ``secrets``: values to
    scrub from every line (default: those of the environment's secret-named variables)."""
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer()
    else:
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()

    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _RedactingFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            secrets=secret_values() if secrets is None else secrets,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
