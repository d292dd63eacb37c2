"""Spoken text in units of about one beat each: a word in scripts written with spaces (English),
a single character in scripts written without them (Chinese, Japanese kana, Thai…). No I/O.

A barge-in cuts the agent's turn in proportion to the audio the caller heard, and the
transcript has no timings: counting words by spaces would make a Chinese sentence one "word",
kept whole or lost whole. Counted here, "您的预约是 Tuesday 上午十点" is ten units: one per
Han character, one for the English word. Punctuation is not a unit: nobody hears a comma.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["cut_units", "spans", "unit_count"]

# Scripts written without spaces between words: each character (with the marks that follow
# it) is a unit. Ranges from the Unicode blocks of the scripts: CJK radicals, ideographic
# marks and Hangzhou numerals, kana, Bopomofo, CJK unified ideographs and their extensions,
# compatibility ideographs, half-width katakana; Thai, Lao, Tibetan, Myanmar, Khmer.
_UNSPACED = (
    "\u0e00-\u0eff"  # Thai, Lao
    "\u0f00-\u0fff"  # Tibetan
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u2e80-\u2fdf"  # CJK radicals, Kangxi radicals
    "\u3005-\u3007\u3021-\u3029\u3031-\u3035\u303b"  # 々〆〇, Hangzhou numerals, kana repeats
    "\u3040-\u30ff\u31f0-\u31ff"  # hiragana, katakana
    "\u3100-\u312f\u31a0-\u31bf"  # Bopomofo
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs, extension A, compatibility
    "\uff66-\uff9f"  # half-width katakana
    "\U00020000-\U0003ffff"  # CJK extensions B and later
)
# A candidate unit: one character of an unspaced script, or a run of other non-space
# characters (a word, with the punctuation attached to it).
_CANDIDATE = re.compile(rf"[{_UNSPACED}]|[^\s{_UNSPACED}]+")
_MARKS = ("Mn", "Mc", "Me")


def spans(text: str) -> list[tuple[int, int]]:
    """Where each spoken unit of ``text`` starts and ends, in order. A run of punctuation
    alone ("，", "—") is not spoken, so it is no unit."""
    found: list[tuple[int, int]] = []
    taken = 0  # where the last candidate, with its marks, ended
    for match in _CANDIDATE.finditer(text):
        start, end = match.span()
        if start < taken:
            continue  # a combining mark already taken by the character before it
        # Combining marks belong to the character before them (Thai vowel signs, variation
        # selectors): a cut never separates them.
        while end < len(text) and unicodedata.category(text[end]) in _MARKS:
            end += 1
        taken = end
        if any(unicodedata.category(c)[0] in "LN" for c in text[start:end]):
            found.append((start, end))
    return found


def unit_count(text: str) -> int:
    return len(spans(text))


def cut_units(text: str, keep: int) -> str:
    """``text`` up to the end of its first ``keep`` units, spacing and punctuation between
    them as written (nothing after the last one kept)."""
    units = spans(text)
    if keep <= 0 or not units:
        return ""
    if keep >= len(units):
        return text.strip()
    return text[: units[keep - 1][1]].lstrip()
