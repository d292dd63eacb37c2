"""Clipping only when the filter's output can leave the pcm16 range: the pipelines' output is
byte for byte the output of always clipping, for any mix of loud and quiet chunks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phoneagent.audio import (
    CallerToModel,
    ModelToCaller,
    Resampler,
    design_filter,
    pcm16_to_ulaw,
    pcm16_view,
    samples_to_pcm16,
    ulaw_to_pcm16,
)
from phoneagent.audio.g711 import pcm16_peak
from phoneagent.audio.overshoot import ClipGuard


def worst_case(from_rate: int, to_rate: int, amplitude: float) -> np.ndarray:
    """The input that drives an output of a fresh resampler furthest: the signs of that
    output's weights, at ``amplitude``. The output comes out at amplitude × peak_gain."""
    matrix = design_filter(from_rate, to_rate).matrix
    weights = matrix[:, np.abs(matrix).sum(axis=0).argmax()]
    return np.where(weights >= 0, amplitude, -amplitude)


def quiet_limit(from_rate: int, to_rate: int) -> float:
    return 32766 / design_filter(from_rate, to_rate).peak_gain


def as_pcm16(values: np.ndarray) -> bytes:
    return np.clip(np.rint(values), -32768, 32767).astype("<i2").tobytes()


def test_the_filter_overshoots_by_its_peak_gain():
    """The case clipping exists for: a full-scale input comes out far beyond the range."""
    for rates in [(8000, 24000), (24000, 8000)]:
        design = design_filter(*rates)
        out = Resampler(*rates).process(worst_case(*rates, 32767))
        assert np.abs(out).max() == pytest.approx(32767 * design.peak_gain)
        assert design.peak_gain > 1.5


def test_a_chunk_just_above_the_quiet_limit_is_clipped():
    """The quiet limit is no looser than the bound: 15% over it, the output overshoots, and the
    pipelines still give exactly what always clipping gives."""
    up = as_pcm16(worst_case(8000, 24000, quiet_limit(8000, 24000) * 1.15))
    ulaw = pcm16_to_ulaw(up)
    unclipped = Resampler(8000, 24000).process(pcm16_view(ulaw_to_pcm16(ulaw)))
    assert np.abs(unclipped).max() > 32767
    assert CallerToModel().process(ulaw) == samples_to_pcm16(unclipped)

    down = as_pcm16(worst_case(24000, 8000, quiet_limit(24000, 8000) * 1.15))
    unclipped = Resampler(24000, 8000).process(pcm16_view(down))
    assert np.abs(unclipped).max() > 32767
    outbound = ModelToCaller()
    got = b"".join(outbound.process(down)) + outbound._framer.flush()
    assert got == pcm16_to_ulaw(samples_to_pcm16(unclipped))


def test_the_guard_clips_for_the_filter_s_reach_after_a_loud_chunk():
    """An input sample reaches the outputs of one row of the product (history + step inputs)
    and, downsampling, the group it belongs to: that long after the loud chunk, then no more."""
    for rates in [(8000, 24000), (24000, 8000)]:
        design = design_filter(*rates)
        guard = ClipGuard(design)
        assert not guard.may_clip(bytes(640))
        assert guard.may_clip(as_pcm16(np.full(7, quiet_limit(*rates) + 1)))
        clipped = 0
        while guard.may_clip(bytes(2)):  # one quiet sample at a time
            clipped += 1
        assert clipped == design.history + design.step + design.factor
        assert guard.may_clip(as_pcm16(np.full(3, -32768)))
        guard.reset()
        assert not guard.may_clip(bytes(2))


def test_the_peak_is_the_largest_magnitude():
    samples = np.array([3, -32768, 12, 32767], "<i2")
    assert pcm16_peak(samples.tobytes()) == 32768
    assert pcm16_peak(b"") == 0


def first_difference(got: bytes, expected: bytes) -> tuple[int, int, int] | None:
    """Where two outputs part (offset, lengths), or None: a short message where pytest would
    diff kilobytes of bytes for minutes."""
    if got == expected:
        return None
    pairs = enumerate(zip(got, expected, strict=False))  # the shorter one's length, at most
    offset = next((i for i, (a, b) in pairs if a != b), min(len(got), len(expected)))
    return offset, len(got), len(expected)


CHUNKS = st.lists(
    st.tuples(
        st.sampled_from(["silence", "quiet", "speech", "full", "worst"]),
        # input samples; now and then longer than the resampler's slice (6000 at 24 kHz)
        st.integers(min_value=1, max_value=900) | st.integers(min_value=5000, max_value=13000),
        st.floats(min_value=0.9, max_value=1.6),  # a worst case's level over the quiet limit
    ),
    min_size=1,
    max_size=12,
)


def chunk(
    kind: str, samples: int, level: float, rng: np.random.Generator, rates: tuple[int, int]
) -> bytes:
    match kind:
        case "silence":
            values = np.zeros(samples)
        case "quiet":
            values = rng.normal(0, 300, samples)
        case "speech":
            values = rng.normal(0, 9000, samples)
        case "full":
            values = np.resize([32767, 32767, -32768, -32768], samples)
        case _:  # as much of the worst case as fits, after a few samples of silence
            pattern = worst_case(*rates, quiet_limit(*rates) * level)
            values = np.concatenate([np.zeros(samples % 7), pattern])[:samples]
    return as_pcm16(values)


@settings(max_examples=60, deadline=None, derandomize=True)  # the same cases in CI
@given(CHUNKS, st.integers(0, 2**32 - 1), st.sampled_from([24000, 16000]))
def test_caller_to_model_is_always_clipping_byte_for_byte(chunks, seed, model_rate):
    rng = np.random.default_rng(seed)
    pipeline, reference = CallerToModel(model_rate), Resampler(8000, model_rate)
    for kind, samples, level in chunks:
        # μ-law carries the loud cases too: a full-scale square wave is codes 0x80 and 0x00.
        ulaw = pcm16_to_ulaw(chunk(kind, samples, level, rng, (8000, model_rate)))
        expected = samples_to_pcm16(reference.process(pcm16_view(ulaw_to_pcm16(ulaw))))
        assert first_difference(pipeline.process(ulaw), expected) is None


@settings(max_examples=60, deadline=None, derandomize=True)  # the same cases in CI
@given(
    CHUNKS,
    st.integers(0, 2**32 - 1),
    st.sampled_from(["flush", "reset", "none"]),
    st.sampled_from([24000, 16000]),
    st.booleans(),
)
def test_model_to_caller_is_always_clipping_byte_for_byte(chunks, seed, ending, rate, odd):
    """``odd``: the deltas split mid-sample, as a model's may (the pipeline holds the odd byte
    for the next delta; the reference gets whole samples)."""
    rng = np.random.default_rng(seed)
    pipeline, reference = ModelToCaller(rate), Resampler(rate, 8000)
    got, expected = b"", b""
    held = b""  # the reference's odd byte: kept from one delta to the next, as the pipeline's
    for _ in range(2):  # a second reply, after the first one's flush or reset (or neither)
        for kind, samples, level in chunks:
            pcm = chunk(kind, samples, level, rng, (rate, 8000))
            if odd:
                pcm = pcm[1:] if len(pcm) > 2 else pcm
            got += b"".join(pipeline.process(pcm))
            whole, held = held + pcm, b""
            if len(whole) % 2:
                whole, held = whole[:-1], whole[-1:]
            expected += pcm16_to_ulaw(samples_to_pcm16(reference.process(pcm16_view(whole))))
        got += pipeline._framer.flush()  # what the framer holds, to compare whole streams
        if ending == "flush":
            got += b"".join(pipeline.flush())
            expected += pcm16_to_ulaw(samples_to_pcm16(reference.flush()))
            held = b""  # a flush drops the dangling half sample
        elif ending == "reset":
            pipeline.reset()
            reference.reset()
            held = b""
    assert first_difference(got, expected) is None
