"""What the outbound tests share: the example personas, the dental one calling at any time."""

import re
import shutil
from pathlib import Path

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
