"""API keys: their text, their hash, and what each may do. No I/O.

A key reads ``pa_<id>_<secret>``: ``pa_`` says what it is (a secret scanner, a reviewer or a
log redactor recognises it), ``<id>`` (12 hex digits) names the key without being secret (the
store finds its row by it, ``keys list`` and the logs show it, ``keys revoke`` takes it), and
``<secret>`` is 32 random bytes (64 hex digits). Only the SHA-256 of the whole text is stored: a
fast hash is enough for 256 random bits (nothing to guess, unlike a password), and it is
compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

# A persona's id as the personas package accepts it (its file's name without ``.toml``).
from phoneagent.personas.validation import _PERSONA_ID as PERSONA_ID

__all__ = ["KEY_PATTERN", "PERSONA_ID", "ApiKey", "hash_key", "key_id_of", "new_key"]

PREFIX = "pa_"
ID_HEX, SECRET_BYTES = 12, 32
KEY_PATTERN = re.compile(rf"{PREFIX}([0-9a-f]{{{ID_HEX}}})_[0-9a-f]{{{2 * SECRET_BYTES}}}")
KEY_ID = re.compile(rf"[0-9a-f]{{{ID_HEX}}}")
MAX_NAME_CHARS = 100


@dataclass(frozen=True)
class ApiKey:
    """A key as stored: never its text, only its hash."""

    id: str
    name: str
    personas: tuple[str, ...]  # the persona ids it may use; empty: every persona
    key_hash: str  # SHA-256 of the key's text, hex
    created_at: float
    revoked_at: float | None = None

    def allows(self, persona_id: str) -> bool:
        return not self.personas or persona_id in self.personas

    def matches(self, text: str) -> bool:
        """Whether ``text`` is this key (constant time in the key's text)."""
        return hmac.compare_digest(hash_key(text), self.key_hash)


def new_key(name: str, personas: Iterable[str], *, now: float) -> tuple[ApiKey, str]:
    """A fresh key: (what is stored, the text to give the operator once)."""
    key_id = secrets.token_hex(ID_HEX // 2)
    text = f"{PREFIX}{key_id}_{secrets.token_hex(SECRET_BYTES)}"
    chosen = tuple(dict.fromkeys(personas))  # in the order given, each once
    return ApiKey(key_id, name, chosen, hash_key(text), now), text


def hash_key(text: str) -> str:
    # surrogateescape: a header may hold bytes that are not UTF-8 (aiohttp passes surrogates).
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def key_id_of(text: str) -> str | None:
    """The id of a text shaped like a key, else None (nothing to look up)."""
    found = KEY_PATTERN.fullmatch(text)
    return found.group(1) if found else None


def valid_key_id(text: str) -> bool:
    return KEY_ID.fullmatch(text) is not None
