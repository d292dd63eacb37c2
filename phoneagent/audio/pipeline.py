"""The two audio directions of a call, each one object with its own state.

Every call needs exactly these: caller → model (decode μ-law, 8 → 24 kHz) and model → caller
(24 → 8 kHz, encode μ-law, cut 20 ms frames). Create one of each per call.
"""

from __future__ import annotations

import numpy as np

from .framing import ULAW_SAMPLE_RATE, UlawFramer
from .g711 import pcm16_to_ulaw, ulaw_to_pcm16
from .overshoot import ClipGuard
from .pcm import pcm16_view, samples_to_pcm16
from .resample import Resampler


class CallerToModel:
    """Twilio → model: 8 kHz μ-law bytes → pcm16 little-endian at `model_rate`.

    Every μ-law byte gives exactly model_rate / 8000 samples, immediately (a 160-byte frame
    gives 960 bytes at 24 kHz, the first frame included); the filter delays the sound by
    `delay_s` (3.25 ms).
    """

    def __init__(self, model_rate: int = 24000) -> None:
        self._resampler = Resampler(ULAW_SAMPLE_RATE, model_rate)
        self._clip_guard = ClipGuard(self._resampler.design)

    @property
    def delay_s(self) -> float:
        return self._resampler.delay_s

    def process(self, ulaw: bytes) -> bytes:
        """Convert the next chunk of caller audio."""
        if not ulaw:
            return b""
        pcm = ulaw_to_pcm16(ulaw)
        clip = self._clip_guard.may_clip(pcm)
        # int16 straight into the resampler, which converts it as it copies it in.
        return samples_to_pcm16(self._resampler.process(pcm16_view(pcm)), clip=clip)

    def reset(self) -> None:
        """Forget past audio (for a new stream on the same object)."""
        self._resampler.reset()
        self._clip_guard.reset()


class ModelToCaller:
    """Model → Twilio: pcm16 little-endian at `model_rate` → 160-byte (20 ms) μ-law frames.

    Deltas may have any size (an odd trailing byte waits for the next delta). Frames come out
    as soon as they are complete. At the end of a response call `flush()` for the rest; on
    barge-in call `reset()`, which drops everything still held so nothing of the interrupted
    reply reaches the caller or leaks into the next reply.
    """

    def __init__(self, model_rate: int = 24000) -> None:
        self._resampler = Resampler(model_rate, ULAW_SAMPLE_RATE)
        self._clip_guard = ClipGuard(self._resampler.design)
        self._framer = UlawFramer()
        self._odd_byte = b""

    @property
    def delay_s(self) -> float:
        return self._resampler.delay_s

    def process(self, pcm: bytes) -> list[bytes]:
        """Convert the next delta of model audio; return the complete frames it yields."""
        if self._odd_byte:
            pcm = self._odd_byte + pcm
            self._odd_byte = b""
        if len(pcm) % 2:
            pcm, self._odd_byte = pcm[:-1], pcm[-1:]
        if not pcm:
            return []
        clip = self._clip_guard.may_clip(pcm)
        return self._frame(self._resampler.process(pcm16_view(pcm)), clip)

    def flush(self) -> list[bytes]:
        """End of a response: the remaining audio, as full frames then one short frame.

        Drains the filter's delay (3.25 ms) so the end of the reply is heard, then starts the
        next reply from a clean state. A dangling odd byte (half a sample) is dropped.
        """
        self._odd_byte = b""
        frames = self._frame(self._resampler.flush(), self._clip_guard.may_clip(b""))
        self._clip_guard.reset()  # as the resampler's flush resets it
        tail = self._framer.flush()
        return [*frames, tail] if tail else frames

    def reset(self) -> None:
        """Barge-in: drop buffered audio and filter history of the interrupted reply."""
        self._resampler.reset()
        self._clip_guard.reset()
        self._framer.reset()
        self._odd_byte = b""

    def _frame(self, samples: np.ndarray, clip: bool) -> list[bytes]:
        return self._framer.push(pcm16_to_ulaw(samples_to_pcm16(samples, clip=clip)))
