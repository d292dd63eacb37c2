"""Field rules more than one part of a persona file follows: a URL phoneagent POSTs to, the
name of the environment variable holding a signing secret, and a text with an English default
that a persona in another language must write itself. Each reads through a ``TomlTable``, so
its problems are worded and placed like every other (file, field, reason)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from phoneagent.config import is_local_host
from phoneagent.personas.table_reader import TomlTable

__all__ = ["ENV_NAME", "LANGUAGE", "english_default_text", "post_url", "secret_env"]

ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")


def post_url(section: TomlTable, key: str = "url") -> str:
    """A URL phoneagent sends call data to: https, or http to this machine only (a local
    receiver in development; anything else would carry callers' data in the clear)."""
    url = section.text(key)
    if url:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            section.problem(key, f"{url!r} is not an absolute https:// URL")
        elif parts.scheme == "http" and not is_local_host(parts.hostname):
            section.problem(key, "must use https:// (http is allowed for localhost only)")
    return url


def secret_env(section: TomlTable, environ: Mapping[str, str], *, required: bool = True) -> str:
    """The name of the variable holding a signing secret, which must be set (the secret itself
    is read when signing, and never stored or printed)."""
    key = "secret_env"
    if not required and key not in section.data:
        section.seen.add(key)
        return ""
    name = section.text(key, pattern=ENV_NAME, pattern_hint="an environment variable name")
    if name and ENV_NAME.fullmatch(name) and not environ.get(name, "").strip():
        section.problem(key, f"environment variable {name} (the signing secret) is not set")
    return name


def english_default_text(
    section: TomlTable, key: str, default: str, language: str, who_says_it: str
) -> str:
    """A text whose default is English: a persona in another language must write its own (a
    Mandarin voice reading English would help no caller). ``who_says_it`` ends the reason."""
    if key not in section.data:
        section.seen.add(key)
        if LANGUAGE.fullmatch(language) and language.lower().split("-")[0] != "en":
            section.problem(
                key,
                f"is required when the language is not English ({language}): the default is "
                f"English text, and {who_says_it}",
            )
        return default
    text = section.get(key, str, default=default)
    if not text.strip():
        section.problem(key, "must not be empty")
        return default
    return text.strip()
