"""20 ms μ-law framing and millisecond accounting."""

from __future__ import annotations

import numpy as np

from phoneagent.audio import (
    ULAW_FRAME_BYTES,
    ULAW_SILENCE_FRAME,
    UlawFramer,
    pcm16_ms,
    ulaw_ms,
    ulaw_to_pcm16,
)


def test_millisecond_accounting():
    assert ULAW_FRAME_BYTES == 160
    assert ulaw_ms(8) == 1
    assert ulaw_ms(160) == 20
    assert pcm16_ms(48) == 1
    assert pcm16_ms(960) == 20
    assert pcm16_ms(32, sample_rate=16000) == 1


def test_silence_frame_is_20ms_of_zeros():
    assert ulaw_ms(len(ULAW_SILENCE_FRAME)) == 20
    assert ulaw_to_pcm16(ULAW_SILENCE_FRAME) == bytes(320)


def test_frames_are_whole_and_nothing_is_lost_or_reordered():
    rng = np.random.default_rng(6)
    stream = rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    framer = UlawFramer()
    frames, position = [], 0
    while position < len(stream):
        size = int(rng.choice([0, 1, 159, 160, 161, 480, 1000, 4800, rng.integers(2000)]))
        frames += framer.push(stream[position : position + size])
        position += size
        assert framer.buffered_bytes < ULAW_FRAME_BYTES
    tail = framer.flush()
    assert all(len(frame) == ULAW_FRAME_BYTES for frame in frames)
    assert len(tail) == len(stream) % ULAW_FRAME_BYTES  # sent short, not padded
    assert b"".join(frames) + tail == stream


def test_remainder_waits_for_the_next_push():
    framer = UlawFramer()
    assert framer.push(b"a" * 100) == []
    assert framer.push(b"b" * 100) == [b"a" * 100 + b"b" * 60]
    assert framer.buffered_bytes == 40
    assert framer.flush() == b"b" * 40
    assert framer.flush() == b""


def test_reset_drops_the_remainder():
    framer = UlawFramer()
    framer.push(b"x" * 100)
    framer.reset()
    assert framer.buffered_bytes == 0
    assert framer.push(b"y" * 160) == [b"y" * 160]


def test_a_whole_frame_after_a_remainder_is_not_taken_as_a_frame_of_its_own():
    """The fast path (a 160-byte push on an empty buffer) must not skip a carried remainder."""
    framer = UlawFramer()
    assert framer.push(bytes([1]) * 100) == []
    frames = framer.push(bytes([2]) * ULAW_FRAME_BYTES)
    assert frames == [bytes([1]) * 100 + bytes([2]) * 60]
    assert framer.push(bytes([3]) * ULAW_FRAME_BYTES) == [bytes([2]) * 100 + bytes([3]) * 60]
    framer.reset()
    assert framer.push(bytes([4]) * ULAW_FRAME_BYTES) == [bytes([4]) * ULAW_FRAME_BYTES]
