"""Real speech for the audio tests: espeak-ng speaks, sox renders it at 24 kHz and 8 kHz.

Both tools are required (CI installs them with `apt-get install -y espeak-ng sox`): a missing
one is an error naming the package, never a silent skip.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import pytest

SENTENCE = (
    "Thanks for calling Seaside Dental. She sells sea shells; "
    "please stay on the line while I transfer you to the front desk."
)


@dataclass(frozen=True)
class Speech:
    """One utterance, rendered at both rates by sox (very high quality, linear phase, so both
    renders are time-aligned with the source). Samples are float64 on the pcm16 scale."""

    at_24k: np.ndarray
    at_8k: np.ndarray


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"{tool} is not installed; the speech tests need it: apt-get install -y espeak-ng sox",
            pytrace=False,
        )
    return path


def _render(sox: str, source, rate: int, target) -> np.ndarray:
    # Raw 32-bit float output: no dither, no 16-bit rounding in the reference.
    subprocess.run(
        [
            sox,
            str(source),
            "-t",
            "raw",
            "-e",
            "floating-point",
            "-b",
            "32",
            str(target),
            "rate",
            "-v",
            "-L",
            str(rate),
        ],
        check=True,
        capture_output=True,
    )
    return np.fromfile(target, dtype="<f4").astype(np.float64) * 32768


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> Speech:
    espeak, sox = _require("espeak-ng"), _require("sox")
    directory = tmp_path_factory.mktemp("speech")
    source = directory / "espeak.wav"
    subprocess.run(
        [espeak, "-v", "en-us", "-s", "165", "-w", str(source), SENTENCE],
        check=True,
        capture_output=True,
    )
    return Speech(
        at_24k=_render(sox, source, 24000, directory / "24k.f32"),
        at_8k=_render(sox, source, 8000, directory / "8k.f32"),
    )
