"""Streaming integer-ratio resampler for telephone audio (8 kHz ⇄ 16 or 24 kHz).

Why hand-written: the libraries either do not filter or hold the audio back too long.
`audioop.ratecv` interpolates linearly with no anti-alias filter (a 6 kHz tone at 24 kHz comes
out of the 8 kHz side at full level); `soxr` streaming rejects aliases well but holds back
tens of milliseconds per direction (HQ: 45 ms on average with 20 ms chunks, bursts up to 70 ms;
see bench/audio.py), which a conversation cannot spare. A linear-phase FIR of
about 160 taps at the high rate gives >= 100 dB rejection with 3.25 ms of delay, and numpy runs
it in a few microseconds per 20 ms frame.

The filter is a Kaiser-windowed sinc designed with numpy alone (scipy is not a runtime
dependency), once per rate pair (cached): creating one resampler per call and direction is
cheap. The per-call state is a short history of input samples, cleared by `reset()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np

# The telephone band as a fraction of the low (8 kHz) rate: flat up to 3400 Hz, everything from
# 4400 Hz up rejected. The transition straddles the 4 kHz Nyquist frequency: what lands between
# 4000 and 4400 Hz can only alias into 3600–4000 Hz, above the telephone passband.
PASSBAND_EDGE = 3400 / 8000
STOPBAND_EDGE = 4400 / 8000
# Designed with 20 dB of margin over the 80 dB the budget asks for; it also puts aliases under
# the noise floor of 16-bit audio (~98 dB).
STOPBAND_ATTENUATION_DB = 100.0
MAX_DELAY_S = 0.005

# Outputs per matrix product, at the low rate: 8 low-rate samples (1 ms at 8 kHz) divide every
# 20 ms frame, and blocks this small keep the filter matrix small (see `_block_matrix`).
_BLOCK_LOW_SAMPLES = 8
# Rows per matrix product. numpy copies the overlapping rows before multiplying; slicing a long
# chunk (a model delta of several seconds) bounds that copy to a few hundred kilobytes, and the
# resampler's buffer to one slice (6000 samples at 24 kHz).
_MAX_ROWS_PER_PRODUCT = 250


@dataclass(frozen=True)
class FilterDesign:
    """One low-pass FIR for a rate pair, laid out for block processing.

    `taps` is the prototype filter at the high rate (DC gain 1). `matrix` maps a window of
    `history + step` input samples to the outputs of one step; it is shared, read-only, by
    every resampler with the same rates.
    """

    from_rate: int
    to_rate: int
    factor: int  # the integer ratio between the high and the low rate
    taps: np.ndarray
    delay_high_samples: int  # (len(taps) - 1) / 2, a multiple of `factor`
    history: int  # input samples kept from one call to the next
    step: int  # input samples per matrix row
    matrix: np.ndarray

    @cached_property  # the design is shared and never changes: computed once
    def peak_gain(self) -> float:
        """The most the filter can amplify a signal's peak (it overshoots: a little over 1).
        An output is a weighted sum of inputs, so it is at most the largest input times the
        sum of its weights' magnitudes; this is the largest such sum over the outputs."""
        return float(np.abs(self.matrix).sum(axis=0).max())

    @property
    def upsampling(self) -> bool:
        return self.to_rate > self.from_rate

    @property
    def delay_s(self) -> float:
        return self.delay_high_samples / max(self.from_rate, self.to_rate)


def _kaiser_lowpass(high_rate: int, low_rate: int) -> tuple[np.ndarray, int]:
    """Design the prototype low-pass at `high_rate`; return (taps, delay in samples)."""
    pass_hz = PASSBAND_EDGE * low_rate
    stop_hz = STOPBAND_EDGE * low_rate
    factor = high_rate // low_rate
    # Kaiser's estimates for the length and the window shape that reach the attenuation.
    transition = 2 * math.pi * (stop_hz - pass_hz) / high_rate
    min_taps = math.ceil((STOPBAND_ATTENUATION_DB - 7.95) / (2.285 * transition)) + 1
    # Round the delay up to a whole number of low-rate samples, so that a signal's position on
    # the 8 kHz side is an exact sample count in both directions.
    delay = math.ceil((min_taps - 1) / 2 / factor) * factor
    num_taps = 2 * delay + 1
    beta = 0.1102 * (STOPBAND_ATTENUATION_DB - 8.7)
    cutoff = (pass_hz + stop_hz) / 2 / high_rate  # cycles per sample
    offsets = np.arange(num_taps) - delay
    taps = 2 * cutoff * np.sinc(2 * cutoff * offsets) * np.kaiser(num_taps, beta)
    return taps / taps.sum(), delay


def _block_matrix(taps: np.ndarray, factor: int, upsampling: bool) -> tuple[int, int, np.ndarray]:
    """Lay the filter out as one matrix product per block: (history, step, matrix).

    A row of input — `history` past samples then `step` new ones — times `matrix` gives the
    outputs of one block. The rows are a strided view of one buffer, so a whole frame is one
    matrix product: about twice as fast as one `np.convolve` per polyphase branch, whose
    per-call overhead dominates at these sizes. Many entries are zero; that costs less than
    the calls it saves.
    """
    num_taps = len(taps)
    if upsampling:
        # Output o of a block (high-rate time block_start * factor + o) sums taps[o - i * factor]
        # over low-rate inputs i of the row, counted from the block start.
        step = _BLOCK_LOW_SAMPLES
        outputs = step * factor
        history = math.ceil(num_taps / factor) - 1
        gain = factor  # zero-stuffing divides the level by the factor
    else:
        # Output o of a block sums taps[o * factor + factor - 1 - i] over high-rate inputs i of
        # the row, counted from the block start: each output closes a group of `factor` inputs.
        outputs = _BLOCK_LOW_SAMPLES
        step = outputs * factor
        history = num_taps - factor
        gain = 1
    matrix = np.zeros((history + step, outputs))
    for row in range(history + step):
        i = row - history
        for o in range(outputs):
            k = o - i * factor if upsampling else o * factor + factor - 1 - i
            if 0 <= k < num_taps:
                matrix[row, o] = gain * taps[k]
    matrix.setflags(write=False)
    return history, step, matrix


@cache
def design_filter(from_rate: int, to_rate: int) -> FilterDesign:
    """The filter design for a rate pair, computed once and cached.

    One rate must be an integer multiple of the other (8 ⇄ 16 kHz, 8 ⇄ 24 kHz).
    """
    low, high = sorted((from_rate, to_rate))
    if low <= 0 or low == high or high % low:
        raise ValueError(
            f"unsupported rate pair {from_rate} -> {to_rate} Hz: "
            "one rate must be an integer multiple (> 1) of the other"
        )
    factor = high // low
    taps, delay = _kaiser_lowpass(high, low)
    if delay / high > MAX_DELAY_S:
        raise ValueError(f"{from_rate} -> {to_rate} Hz needs {delay / high * 1e3:.2f} ms of delay")
    taps.setflags(write=False)
    upsampling = to_rate > from_rate
    history, step, matrix = _block_matrix(taps, factor, upsampling)
    return FilterDesign(from_rate, to_rate, factor, taps, delay, history, step, matrix)


class Resampler:
    """Streaming resampler from `from_rate` to `to_rate`; one per call and direction.

    Feed it chunks of any length; it carries its filter state across them, so the output does
    not depend on how the input was split. It starts from an all-zero history, which makes the
    sample counts exact from the first chunk on:

    - upsampling by L: every input sample gives exactly L output samples at once
      (160 samples at 8 kHz in → 480 at 24 kHz out, every frame, the first one included);
    - downsampling by M: after n input samples in total, exactly ceil(n / M) outputs have come
      out (480 in → 160 out every frame); the up to M - 1 samples of a partial group wait for
      the next chunk.

    The filter is linear-phase: the output is the band-limited input delayed by `delay_s`
    (3.25 ms for 8 ⇄ 16 kHz and 8 ⇄ 24 kHz, a whole number of 8 kHz samples). Samples are
    numbers in whatever scale you give them (pcm16 values stay pcm16 values; the passband gain
    is 1); the output is float64. Any real dtype goes in: an int16 array read straight from
    pcm16 bytes is converted as it is copied in, with no separate conversion.

    Why it is built this way (see bench/README.md for the measurements): at 20 ms frames the
    arithmetic is ~25k multiply-adds per frame, a couple of microseconds in one BLAS call, and
    every other numpy call costs a few tenths of a microsecond whatever its size. So a frame
    is one matrix product and as few other calls as possible: the input is copied once into a
    buffer that lives as long as the resampler, right after the history it needs; the rows
    view over that buffer is reused while the chunk size stays the same; and the history (with
    any pending partial group) moves to the front of the buffer with one copy.
    """

    def __init__(self, from_rate: int, to_rate: int) -> None:
        design = design_filter(from_rate, to_rate)
        self._design = design
        # Inputs are consumed in groups (1 sample upsampling, `factor` downsampling); a partial
        # group at the end of a chunk stays pending in the buffer, right after the history.
        self._group = 1 if design.upsampling else design.factor
        self._outputs_per_group = design.factor if design.upsampling else 1
        # Longer chunks are processed in slices of this many input samples (whole blocks), so
        # the buffer stays small (tens of kilobytes) whatever the size of a model's delta.
        self._max_slice = _MAX_ROWS_PER_PRODUCT * design.step
        # Room for the history, a slice, a pending partial group and the zero padding of the
        # last block.
        self._buffer = np.zeros(design.history + self._max_slice + design.step + self._group)
        self._pending = 0  # input samples after the history that wait for a full group
        self._rows: np.ndarray | None = None  # strided view of the buffer, `_rows_blocks` rows
        self._rows_blocks = 0
        self._idle = True
        self.reset()

    @property
    def design(self) -> FilterDesign:
        """The filter, shared by every resampler with the same rates."""
        return self._design

    @property
    def from_rate(self) -> int:
        return self._design.from_rate

    @property
    def to_rate(self) -> int:
        return self._design.to_rate

    @property
    def delay_s(self) -> float:
        """Algorithmic delay of the filter, in seconds."""
        return self._design.delay_s

    @property
    def delay_input_samples(self) -> int:
        """The delay counted in input samples (a whole number by design)."""
        return round(self._design.delay_s * self._design.from_rate)

    def reset(self) -> None:
        """Forget all past input: the next chunk is filtered as if it were the first.

        Call it on barge-in, so the tail of an interrupted reply cannot ring into the next.
        """
        self._idle = True  # nothing fed since the last reset: flush() has nothing to drain
        # Downsampling: M - 1 zeros ahead of the first sample make input sample n * M close a
        # group, so output n comes out as soon as it arrives (ceil counts, not floor).
        self._pending = self._group - 1
        self._buffer[: self._design.history + self._pending] = 0.0

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Resample the next chunk of the stream; returns float64 samples at `to_rate`."""
        if len(samples):
            self._idle = False
        if len(samples) <= self._max_slice:
            return self._process_slice(samples)
        step = self._max_slice
        return np.concatenate(
            [self._process_slice(samples[i : i + step]) for i in range(0, len(samples), step)]
        )

    def _process_slice(self, samples: np.ndarray) -> np.ndarray:
        design, buffer = self._design, self._buffer
        history, step = design.history, design.step
        start = history + self._pending
        available = self._pending + len(samples)
        # One copy in, converting the dtype on the way (int16 → float64 for pcm16 input).
        buffer[start : history + available] = samples
        usable = available - available % self._group
        if usable == 0:
            self._pending = available
            return np.zeros(0)

        # Row k of the product reads buffer[k * step : k * step + history + step]: the rows
        # overlap, a strided view, built again only when the number of blocks changes.
        blocks = -(-usable // step)
        if blocks != self._rows_blocks:
            item = buffer.itemsize
            shape = (blocks, history + step)
            self._rows = np.ndarray(shape, buffer.dtype, buffer, 0, (step * item, item))
            self._rows_blocks = blocks
        padded = blocks * step
        if padded > available:
            # Zeros pad the last block; the outputs they reach are past the usable ones,
            # dropped. They overwrite nothing: the buffer past `available` holds no input.
            buffer[history + available : history + padded] = 0.0
        out = np.dot(self._rows, design.matrix)

        # The next chunk's history, and the pending partial group after it, to the front.
        self._pending = available - usable
        buffer[: history + self._pending] = buffer[usable : history + available]
        count = usable * self._outputs_per_group // self._group
        out = out.ravel()  # the product is contiguous: a view, no copy
        return out if count == len(out) else out[:count]

    def flush(self) -> np.ndarray:
        """Drain the delayed tail of the stream (zeros pushed through), then `reset()`.

        Use it at the natural end of a stream, so its last `delay_s` is heard rather than held
        until the next chunk. The result is exactly `delay_s` worth of output samples, or
        nothing if nothing was fed since the last reset.
        """
        if self._idle:
            return np.zeros(0)
        tail = self.process(np.zeros(self.delay_input_samples))
        self.reset()
        return tail
