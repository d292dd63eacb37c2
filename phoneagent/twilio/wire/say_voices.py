"""Which voices Twilio's ``<Say>`` accepts for which language (``say_voices.toml``, with its
sources), and the ``<Say>`` language and voice of a persona's language tag. No I/O beyond
reading that file once.

A persona's ``language`` is a language tag for the model ("zh-CN", "en-US"); ``<Say>`` names
languages its own way ("cmn-CN" for Mandarin) and fails on a voice that does not speak the
language it is given, so the two are matched here, and persona validation refuses a mismatch.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

__all__ = ["SayVoices", "say_voices"]

DATA_FILE = "say_voices.toml"


@dataclass(frozen=True)
class SayVoices:
    defaults: Mapping[str, str]  # <Say> language -> the voice used when a persona names none
    voices: Mapping[str, tuple[str, ...]]  # <Say> language -> every voice that speaks it
    aliases: Mapping[str, str]  # a language tag (lower case) -> the <Say> language for it

    def language_for(self, tag: str) -> str | None:
        """The ``<Say>`` language for a persona's language tag: the tag itself when ``<Say>``
        takes it, else the first of the tag and its shorter prefixes with an alias ("zh-Hant-TW"
        → "zh-Hant" → "cmn-TW"; "en-CA" → "en" → "en-US"); None when none has one."""
        by_lower = {language.lower(): language for language in self.voices}
        parts = tag.strip().lower().split("-")
        for end in range(len(parts), 0, -1):
            prefix = "-".join(parts[:end])
            if prefix in by_lower:
                return by_lower[prefix]
            if prefix in self.aliases:
                return self.aliases[prefix]
        return None

    def languages_of(self, voice: str) -> tuple[str, ...]:
        """The ``<Say>`` languages ``voice`` speaks (two for a bilingual voice; none for a name
        ``<Say>`` does not take)."""
        return tuple(language for language, voices in self.voices.items() if voice in voices)


@functools.cache
def say_voices() -> SayVoices:
    """The table, read once from the package's data file."""
    text = resources.files(__package__).joinpath(DATA_FILE).read_text(encoding="utf-8")
    data = tomllib.loads(text)
    languages = data["languages"]
    return SayVoices(
        defaults={language: entry["default"] for language, entry in languages.items()},
        voices={language: tuple(entry["voices"]) for language, entry in languages.items()},
        aliases={tag.lower(): language for tag, language in data["aliases"].items()},
    )
