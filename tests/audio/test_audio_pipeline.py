"""The two per-call pipelines: CallerToModel and ModelToCaller."""

from __future__ import annotations

import numpy as np
import pytest

from phoneagent.audio import (
    ULAW_FRAME_BYTES,
    ULAW_SILENCE_FRAME,
    CallerToModel,
    ModelToCaller,
    pcm16_ms,
    ulaw_ms,
)


def noise_pcm16(rng: np.random.Generator, samples: int) -> bytes:
    return rng.normal(0, 4000, samples).astype("<i2").tobytes()


@pytest.mark.parametrize("model_rate", [24000, 16000])
def test_caller_frame_gives_exactly_20ms_of_model_audio_from_the_first(model_rate):
    inbound = CallerToModel(model_rate)
    rng = np.random.default_rng(7)
    for _ in range(200):
        out = inbound.process(rng.integers(0, 256, 160, dtype=np.uint8).tobytes())
        assert pcm16_ms(len(out), model_rate) == 20


def test_caller_silence_becomes_exact_digital_silence():
    inbound = CallerToModel()
    for _ in range(10):
        assert inbound.process(ULAW_SILENCE_FRAME) == bytes(960)


@pytest.mark.parametrize("model_rate", [24000, 16000])
def test_model_20ms_delta_gives_exactly_one_frame_from_the_first(model_rate):
    outbound = ModelToCaller(model_rate)
    rng = np.random.default_rng(8)
    for _ in range(200):
        frames = outbound.process(noise_pcm16(rng, model_rate // 50))
        assert [len(frame) for frame in frames] == [ULAW_FRAME_BYTES]


def test_model_deltas_of_any_size_give_whole_frames_and_lose_no_time():
    outbound = ModelToCaller()
    rng = np.random.default_rng(9)
    audio = noise_pcm16(rng, 24000 * 5)
    frames, position = [], 0
    while position < len(audio):
        size = int(rng.choice([0, 1, 3, 47, 48, 959, 960, 961, 4800, rng.integers(20_000)]))
        frames += outbound.process(audio[position : position + size])
        position += size
    assert all(len(frame) == ULAW_FRAME_BYTES for frame in frames)
    frames += outbound.flush()
    # Everything the model sent comes out, plus the filter delay drained by flush().
    heard_ms = ulaw_ms(sum(len(frame) for frame in frames))
    assert heard_ms == pcm16_ms(len(audio)) + outbound.delay_s * 1000
    assert len(frames[-1]) < ULAW_FRAME_BYTES  # the tail is sent short


def test_odd_byte_waits_for_its_other_half():
    rng = np.random.default_rng(10)
    audio = noise_pcm16(rng, 4800)
    whole = ModelToCaller().process(audio)
    split = ModelToCaller()
    frames = split.process(audio[:1001]) + split.process(audio[1001:])
    assert frames == whole


def test_flush_ends_the_reply_and_the_next_one_starts_clean():
    rng = np.random.default_rng(11)
    reply, next_reply = noise_pcm16(rng, 7000), noise_pcm16(rng, 4800)
    outbound = ModelToCaller()
    outbound.process(reply)
    outbound.flush()
    assert outbound.flush() == []
    assert outbound.process(next_reply) == ModelToCaller().process(next_reply)


def test_reset_on_barge_in_drops_the_interrupted_reply():
    rng = np.random.default_rng(12)
    outbound = ModelToCaller()
    outbound.process(noise_pcm16(rng, 24000 + 7) + b"\x01")  # partial frame, odd byte
    outbound.reset()
    # Nothing of the old reply: silence in, exact μ-law silence out, one frame per 20 ms.
    assert outbound.process(bytes(960 * 10)) == [ULAW_SILENCE_FRAME] * 10
    assert outbound.flush() == [ULAW_SILENCE_FRAME[:26]]
