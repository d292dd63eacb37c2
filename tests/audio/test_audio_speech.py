"""The resampler and pipelines on real speech, against sox's renders of it.

espeak-ng speaks, sox renders the speech at 24 kHz and at 8 kHz. Both tools are required (CI
installs them with `apt-get install -y espeak-ng sox`): a missing one is an error naming the
package, never a silent skip. (The fixture lives here, not in a conftest.py: this directory is
not a package, and a second module named `conftest` would shadow tests/conftest.py for the
tests that import from it.)
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from audio_signals import band, db, rms, stream

from phoneagent.audio import (
    ULAW_FRAME_BYTES,
    CallerToModel,
    ModelToCaller,
    Resampler,
    pcm16_to_ulaw,
    samples_to_pcm16,
    ulaw_to_pcm16,
)

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


def _render(sox: str, source: Path, rate: int, target: Path) -> np.ndarray:
    # Raw 32-bit float output: no dither, no 16-bit rounding in the reference.
    raw_float = ["-t", "raw", "-e", "floating-point", "-b", "32"]
    rate_effect = ["rate", "-v", "-L", str(rate)]  # very high quality, linear phase
    subprocess.run(
        [sox, str(source), *raw_float, str(target), *rate_effect], check=True, capture_output=True
    )
    return np.fromfile(target, dtype="<f4").astype(np.float64) * 32768


@pytest.fixture(scope="module")
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


MIN_REJECTION_DB = 80.0
# Flat within ±0.1 dB means an error of at most 10^(0.1/20) - 1 of the signal: -38.7 dB.
MAX_PASSBAND_ERROR_DB = db(10 ** (0.1 / 20) - 1)


def in_telephone_band(x: np.ndarray, rate: int) -> np.ndarray:
    # Above 3.4 kHz the filters differ by design (sox keeps 95% of the band up to 3.8 kHz).
    return band(x, rate, 0, 3400)


def test_speech_downsampled_to_8khz_matches_sox(speech):
    resampler = Resampler(24000, 8000)
    ours = stream(resampler, speech.at_24k, 480)
    delay = round(resampler.delay_s * 8000)
    ours, reference = ours[delay:], speech.at_8k[: len(ours) - delay]
    error = rms(in_telephone_band(ours - reference, 8000)) / rms(in_telephone_band(reference, 8000))
    assert db(error) <= MAX_PASSBAND_ERROR_DB, f"{db(error):.1f} dB"


def test_speech_upsampled_to_24khz_matches_sox(speech):
    resampler = Resampler(8000, 24000)
    ours = stream(resampler, speech.at_8k, 160)
    delay = round(resampler.delay_s * 24000)
    ours, reference = ours[delay:], speech.at_24k[: len(ours) - delay]
    error = rms(in_telephone_band(ours - reference, 24000))
    error /= rms(in_telephone_band(reference, 24000))
    assert db(error) <= MAX_PASSBAND_ERROR_DB, f"{db(error):.1f} dB"


def test_speech_above_4400_hz_does_not_alias_into_8khz(speech):
    # The fricatives of real speech, alone: nothing of them may reach the 8 kHz side.
    highs = band(speech.at_24k, 24000, 4400, 12000)
    assert db(rms(highs) / rms(speech.at_24k)) > -30, "the utterance should have highs to test"
    out = stream(Resampler(24000, 8000), highs, 480)
    rejection = -db(rms(out) / rms(highs))
    assert rejection >= MIN_REJECTION_DB, f"only {rejection:.1f} dB"


def test_upsampled_speech_has_no_images(speech):
    out = stream(Resampler(8000, 24000), speech.at_8k, 160)
    # Images of the band up to 3.6 kHz land at 4.4 kHz and above.
    rejection = -db(rms(band(out, 24000, 4400, 12000)) / rms(out))
    assert rejection >= MIN_REJECTION_DB, f"only {rejection:.1f} dB"


def test_speech_round_trip_through_both_pipelines(speech):
    """Caller μ-law → model pcm16 24 kHz → caller μ-law frames: the same speech comes back,
    delayed by the two filter delays, in whole 20 ms frames."""
    caller_ulaw = pcm16_to_ulaw(samples_to_pcm16(speech.at_8k))
    inbound, outbound = CallerToModel(), ModelToCaller()
    frames = []
    for i in range(0, len(caller_ulaw), ULAW_FRAME_BYTES):
        frames += outbound.process(inbound.process(caller_ulaw[i : i + ULAW_FRAME_BYTES]))
    assert all(len(frame) == ULAW_FRAME_BYTES for frame in frames)
    frames += outbound.flush()

    sent = np.frombuffer(ulaw_to_pcm16(caller_ulaw), "<i2").astype(float)
    back = np.frombuffer(ulaw_to_pcm16(b"".join(frames)), "<i2").astype(float)
    delay = round((inbound.delay_s + outbound.delay_s) * 8000)
    assert len(back) == len(sent) + round(outbound.delay_s * 8000)

    lags = range(0, 2 * delay)
    scores = [np.dot(back[lag : lag + len(sent) - 2 * delay], sent[: -2 * delay]) for lag in lags]
    assert int(np.argmax(scores)) == delay
    error = in_telephone_band(back[delay : delay + len(sent)] - sent[: len(back) - delay], 8000)
    snr = -db(rms(error) / rms(in_telephone_band(sent, 8000)))
    # μ-law keeps ~38 dB of SNR on speech; the signal goes through it once more on the way back.
    assert snr >= 30, f"{snr:.1f} dB"
