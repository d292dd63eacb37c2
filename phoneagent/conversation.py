"""Kept for importers: what the model is told lives in ``phoneagent.call.prompts``."""

from phoneagent.call.prompts import (
    LANGUAGE_NAMES,
    VERBATIM_PROMPT,
    replay,
    say_verbatim,
    session_config,
    with_guidance,
)

__all__ = [
    "LANGUAGE_NAMES",
    "VERBATIM_PROMPT",
    "replay",
    "say_verbatim",
    "session_config",
    "with_guidance",
]
