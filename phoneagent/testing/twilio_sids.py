"""Twilio's resource identifiers, as the fakes mint them."""

from __future__ import annotations

import secrets

__all__ = ["new_sid"]


def new_sid(prefix: str) -> str:
    """A Twilio-style SID: two-letter prefix + 32 hex digits (34 characters, §1.1)."""
    return prefix + secrets.token_hex(16)
