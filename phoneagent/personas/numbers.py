"""Phone numbers as personas and Twilio write them: E.164, and what people type instead."""

from __future__ import annotations

import re

__all__ = ["E164", "normalise_number"]

# E.164: '+', a country code that does not start with 0, at most 15 digits in all. ASCII digits
# only: ``\d`` also takes '１' or '٣', which no telephone network dials.
E164 = re.compile(r"\+[1-9][0-9]{6,14}")
# Characters people write inside phone numbers that carry no meaning.
_NUMBER_PUNCTUATION = re.compile(r"[\s().\-/]")


def normalise_number(raw: str) -> str | None:
    """The E.164 form of a phone number as Twilio or a person may write it, or None.

    Twilio sends E.164 when it can, otherwise the raw string ('anonymous', 'client:alice').
    """
    compact = _NUMBER_PUNCTUATION.sub("", raw or "")
    if compact.startswith("00"):
        compact = "+" + compact[2:]
    return compact if E164.fullmatch(compact) else None
