"""G.711 μ-law codec: known values, round trips, byte order."""

from __future__ import annotations

import numpy as np
import pytest

from phoneagent.audio import ULAW_SILENCE, pcm16_to_ulaw, ulaw_to_pcm16

ALL_CODES = bytes(range(256))


def pcm(*values: int) -> bytes:
    return np.array(values, dtype="<i2").tobytes()


def samples(data: bytes) -> list[int]:
    return np.frombuffer(data, "<i2").tolist()


def test_silence_is_0xff_both_ways():
    assert ULAW_SILENCE == 0xFF
    assert pcm16_to_ulaw(pcm(0, 0, 0)) == b"\xff\xff\xff"
    assert ulaw_to_pcm16(b"\xff" * 160) == bytes(320)


def test_full_scale_values():
    assert pcm16_to_ulaw(pcm(32767, -32768)) == b"\x80\x00"
    # The largest μ-law magnitude is 32124 (G.711's 8159 on the 14-bit scale, times 4).
    assert samples(ulaw_to_pcm16(b"\x80\x00")) == [32124, -32124]


def test_known_codes():
    # 0x7F is the "negative zero" code; 0xFE and 0x7E are the smallest nonzero steps (±8).
    assert samples(ulaw_to_pcm16(b"\x7f\xfe\x7e")) == [0, 8, -8]


def test_decoding_is_odd_symmetric_and_monotonic():
    decoded = np.array(samples(ulaw_to_pcm16(ALL_CODES)))
    positive, negative = decoded[0x80:], decoded[:0x80]
    np.testing.assert_array_equal(negative, -positive)
    assert (np.diff(positive) < 0).all()  # 0x80 loudest, 0xFF silence


def test_every_code_survives_a_round_trip():
    expected = bytearray(ALL_CODES)
    expected[0x7F] = 0xFF  # negative zero comes back as the one zero encoders emit
    assert pcm16_to_ulaw(ulaw_to_pcm16(ALL_CODES)) == bytes(expected)


def test_quantisation_error_is_within_one_step():
    values = np.arange(-32768, 32768)
    decoded = np.frombuffer(ulaw_to_pcm16(pcm16_to_ulaw(values.astype("<i2").tobytes())), "<i2")
    error = np.abs(decoded - values)
    # μ-law has 16 steps per doubling of the magnitude, so one step is at most 1/16 of the
    # magnitude (and 16 near zero); the values above the largest code (32124) are clipped.
    in_range = np.abs(values) <= 32124
    assert (error[in_range] <= np.maximum(np.abs(values[in_range]) / 16, 16)).all()


def test_wire_format_is_little_endian():
    assert pcm16_to_ulaw(b"\x00\x10") == pcm16_to_ulaw(pcm(4096))
    assert ulaw_to_pcm16(pcm16_to_ulaw(pcm(4096)))[1] > 0  # high byte last


def test_half_a_sample_is_refused():
    with pytest.raises(ValueError, match="even number of bytes"):
        pcm16_to_ulaw(b"\x00\x00\x00")
