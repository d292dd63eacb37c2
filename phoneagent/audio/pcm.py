"""pcm16 little-endian bytes ⇄ float sample arrays (the resampler's working format)."""

from __future__ import annotations

import numpy as np

_PCM16 = np.dtype("<i2")
_PCM16_MAX = np.float64(32767)
_PCM16_MIN = np.float64(-32768)


def pcm16_to_samples(pcm: bytes) -> np.ndarray:
    """pcm16 little-endian bytes → float64 samples on the pcm16 scale (-32768..32767).

    Raises ValueError if `pcm` is not a whole number of samples.
    """
    if len(pcm) % 2:
        raise ValueError(f"pcm16 needs an even number of bytes, got {len(pcm)}")
    return np.frombuffer(pcm, _PCM16).astype(np.float64)


def pcm16_view(pcm: bytes) -> np.ndarray:
    """pcm16 little-endian bytes as an int16 array, without a copy (read-only).

    What the resampler takes: it converts to float as it copies the samples into its buffer,
    which saves the separate float conversion of `pcm16_to_samples`. Raises ValueError if
    `pcm` is not a whole number of samples.
    """
    if len(pcm) % 2:
        raise ValueError(f"pcm16 needs an even number of bytes, got {len(pcm)}")
    return np.frombuffer(pcm, _PCM16)


def samples_to_pcm16(samples: np.ndarray, *, clip: bool = True) -> bytes:
    """Float samples on the pcm16 scale → pcm16 little-endian bytes, rounded and clipped.

    Clipping matters: a filtered full-scale signal can overshoot 32767 by a little, and a plain
    cast would wrap it around into a loud click. ``clip=False`` only where the samples are
    known to be in range (``overshoot.ClipGuard``): it saves the dearest call.
    """
    if not clip:
        return np.rint(samples).astype(_PCM16).tobytes()
    # Clip first (a new array), then round in place: equal to rounding then clipping, and two
    # numpy calls. The method, not np.clip, whose Python wrapper costs more than the work on
    # frame-sized arrays; float64 bounds, which numpy does not convert at every call.
    clipped = samples.clip(_PCM16_MIN, _PCM16_MAX)
    np.rint(clipped, out=clipped)
    return clipped.astype(_PCM16).tobytes()


def pcm16_rms(pcm: bytes) -> float:
    """Root mean square of pcm16 little-endian samples, on the pcm16 scale (0 for no audio)."""
    if len(pcm) < 2:
        return 0.0
    samples = np.frombuffer(pcm, _PCM16, count=len(pcm) // 2).astype(np.float32)
    return float(np.sqrt(np.mean(samples * samples)))
