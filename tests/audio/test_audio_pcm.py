"""pcm16 bytes ⇄ sample arrays, the conversions on every frame of both directions."""

from __future__ import annotations

import numpy as np
import pytest

from phoneagent.audio import pcm16_to_samples, pcm16_view, samples_to_pcm16


def test_samples_are_rounded_to_nearest_and_clipped_not_wrapped():
    samples = np.array([0.4, 0.5, 1.5, -0.5, -2.6, 32767.4, 32767.6, 40000.0, -32768.6, -1e9])
    expected = [0, 0, 2, 0, -3, 32767, 32767, 32767, -32768, -32768]
    assert np.frombuffer(samples_to_pcm16(samples), "<i2").tolist() == expected


def test_samples_to_pcm16_leaves_its_input_alone():
    samples = np.array([0.4, 40000.0])
    samples_to_pcm16(samples)
    assert samples.tolist() == [0.4, 40000.0]


def test_random_samples_match_round_then_clip():
    samples = np.random.default_rng(10).normal(0, 30000, 10_000)
    reference = np.clip(np.rint(samples), -32768, 32767).astype("<i2").tobytes()
    assert samples_to_pcm16(samples) == reference


def test_pcm16_view_reads_little_endian_without_a_copy():
    pcm = np.array([1, -2, 32767, -32768], "<i2").tobytes()
    view = pcm16_view(pcm)
    assert view.tolist() == [1, -2, 32767, -32768]
    assert not view.flags.owndata
    assert pcm16_to_samples(pcm).tolist() == view.tolist()


def test_half_a_sample_is_refused():
    with pytest.raises(ValueError, match="even number of bytes"):
        pcm16_view(b"\x00\x01\x02")
