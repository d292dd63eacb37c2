"""Telephone audio: G.711 μ-law codec, low-delay streaming resampler, 20 ms framing.

The usual entry points are the two per-call pipelines, `CallerToModel` and `ModelToCaller`.
"""

from .framing import (
    FRAME_MS,
    ULAW_BYTES_PER_MS,
    ULAW_FRAME_BYTES,
    ULAW_SAMPLE_RATE,
    ULAW_SILENCE_FRAME,
    UlawFramer,
    pcm16_ms,
    ulaw_ms,
)
from .g711 import ULAW_SILENCE, pcm16_to_ulaw, ulaw_to_pcm16
from .pcm import pcm16_rms, pcm16_to_samples, pcm16_view, samples_to_pcm16
from .pipeline import CallerToModel, ModelToCaller
from .resample import FilterDesign, Resampler, design_filter

__all__ = [
    "FRAME_MS",
    "ULAW_BYTES_PER_MS",
    "ULAW_FRAME_BYTES",
    "ULAW_SAMPLE_RATE",
    "ULAW_SILENCE",
    "ULAW_SILENCE_FRAME",
    "CallerToModel",
    "FilterDesign",
    "ModelToCaller",
    "Resampler",
    "UlawFramer",
    "design_filter",
    "pcm16_ms",
    "pcm16_rms",
    "pcm16_to_samples",
    "pcm16_to_ulaw",
    "pcm16_view",
    "samples_to_pcm16",
    "ulaw_ms",
    "ulaw_to_pcm16",
]
