"""What the outbound tests share: the example personas, the dental one calling at any time, and
its call events sent to a test's webhook sink."""

import re
import shutil
from pathlib import Path
from typing import Any

from conftest import EXAMPLE_PERSONAS

DENTAL = "+14155550100"
PERSONA = "bright-smile-dental"


def personas_calling_any_time(directory: Path) -> Path:
    """The example personas in ``directory``, the dental one without calling hours (a test
    cannot choose the clock of ``phoneagent call``, or of a second server)."""
    shutil.copytree(EXAMPLE_PERSONAS, directory)
    dental = directory / f"{PERSONA}.toml"
    dental.write_text(re.sub(r"(?m)^(calling_hours|days) = .*$", "", dental.read_text()))
    return directory


HOOK_SECRET = "whsec_b3V0Ym91bmQtdGVzdA=="


def send_events_to(persona_file: Path, url: str) -> None:
    """The persona in ``persona_file`` sends its call events to ``url``, signed with
    HOOK_SECRET (in $OUTBOUND_HOOK_SECRET: the test sets it)."""
    webhook = f'\n[webhook]\nurl = "{url}"\nsecret_env = "OUTBOUND_HOOK_SECRET"\n'
    persona_file.write_text(persona_file.read_text() + webhook)


def personas_sending_events(
    directory: Path, url: str, monkeypatch: Any, *, any_time: bool = True
) -> Path:
    """The example personas in ``directory`` (the dental one calling at any time unless
    ``any_time`` is False), the dental one sending its call events to ``url``, signed with
    HOOK_SECRET (set in the environment with ``monkeypatch``)."""
    monkeypatch.setenv("OUTBOUND_HOOK_SECRET", HOOK_SECRET)
    if any_time:
        personas_calling_any_time(directory)
    else:
        shutil.copytree(EXAMPLE_PERSONAS, directory)
    send_events_to(directory / f"{PERSONA}.toml", url)
    return directory
