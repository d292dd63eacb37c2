"""When the resampler's output may leave the pcm16 range, and so needs clipping.

A low-pass FIR overshoots: a loud input (a full-scale square wave, a clipped shout) can come out
a little beyond ±32767, and a plain cast to int16 would wrap that around into a loud click, so
the conversion back to pcm16 clips. Clipping is the dearest numpy call of a 20 ms frame's
conversion, twice as dear on a loaded server (its caches shared by many calls), and it changes
nothing unless the input was loud: an output is at most the loudest input within the filter's
reach times the filter's peak gain. So the pipelines clip only while an input above that quiet
limit is within reach; audioop finds a chunk's peak in C for a fraction of the cost.
"""

from __future__ import annotations

from .g711 import pcm16_peak
from .resample import FilterDesign

_PCM16_MAX = 32767


class ClipGuard:
    """Whether the outputs of a resampler's next chunk may need clipping; one per resampler,
    fed every chunk that resampler gets, reset with it."""

    def __init__(self, design: FilterDesign) -> None:
        # One LSB of margin for the product's rounding errors (far below a millionth of one).
        self._quiet_peak = (_PCM16_MAX - 1) / design.peak_gain
        # How long an input sample stays within reach of the outputs still to come: at most the
        # filter's length less one (`history` inputs upsampling, `history + factor - 1`
        # downsampling, whose outputs wait for the group of `factor` inputs they close). A row
        # of the product and a group more is a margin that costs nothing.
        self._reach = design.history + design.step + design.factor
        self._left = 0  # input samples until the last loud one is out of reach

    def may_clip(self, pcm: bytes) -> bool:
        """Note the next chunk (pcm16 little-endian); True if its outputs may need clipping.
        A flush (zeros pushed through) is the empty chunk."""
        samples = len(pcm) // 2
        if samples and pcm16_peak(pcm) > self._quiet_peak:
            self._left = self._reach + samples
        may_clip = self._left > 0
        self._left = max(0, self._left - samples)
        return may_clip

    def reset(self) -> None:
        self._left = 0
