"""Settings from the environment (12-factor), validated once at start-up.

Every problem names the variable and what is wrong with it, one line each, so an operator can fix
a deployment from the first log line. Secret values never appear in messages or in ``repr``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from phoneagent.client_address import Network, parse_trusted_proxies

LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
# An instance's name is shown in logs and kept in the shared database: visible ASCII, short.
_INSTANCE_NAME = re.compile(r"[\x21-\x7e]{1,200}")
# A bearer token travels in a header: visible ASCII only; long enough not to be guessed.
_TOKEN = re.compile(r"[\x21-\x7e]+")
MIN_METRICS_TOKEN_LENGTH = 16
# `phoneagent console hash-password`'s form: scrypt$N$r$p$salt$hash (base64url, no padding).
_SCRYPT_HASH = re.compile(
    r"scrypt\$[0-9]{1,8}\$[0-9]{1,3}\$[0-9]{1,3}\$[A-Za-z0-9_-]{8,}\$[A-Za-z0-9_-]{16,}"
)
MIN_CONSOLE_PASSWORD_LENGTH = 12  # the console is on the public port: no short passwords

# The credentials `phoneagent serve` cannot run without, with a hint of where each comes from.
CREDENTIALS = {
    "PUBLIC_URL": "the https base URL Twilio reaches this server at, e.g. https://voice.example.com",
    "TWILIO_ACCOUNT_SID": "the Account SID from the Twilio console (AC…)",
    "TWILIO_AUTH_TOKEN": "the Auth Token from the Twilio console",
    "STEPFUN_API_KEY": "an API key from platform.stepfun.com",
}


class ConfigError(Exception):
    """Start-up configuration is unusable. ``problems`` holds one line per variable."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Settings:
    port: int = 8080
    public_url: str = ""
    twilio_account_sid: str = ""
    twilio_auth_token: str = field(default="", repr=False)
    # A Webhook Rule's SharedKey secret: Twilio signs with it instead of the auth token.
    twilio_webhook_shared_key: str = field(default="", repr=False)
    twilio_api_base_url: str = "https://api.twilio.com"
    stepfun_api_key: str = field(default="", repr=False)
    stepfun_realtime_url: str = "wss://api.stepfun.com/v1/realtime"
    stepfun_model: str = "stepaudio-2.5-realtime"
    personas_dir: Path = Path("personas")
    data_dir: Path = Path("data")
    # PostgreSQL shared by every instance ("" = SQLite in data_dir). Holds a password: no repr.
    database_url: str = field(default="", repr=False)
    # This instance in the shared database ("" = the host name): who holds a call in progress.
    instance_name: str = ""
    log_format: str = "json"
    log_level: str = "info"
    drain_seconds: int = 600  # after SIGTERM, how long calls in progress may go on
    max_calls: int = 100  # model sessions at once (StepFun accounts have a concurrency limit)
    fallback_url: str = ""  # where new calls go while this instance drains ("" = HTTP 503)
    # The metrics listener, apart from the port Twilio reaches. Loopback unless told otherwise:
    # on a bare host 0.0.0.0 would publish it; the image sets 0.0.0.0 (a pod's own address).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9090
    metrics_token: str = field(default="", repr=False)  # "" = no bearer token required
    # Slow clients (see client_limits.py): a request head, then a body, must arrive within
    # these; Twilio sends each request at once and gives up on our answer after 15 s anyway.
    header_seconds: float = 10.0
    body_seconds: float = 10.0
    # Twilio requests still being read or checked (a stream until its `start` and token).
    max_unauthenticated: int = 64
    # Reverse proxies whose X-Forwarded-For names the client (see client_address.py).
    trusted_proxies: tuple[Network, ...] = ()
    # The web console's operator password, or its scrypt hash ("" = no console, see console/).
    console_password: str = field(default="", repr=False)

    @property
    def public_ws_url(self) -> str:
        """``PUBLIC_URL`` as Twilio's WebSockets reach it: ``wss://`` (``ws://`` on localhost)."""
        scheme = "wss" if self.public_url.startswith("https://") else "ws"
        return f"{scheme}://{self.public_url.split('://', 1)[1]}"

    @property
    def stream_url(self) -> str:
        """The ``wss://`` URL Twilio opens the media stream on (and signs, exactly as written)."""
        return f"{self.public_ws_url}/twilio/stream"


def load_settings(
    environ: Mapping[str, str] | None = None, *, require_credentials: bool = True
) -> Settings:
    """Read and validate every variable; raise ConfigError listing all problems at once.

    ``require_credentials`` is False for commands that never talk to Twilio or StepFun
    (``personas check``), so they run on a machine without secrets.
    """
    env = os.environ if environ is None else environ
    problems: list[str] = []

    def get(name: str) -> str:
        return env.get(name, "").strip()

    if require_credentials:
        for name, hint in CREDENTIALS.items():
            if not get(name):
                problems.append(f"{name} is not set: {hint}")

    port = _parse_port("PORT", get("PORT"), Settings.port, problems)
    public_url = get("PUBLIC_URL").rstrip("/")
    if public_url:
        _check_public_url(public_url, problems)
    sid = get("TWILIO_ACCOUNT_SID")
    if sid and not _ACCOUNT_SID.fullmatch(sid):
        problems.append("TWILIO_ACCOUNT_SID is malformed: expected 'AC' followed by 32 hex digits")
    token = get("TWILIO_AUTH_TOKEN")
    if token and any(c.isspace() for c in token):
        problems.append("TWILIO_AUTH_TOKEN is malformed: it contains whitespace")
    shared_key = get("TWILIO_WEBHOOK_SHARED_KEY")
    if any(c.isspace() for c in shared_key):
        problems.append("TWILIO_WEBHOOK_SHARED_KEY is malformed: it contains whitespace")
    api_base = get("TWILIO_API_BASE_URL").rstrip("/") or Settings.twilio_api_base_url
    _check_url("TWILIO_API_BASE_URL", api_base, ("https", "http"), problems)
    realtime_url = get("STEPFUN_REALTIME_URL") or Settings.stepfun_realtime_url
    _check_url("STEPFUN_REALTIME_URL", realtime_url, ("wss", "ws"), problems)
    model = get("STEPFUN_MODEL") or Settings.stepfun_model
    if not _MODEL_NAME.fullmatch(model):
        problems.append(
            f"STEPFUN_MODEL is malformed: {model!r} (letters, digits, '.', '_' and '-' only)"
        )
    log_format = (get("LOG_FORMAT") or Settings.log_format).lower()
    if log_format not in LOG_FORMATS:
        problems.append(f"LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    log_level = (get("LOG_LEVEL") or Settings.log_level).lower()
    if log_level not in LOG_LEVELS:
        problems.append(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}")

    database_url = get("PHONEAGENT_DATABASE_URL")
    if database_url:
        _check_database_url(database_url, problems)
    instance_name = get("PHONEAGENT_INSTANCE_NAME")
    if instance_name and not _INSTANCE_NAME.fullmatch(instance_name):
        problems.append(
            "PHONEAGENT_INSTANCE_NAME is malformed: at most 200 visible ASCII characters, no spaces"
        )

    drain_seconds = _parse_int("PHONEAGENT_DRAIN_SECONDS", get, Settings.drain_seconds, 0, problems)
    max_calls = _parse_int("PHONEAGENT_MAX_CALLS", get, Settings.max_calls, 1, problems)
    fallback_url = get("PHONEAGENT_FALLBACK_URL")
    if fallback_url:
        _check_url("PHONEAGENT_FALLBACK_URL", fallback_url, ("https", "http"), problems)

    metrics_host = get("PHONEAGENT_METRICS_HOST") or Settings.metrics_host
    if not _is_host(metrics_host):
        problems.append(
            f"PHONEAGENT_METRICS_HOST must be an IP address or a host name, not {metrics_host!r}"
        )
    metrics_port = _parse_port(
        "PHONEAGENT_METRICS_PORT", get("PHONEAGENT_METRICS_PORT"), Settings.metrics_port, problems
    )
    if metrics_port == port:
        problems.append(
            f"PHONEAGENT_METRICS_PORT must differ from PORT ({port}): metrics stay off the port "
            "Twilio reaches"
        )
    metrics_token = get("PHONEAGENT_METRICS_TOKEN")
    if metrics_token and not _TOKEN.fullmatch(metrics_token):
        problems.append("PHONEAGENT_METRICS_TOKEN is malformed: visible ASCII only, no spaces")
    elif metrics_token and len(metrics_token) < MIN_METRICS_TOKEN_LENGTH:
        problems.append(
            f"PHONEAGENT_METRICS_TOKEN is too short: at least {MIN_METRICS_TOKEN_LENGTH} "
            "characters (python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    header_seconds = _parse_int(
        "PHONEAGENT_HEADER_SECONDS", get, int(Settings.header_seconds), 1, problems
    )
    body_seconds = _parse_int(
        "PHONEAGENT_BODY_SECONDS", get, int(Settings.body_seconds), 1, problems
    )
    max_unauthenticated = _parse_int(
        "PHONEAGENT_MAX_UNAUTHENTICATED", get, Settings.max_unauthenticated, 1, problems
    )
    try:
        trusted_proxies = parse_trusted_proxies(get("PHONEAGENT_TRUSTED_PROXIES"))
    except ValueError as exc:
        problems.append(f"PHONEAGENT_TRUSTED_PROXIES is malformed: {exc}")
        trusted_proxies = ()
    console_password = get("PHONEAGENT_CONSOLE_PASSWORD")
    if console_password.startswith("scrypt$"):
        if not _SCRYPT_HASH.fullmatch(console_password):
            problems.append(
                "PHONEAGENT_CONSOLE_PASSWORD looks like a hash but is malformed: make one with "
                "`phoneagent console hash-password`"
            )
    elif console_password and len(console_password) < MIN_CONSOLE_PASSWORD_LENGTH:
        problems.append(
            f"PHONEAGENT_CONSOLE_PASSWORD is too short: at least {MIN_CONSOLE_PASSWORD_LENGTH} "
            "characters (or its hash, from `phoneagent console hash-password`)"
        )

    if problems:
        raise ConfigError(problems)
    return Settings(
        port=port,
        public_url=public_url,
        twilio_account_sid=sid,
        twilio_auth_token=token,
        twilio_webhook_shared_key=shared_key,
        twilio_api_base_url=api_base,
        stepfun_api_key=get("STEPFUN_API_KEY"),
        stepfun_realtime_url=realtime_url,
        stepfun_model=model,
        personas_dir=Path(get("PHONEAGENT_PERSONAS_DIR") or Settings.personas_dir),
        data_dir=Path(get("PHONEAGENT_DATA_DIR") or Settings.data_dir),
        database_url=database_url,
        instance_name=instance_name or socket.gethostname(),
        log_format=log_format,
        log_level=log_level,
        drain_seconds=drain_seconds,
        max_calls=max_calls,
        fallback_url=fallback_url,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        metrics_token=metrics_token,
        header_seconds=header_seconds,
        body_seconds=body_seconds,
        max_unauthenticated=max_unauthenticated,
        trusted_proxies=trusted_proxies,
        console_password=console_password,
    )


def is_local_host(host: str | None) -> bool:
    return (host or "").lower() in LOCAL_HOSTS


def _parse_int(
    name: str, get: Callable[[str], str], default: int, low: int, problems: list[str]
) -> int:
    raw = get(name)
    if not raw:
        return default
    if raw.isdigit() and int(raw) >= low:
        return int(raw)
    problems.append(f"{name} must be a whole number of at least {low}, not {raw!r}")
    return default


def _parse_port(name: str, raw: str, default: int, problems: list[str]) -> int:
    if not raw:
        return default
    if raw.isdigit() and 1 <= int(raw) <= 65535:
        return int(raw)
    problems.append(f"{name} must be a TCP port number from 1 to 65535, not {raw!r}")
    return default


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return bool(_HOST_NAME.fullmatch(host))
    return True


def _check_public_url(url: str, problems: list[str]) -> None:
    parts = urlsplit(url)
    if parts.scheme != "https" and not (parts.scheme == "http" and is_local_host(parts.hostname)):
        problems.append(
            "PUBLIC_URL must be an https:// URL (Twilio streams only to wss://); "
            f"http is allowed for localhost only, got {url!r}"
        )
    elif not parts.hostname:
        problems.append(f"PUBLIC_URL has no host: {url!r}")
    elif parts.query or parts.fragment:
        problems.append(f"PUBLIC_URL must not have a query or fragment: {url!r}")


def _check_url(name: str, url: str, schemes: tuple[str, ...], problems: list[str]) -> None:
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.hostname:
        allowed = " or ".join(f"{s}://" for s in schemes)
        problems.append(f"{name} must be an absolute {allowed} URL, not {url!r}")


DATABASE_SCHEMES = ("postgresql", "postgres")


def redact_database_url(url: str) -> str:
    """``url`` as it may be printed and logged: any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # a port that is not a number: show the scheme only
        return f"{url.split(':', 1)[0]}://…"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    netloc = parts.netloc
    if password is not None:
        user_info, host = netloc.rsplit("@", 1)
        netloc = f"{user_info.split(':', 1)[0]}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _check_database_url(url: str, problems: list[str]) -> None:
    shown = redact_database_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises on a port that is not a number
    except ValueError:
        problems.append(f"PHONEAGENT_DATABASE_URL has an invalid host or port: {shown!r}")
        return
    if parts.scheme not in DATABASE_SCHEMES:
        problems.append(
            f"PHONEAGENT_DATABASE_URL must be a postgresql:// URL "
            f"(postgresql://USER:PASSWORD@HOST:5432/DATABASE), not {shown!r}"
        )
    elif not parts.path.strip("/"):
        problems.append(f"PHONEAGENT_DATABASE_URL names no database (…/DATABASE): {shown!r}")
