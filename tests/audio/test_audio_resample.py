"""The streaming resampler against the budgets in DESIGN.md, with generated tones."""

from __future__ import annotations

import math

import numpy as np
import pytest
from audio_signals import db, fit_tone, rms, split_points, stream, tone

from phoneagent.audio import Resampler, design_filter

# Budgets from DESIGN.md.
MIN_REJECTION_DB = 80.0
PASSBAND_TOLERANCE_DB = 0.1
MAX_DELAY_MS = 5.0

UP = [(8000, 24000), (8000, 16000)]
DOWN = [(24000, 8000), (16000, 8000)]
ALL = UP + DOWN


def frame_samples(rate: int) -> int:
    return rate // 50  # 20 ms


def settled(resampler: Resampler) -> int:
    """Output samples to skip so the all-zero start history has left the filter."""
    return 2 * len(resampler.design.taps)


@pytest.mark.parametrize(("from_rate", "to_rate"), ALL)
def test_every_20ms_frame_gives_exactly_20ms_from_the_first_one(from_rate, to_rate):
    resampler = Resampler(from_rate, to_rate)
    rng = np.random.default_rng(1)
    for _ in range(500):
        out = resampler.process(rng.normal(0, 3000, frame_samples(from_rate)))
        assert len(out) == frame_samples(to_rate)


@pytest.mark.parametrize(("from_rate", "to_rate"), ALL)
def test_output_count_never_drifts_with_arbitrary_chunks(from_rate, to_rate):
    resampler = Resampler(from_rate, to_rate)
    rng = np.random.default_rng(2)
    total_in = total_out = 0
    for _ in range(3000):
        n = int(rng.integers(0, 1000))
        total_out += len(resampler.process(np.ones(n)))
        total_in += n
        # Upsampling: every input sample yields its outputs at once. Downsampling: output k
        # comes out with input sample k * factor, so ceil(inputs / factor) have come out.
        assert total_out == math.ceil(total_in * to_rate / from_rate)


@pytest.mark.parametrize(("from_rate", "to_rate"), ALL)
def test_splitting_the_input_does_not_change_the_output(from_rate, to_rate):
    """No clicks or gaps at chunk boundaries: any split gives the one-piece result."""
    rng = np.random.default_rng(3)
    signal = tone(1234.5, from_rate, 1.0, 20000) + rng.normal(0, 1000, from_rate)
    whole = Resampler(from_rate, to_rate).process(signal)
    for seed in range(5):
        cuts = split_points(len(signal), np.random.default_rng(seed))
        resampler = Resampler(from_rate, to_rate)
        pieces = np.concatenate([resampler.process(c) for c in np.split(signal, cuts)])
        np.testing.assert_allclose(pieces, whole, rtol=0, atol=1e-7)


@pytest.mark.parametrize(("from_rate", "to_rate"), DOWN)
def test_aliases_are_rejected(from_rate, to_rate):
    """Tones from 4.4 kHz to the Nyquist frequency of the high rate must not fold into the
    8 kHz output (audioop.ratecv passes them at full level)."""
    freqs = [*np.arange(4400, from_rate / 2, 100), 8000, from_rate / 2]
    for freq in freqs:
        signal = tone(freq, from_rate, 0.3)
        resampler = Resampler(from_rate, to_rate)
        out = stream(resampler, signal, frame_samples(from_rate))[settled(resampler) :]
        rejection = -db(rms(out) / rms(signal))
        assert rejection >= MIN_REJECTION_DB, f"{freq} Hz: only {rejection:.1f} dB"


@pytest.mark.parametrize(("from_rate", "to_rate"), UP)
def test_images_are_rejected(from_rate, to_rate):
    """Upsampling a tone f must add nothing else: its images (8000 ± f, ...) lie in
    4.4 kHz – Nyquist for every f up to 3.6 kHz."""
    for freq in range(100, 3601, 100):
        resampler = Resampler(from_rate, to_rate)
        out = stream(resampler, tone(freq, from_rate, 0.3), frame_samples(from_rate))
        amplitude, _, residual = fit_tone(out, freq, to_rate, settled(resampler))
        rejection = -db(residual / (amplitude / math.sqrt(2)))
        assert rejection >= MIN_REJECTION_DB, f"{freq} Hz: only {rejection:.1f} dB"


@pytest.mark.parametrize(("from_rate", "to_rate"), ALL)
def test_passband_300_to_3400_hz_is_flat(from_rate, to_rate):
    for freq in range(300, 3401, 50):
        resampler = Resampler(from_rate, to_rate)
        out = stream(resampler, tone(freq, from_rate, 0.2), frame_samples(from_rate))
        amplitude, _, _ = fit_tone(out, freq, to_rate, settled(resampler))
        assert abs(db(amplitude)) <= PASSBAND_TOLERANCE_DB, f"{freq} Hz: {db(amplitude):+.4f} dB"


@pytest.mark.parametrize(("from_rate", "to_rate"), ALL)
def test_delay_is_as_documented_and_within_budget(from_rate, to_rate):
    resampler = Resampler(from_rate, to_rate)
    assert resampler.delay_s * 1000 <= MAX_DELAY_MS
    assert resampler.delay_input_samples == round(resampler.delay_s * from_rate)
    # A linear-phase filter delays every frequency alike; 10 ms periods make the phase
    # unambiguous for any delay under the budget.
    for freq in (100, 150, 1000 / 3, 3000 + 1 / 3):
        resampler = Resampler(from_rate, to_rate)
        out = stream(resampler, tone(freq, from_rate, 0.3), frame_samples(from_rate))
        _, phase, _ = fit_tone(out, freq, to_rate, settled(resampler))
        period_ms = 1000 / freq
        delay_ms = (-phase / (2 * math.pi) * period_ms) % period_ms
        if freq > 200:  # short periods: take the multiple of the period nearest the claim
            delay_ms += round((resampler.delay_s * 1000 - delay_ms) / period_ms) * period_ms
        assert delay_ms == pytest.approx(resampler.delay_s * 1000, abs=1e-4), f"{freq} Hz"


def test_delay_is_a_whole_number_of_8khz_samples():
    for from_rate, to_rate in ALL:
        assert Resampler(from_rate, to_rate).delay_s * 8000 == pytest.approx(26)


@pytest.mark.parametrize(("from_rate", "to_rate"), ALL)
def test_reset_forgets_everything(from_rate, to_rate):
    rng = np.random.default_rng(4)
    after = rng.normal(0, 3000, 1001)
    fresh = Resampler(from_rate, to_rate).process(after)

    resampler = Resampler(from_rate, to_rate)
    resampler.process(rng.normal(0, 30000, 1000))  # a loud reply, interrupted mid-group
    resampler.process(np.full(1, 32767.0))
    resampler.reset()
    np.testing.assert_array_equal(resampler.process(after), fresh)

    resampler.process(rng.normal(0, 30000, 1000))
    resampler.reset()
    assert not resampler.process(np.zeros(500)).any(), "the old reply rang on after reset()"


@pytest.mark.parametrize(("from_rate", "to_rate"), ALL)
def test_flush_drains_the_delay_then_starts_clean(from_rate, to_rate):
    rng = np.random.default_rng(5)
    signal = rng.normal(0, 3000, 1000)
    resampler = Resampler(from_rate, to_rate)
    emitted = len(resampler.process(signal))
    tail = resampler.flush()
    assert len(tail) == round(resampler.delay_s * to_rate)
    # The tail is what the stream would have given next had it gone on in silence.
    padded = np.concatenate((signal, np.zeros(resampler.delay_input_samples)))
    np.testing.assert_allclose(
        tail, Resampler(from_rate, to_rate).process(padded)[emitted:], rtol=0, atol=1e-7
    )
    after = rng.normal(0, 3000, 999)
    fresh = Resampler(from_rate, to_rate).process(after)
    np.testing.assert_array_equal(resampler.process(after), fresh)


@pytest.mark.parametrize(
    ("from_rate", "to_rate"), [(8000, 11025), (8000, 8000), (24000, 9000), (0, 8000)]
)
def test_unsupported_rates_are_refused(from_rate, to_rate):
    with pytest.raises(ValueError, match="unsupported rate pair"):
        Resampler(from_rate, to_rate)


def test_filter_designs_are_computed_once_per_rate_pair():
    assert design_filter(8000, 24000) is design_filter(8000, 24000)
    assert Resampler(24000, 8000).design is Resampler(24000, 8000).design


@pytest.mark.parametrize(("from_rate", "to_rate"), ALL)
def test_int16_input_gives_the_float_result(from_rate, to_rate):
    """The pipelines hand pcm16 straight in as int16; the resampler converts as it copies."""
    rng = np.random.default_rng(7)
    pcm = rng.integers(-32768, 32768, 3 * from_rate // 50 + 1).astype("<i2")
    as_int, as_float = Resampler(from_rate, to_rate), Resampler(from_rate, to_rate)
    for chunk in np.split(pcm, [1, from_rate // 50, 2 * from_rate // 50]):
        np.testing.assert_array_equal(as_int.process(chunk), as_float.process(chunk.astype(float)))


@pytest.mark.parametrize(("from_rate", "to_rate"), ALL)
def test_outputs_are_not_reused_by_the_next_call(from_rate, to_rate):
    """The resampler keeps one buffer for its input; what it returns must stay the caller's."""
    rng = np.random.default_rng(8)
    resampler = Resampler(from_rate, to_rate)
    first = resampler.process(rng.normal(0, 3000, frame_samples(from_rate)))
    kept = first.copy()
    resampler.process(rng.normal(0, 3000, frame_samples(from_rate)))
    np.testing.assert_array_equal(first, kept)


@pytest.mark.parametrize(("from_rate", "to_rate"), ALL)
def test_a_long_chunk_gives_the_frame_by_frame_result(from_rate, to_rate):
    """A model delta of several seconds is processed in slices; nothing changes at their
    edges, and the resampler's buffer stays one slice long."""
    rng = np.random.default_rng(9)
    signal = rng.normal(0, 3000, 5 * from_rate + 7)
    whole = Resampler(from_rate, to_rate)
    out = whole.process(signal)
    framed = stream(Resampler(from_rate, to_rate), signal, frame_samples(from_rate))
    np.testing.assert_allclose(out, framed, rtol=0, atol=1e-7)
    assert whole._buffer.nbytes < 64_000
