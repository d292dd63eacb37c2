"""20 ms μ-law framing for Twilio, and millisecond accounting for both sides of a call.

Twilio Media Streams carry 8 kHz μ-law: 8 bytes per millisecond, 160 bytes per 20 ms frame.
The model sends pcm16 at its own rate, in deltas of arbitrary size, so the outbound stream is
cut into whole frames here and the remainder waits for the next delta.
"""

from __future__ import annotations

from .g711 import ULAW_SILENCE

ULAW_SAMPLE_RATE = 8000
FRAME_MS = 20
ULAW_BYTES_PER_MS = ULAW_SAMPLE_RATE // 1000  # one byte per sample
ULAW_FRAME_BYTES = FRAME_MS * ULAW_BYTES_PER_MS  # 160
ULAW_SILENCE_FRAME = bytes([ULAW_SILENCE]) * ULAW_FRAME_BYTES


def ulaw_ms(num_bytes: int) -> float:
    """Duration of `num_bytes` of 8 kHz μ-law, in milliseconds (8 bytes = 1 ms)."""
    return num_bytes / ULAW_BYTES_PER_MS


def pcm16_ms(num_bytes: int, sample_rate: int = 24000) -> float:
    """Duration of `num_bytes` of mono pcm16 at `sample_rate`, in ms (48 bytes = 1 ms at 24k)."""
    return num_bytes * 1000 / (2 * sample_rate)


class UlawFramer:
    """Cuts a μ-law byte stream into 160-byte (20 ms) frames, carrying the remainder.

    The tail given by `flush()` at the end of a response is sent short, not padded with
    silence: Twilio plays any size, and padding would make the audio the caller hears (counted
    by marks) longer than the audio the model produced, so a truncate at the "played" position
    could point past the end of the model's item, and a transfer would wait for silence.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def buffered_bytes(self) -> int:
        """μ-law bytes waiting for a full frame (always fewer than 160)."""
        return len(self._buffer)

    def push(self, ulaw: bytes) -> list[bytes]:
        """Add μ-law bytes; return every complete 20 ms frame now available, in order."""
        if not self._buffer and len(ulaw) == ULAW_FRAME_BYTES:
            return [bytes(ulaw)]  # the usual case at 20 ms deltas: nothing to cut or carry
        self._buffer += ulaw
        whole = len(self._buffer) - len(self._buffer) % ULAW_FRAME_BYTES
        if not whole:
            return []
        data = bytes(self._buffer[:whole])
        del self._buffer[:whole]
        return [data[i : i + ULAW_FRAME_BYTES] for i in range(0, whole, ULAW_FRAME_BYTES)]

    def flush(self) -> bytes:
        """Return the remainder (shorter than a frame, possibly empty) and empty the buffer."""
        tail = bytes(self._buffer)
        self._buffer.clear()
        return tail

    def reset(self) -> None:
        """Drop the remainder (barge-in: it belongs to a reply nobody will hear)."""
        self._buffer.clear()
