"""Signal generation and measurement shared by the audio tests (imported as a plain module:
pytest puts this package-less directory on sys.path)."""

from __future__ import annotations

import math

import numpy as np


def tone(freq_hz: float, rate: int, seconds: float, amplitude: float = 1.0) -> np.ndarray:
    """A sine; the phase offset keeps a tone at the Nyquist frequency from sampling as zeros."""
    t = np.arange(round(rate * seconds)) / rate
    return amplitude * np.sin(2 * math.pi * freq_hz * t + 0.7)


def db(ratio: float) -> float:
    return 20 * math.log10(max(ratio, 1e-30))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def fit_tone(x: np.ndarray, freq_hz: float, rate: int, start: int) -> tuple[float, float, float]:
    """Least-squares fit of a sine at `freq_hz` to x[start:], on the absolute time axis.

    Returns (amplitude, phase in radians relative to sin(2πft + 0.7), rms of what is left).
    """
    t = np.arange(start, len(x)) / rate
    arg = 2 * math.pi * freq_hz * t + 0.7
    basis = np.column_stack((np.sin(arg), np.cos(arg), np.ones_like(t)))
    coef, *_ = np.linalg.lstsq(basis, x[start:], rcond=None)
    residual = x[start:] - basis @ coef
    return math.hypot(coef[0], coef[1]), math.atan2(coef[1], coef[0]), rms(residual)


def band(x: np.ndarray, rate: int, low_hz: float, high_hz: float) -> np.ndarray:
    """x with every frequency outside [low_hz, high_hz] removed (an ideal FFT filter)."""
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    spectrum[(freqs < low_hz) | (freqs > high_hz)] = 0
    return np.fft.irfft(spectrum, len(x))


def split_points(total: int, rng: np.random.Generator, max_chunk: int = 700) -> list[int]:
    """Random cut points, including empty and one-sample chunks."""
    points, position = [], 0
    while position < total:
        position += int(
            rng.choice([0, 1, 2, 3, 7, 159, 160, 161, 479, 480, rng.integers(max_chunk)])
        )
        points.append(min(position, total))
    return points


def stream(resampler, x: np.ndarray, chunk: int) -> np.ndarray:
    """Feed x to the resampler in chunks of `chunk` samples; the concatenated output."""
    parts = [resampler.process(x[i : i + chunk]) for i in range(0, len(x), chunk)]
    return np.concatenate(parts)
