"""Speech for the test kit: turn text into pcm16 mono little-endian audio.

The fake realtime model speaks its replies with this, and tests use it to play a caller. When
``espeak-ng`` is installed the audio is real (robotic, but intelligible) speech, in Mandarin
(``espeak-ng -v cmn``) for text with Chinese characters and in English otherwise; without it a
clearly synthetic speech-like signal stands in, so ``phoneagent demo`` still works on a fresh
laptop. :func:`synthesizer_name` says which one is in use.

This is a test tool: it resamples with a whole-signal FFT (exact, but not streaming). It must not
import ``phoneagent.audio``, whose streaming resampler is the product under test.
"""

from __future__ import annotations

import functools
import io
import re
import shutil
import subprocess
import wave

import numpy as np

__all__ = ["espeak_voice", "synthesize", "synthesizer_name", "synthetic_speech"]

ESPEAK = "espeak-ng"
ESPEAK_VOICE = "en-us"
# Text with Chinese characters is read by espeak-ng's Mandarin voice, which reads the English
# words in it with English rules (espeak-ng switches language per word).
ESPEAK_MANDARIN = "cmn"
_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

# Both engines are normalised to the same peak level so that VAD thresholds in tests do not
# depend on the engine or its version. -4.4 dBFS is about espeak-ng's own level; its voiced
# 20 ms windows then have an RMS of roughly 2000-6500.
PEAK = 20_000

# The fallback speaks at ~14 characters per second, about the pace of espeak-ng's default voice;
# a Chinese character is a syllable, about three letters' time.
CHARS_PER_SECOND = 14.0
HAN_CHAR_WEIGHT = 3


def espeak_voice(text: str) -> str:
    """The espeak-ng voice for *text*: Mandarin when it has Chinese characters, else English."""
    return ESPEAK_MANDARIN if _HAN.search(text) else ESPEAK_VOICE


def synthesizer_name() -> str:
    """Name of the engine :func:`synthesize` uses: ``"espeak-ng"`` or ``"synthetic"``."""
    return ESPEAK if _espeak_path() else "synthetic"


@functools.lru_cache(maxsize=512)
def synthesize(text: str, sample_rate: int = 24_000) -> bytes:
    """Speak *text*: pcm16 mono little-endian bytes at *sample_rate*, cached per (text, rate).

    Uses espeak-ng when it is installed, else :func:`synthetic_speech`. Empty or blank text
    gives ``b""``.
    """
    if not text.strip():
        return b""
    if _espeak_path():
        samples, rate = _espeak(text)
        return _to_pcm16(_normalise(_resample(samples, rate, sample_rate)))
    return synthetic_speech(text, sample_rate)


def synthetic_speech(text: str, sample_rate: int = 24_000) -> bytes:
    """A clearly synthetic, speech-like signal whose duration follows the length of *text*.

    Voiced "syllables": a harmonic buzz at a 120-220 Hz gliding pitch, shaped by two
    vowel-dependent formants, under a syllable-rate envelope, with pauses between words. It is
    deterministic (a function of the text only) and has speech's level and rhythm, which is all
    the VAD, pacing and barge-in tests need.
    """
    if not text.strip():
        return b""
    # A Chinese character stands for a syllable: it gets the time of a few letters.
    text = "".join(c * HAN_CHAR_WEIGHT if _HAN.match(c) else c for c in text)
    duration = max(0.3, len(text) / CHARS_PER_SECOND)
    n = round(duration * sample_rate)
    t = np.arange(n) / sample_rate
    # Each character gets an equal slice of time; letters are voiced, the rest is a pause.
    char_of_sample = np.minimum((t / duration * len(text)).astype(int), len(text) - 1)
    chars = np.array([ord(c) for c in text])
    voiced = np.array([c.isalnum() for c in text])[char_of_sample]

    # Pitch glides within 120-220 Hz; phase is integrated so the glide has no clicks.
    f0 = 170 + 50 * np.sin(2 * np.pi * 0.7 * t) * np.cos(2 * np.pi * 0.23 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate

    # Vowel colour follows the character: formants (F1, F2) chosen from five vowel-like pairs.
    vowels = np.array([(730, 1090), (270, 2290), (530, 1840), (570, 840), (300, 870)])
    f1, f2 = vowels[chars[char_of_sample] % len(vowels)].T
    signal = np.zeros(n)
    nyquist = sample_rate / 2
    for k in range(1, 40):
        fk = k * f0
        if fk.min() >= nyquist * 0.9:
            break
        # Harmonic amplitudes: a 1/k source times two resonance bumps (additive formant filter).
        gain = (1 / k) * (
            1 + 4 * np.exp(-(((fk - f1) / 120) ** 2)) + 2.5 * np.exp(-(((fk - f2) / 180) ** 2))
        )
        signal += np.where(fk < nyquist * 0.9, gain, 0.0) * np.sin(k * phase)

    # Syllable envelope: one raised-cosine bump per ~3 characters, silenced at word gaps.
    syllable = (t / duration * len(text) / 3.0) % 1.0
    envelope = np.sin(np.pi * syllable) ** 0.6 * voiced
    envelope = np.convolve(envelope, np.hanning(int(0.01 * sample_rate) | 1), mode="same")
    return _to_pcm16(_normalise(signal * envelope))


@functools.cache
def _espeak_path() -> str | None:
    return shutil.which(ESPEAK)


def _espeak(text: str) -> tuple[np.ndarray, int]:
    """Render *text* with espeak-ng; returns (float samples, sample rate)."""
    wav = subprocess.run(
        [ESPEAK, "--stdout", "-v", espeak_voice(text), "--", text],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    with wave.open(io.BytesIO(wav)) as reader:
        # espeak-ng streams to stdout with a placeholder length in the header, so read "all
        # frames there are" rather than trusting getnframes().
        rate = reader.getframerate()
        if reader.getsampwidth() != 2 or reader.getnchannels() != 1:
            raise RuntimeError("espeak-ng produced audio that is not 16-bit mono")
        frames = reader.readframes(reader.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.float64), rate


def _resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling of a whole signal by zero-padding or truncating its spectrum.

    Truncating the spectrum is an ideal low-pass at the lower Nyquist frequency, so there is no
    aliasing; the signal is padded with silence first so the FFT's circular wrap is inaudible.
    """
    if rate_in == rate_out or samples.size == 0:
        return samples
    pad = rate_in // 10
    padded = np.concatenate([samples, np.zeros(pad)])
    n_out = round(padded.size * rate_out / rate_in)
    spectrum = np.fft.rfft(padded)
    bins = n_out // 2 + 1
    if bins > spectrum.size:
        spectrum = np.concatenate([spectrum, np.zeros(bins - spectrum.size, complex)])
    out = np.fft.irfft(spectrum[:bins], n_out) * (n_out / padded.size)
    return out[: round(samples.size * rate_out / rate_in)]


def _normalise(samples: np.ndarray) -> np.ndarray:
    peak = np.abs(samples).max(initial=0.0)
    return samples * (PEAK / peak) if peak > 0 else samples


def _to_pcm16(samples: np.ndarray) -> bytes:
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()
