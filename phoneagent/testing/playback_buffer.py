"""Twilio's outbound playback buffer (§3 of ``shared/reference/twilio-media-streams.md``), with
no I/O: audio plays at 8 bytes per ms of call time, marks come back when the audio queued before
them has played, ``clear`` drops the rest and flushes the marks.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from phoneagent.testing.twilio_messages import BYTES_PER_MS

__all__ = ["ClearRecord", "HeardChunk", "MarkEcho", "PlaybackBuffer"]


@dataclass(frozen=True)
class HeardChunk:
    """μ-law audio the caller heard, and when (call clock, ms) it started playing."""

    start_ms: float
    audio: bytes

    @property
    def end_ms(self) -> float:
        return self.start_ms + len(self.audio) / BYTES_PER_MS


@dataclass(frozen=True)
class MarkEcho:
    """A mark Twilio echoed back to the server.

    ``played_ms`` is how much audio the caller had heard in total when it was echoed;
    ``flushed`` is True when it came back because of a ``clear``, not because audio played.
    ``at`` (monotonic seconds) is filled in when the echo is actually sent.
    """

    name: str
    at_ms: float
    played_ms: float
    flushed: bool = False
    at: float = 0.0


@dataclass(frozen=True)
class ClearRecord:
    """One ``clear``: when it arrived (call clock), the audio it discarded, the marks it flushed."""

    at_ms: float
    discarded_bytes: int
    flushed_marks: tuple[str, ...]

    @property
    def discarded_ms(self) -> float:
        return self.discarded_bytes / BYTES_PER_MS


@dataclass
class _QueuedAudio:
    audio: bytes
    start_ms: float

    @property
    def due_ms(self) -> float:  # leaves the queue once it has finished playing
        return self.start_ms + len(self.audio) / BYTES_PER_MS


@dataclass
class _QueuedMark:
    name: str
    due_ms: float


class PlaybackBuffer:
    """Twilio's outbound audio queue (§3), driven by call-clock readings passed in by the caller.

    Audio is played in arrival order at 8 bytes per ms. A mark is echoed when all audio queued
    before it has played, or at once when nothing is buffered. ``clear`` drops all buffered
    audio (the part of the current chunk already played counts as heard) and then echoes every
    pending mark at once. ``instant=True`` plays audio the moment it arrives (``speed=0``).
    """

    def __init__(self, *, instant: bool = False) -> None:
        self.instant = instant
        self.heard: list[HeardChunk] = []
        self.clears: list[ClearRecord] = []
        self.dropped_at_end_bytes = 0
        self._queue: deque[_QueuedAudio | _QueuedMark] = deque()
        self._play_end_ms = 0.0  # when everything queued so far will have played
        self._heard_bytes = 0

    def add_audio(self, audio: bytes, now_ms: float) -> list[MarkEcho]:
        """Queue audio; return the marks that became due meanwhile."""
        echoes = self.advance(now_ms)
        start = max(now_ms, self._play_end_ms)
        self._queue.append(_QueuedAudio(audio, start))
        self._play_end_ms = start + len(audio) / BYTES_PER_MS
        return echoes + self._advance_if_instant(now_ms)

    def add_mark(self, name: str, now_ms: float) -> list[MarkEcho]:
        """Queue a mark behind the buffered audio; echo it at once if nothing is buffered."""
        echoes = self.advance(now_ms)
        if not self._queue:
            return [*echoes, MarkEcho(name, now_ms, self.heard_ms(now_ms))]
        self._queue.append(_QueuedMark(name, self._play_end_ms))
        return echoes

    def advance(self, now_ms: float) -> list[MarkEcho]:
        """Play everything due by ``now_ms``; return the marks reached, in order."""
        echoes = []
        while self._queue and (self.instant or self._queue[0].due_ms <= now_ms):
            item = self._queue.popleft()
            if isinstance(item, _QueuedAudio):
                self._hear(item.start_ms, item.audio)
            else:
                at = now_ms if self.instant else item.due_ms
                echoes.append(MarkEcho(item.name, at, self._heard_bytes / BYTES_PER_MS))
        return echoes

    def clear(self, now_ms: float) -> list[MarkEcho]:
        """Apply a ``clear``: drop buffered audio, then flush all pending marks (§3)."""
        echoes = self.advance(now_ms)
        discarded = 0
        flushed: list[str] = []
        for item in self._queue:
            if isinstance(item, _QueuedMark):
                flushed.append(item.name)
                continue
            played = self._played_part(item, now_ms)
            if played:
                self._hear(item.start_ms, item.audio[:played])
            discarded += len(item.audio) - played
        self._queue.clear()
        self._play_end_ms = min(self._play_end_ms, now_ms)
        self.clears.append(ClearRecord(now_ms, discarded, tuple(flushed)))
        heard = self.heard_ms(now_ms)
        return echoes + [MarkEcho(name, now_ms, heard, flushed=True) for name in flushed]

    def stop(self, now_ms: float) -> None:
        """The stream ended: what was playing is heard up to now, the rest is never played."""
        self.advance(now_ms)
        for item in self._queue:
            if isinstance(item, _QueuedAudio):
                played = self._played_part(item, now_ms)
                if played:
                    self._hear(item.start_ms, item.audio[:played])
                self.dropped_at_end_bytes += len(item.audio) - played
        self._queue.clear()

    def heard_ms(self, now_ms: float) -> float:
        """Milliseconds of audio heard so far, including the part of the chunk now playing."""
        return (self._heard_bytes + self._partial_bytes(now_ms)) / BYTES_PER_MS

    def heard_chunks(self, now_ms: float) -> list[HeardChunk]:
        """:attr:`heard`, plus the part of the chunk now playing."""
        front = self._queue[0] if self._queue else None
        partial = self._played_part(front, now_ms) if isinstance(front, _QueuedAudio) else 0
        if not partial:
            return list(self.heard)
        return [*self.heard, HeardChunk(front.start_ms, front.audio[:partial])]

    def heard_audio(self, now_ms: float) -> bytes:
        """All μ-law audio heard so far, including the part of the chunk now playing."""
        return b"".join(chunk.audio for chunk in self.heard_chunks(now_ms))

    def buffered_ms(self, now_ms: float) -> float:
        """Audio still to play, in ms."""
        return 0.0 if self.instant else max(0.0, self._play_end_ms - now_ms)

    def next_due_ms(self) -> float | None:
        """Call-clock time at which the next queued item finishes, or None if nothing queued."""
        return self._queue[0].due_ms if self._queue else None

    @property
    def pending_marks(self) -> list[str]:
        return [item.name for item in self._queue if isinstance(item, _QueuedMark)]

    def _advance_if_instant(self, now_ms: float) -> list[MarkEcho]:
        return self.advance(now_ms) if self.instant else []

    def _hear(self, start_ms: float, audio: bytes) -> None:
        self.heard.append(HeardChunk(start_ms, audio))
        self._heard_bytes += len(audio)

    def _played_part(self, item: _QueuedAudio, now_ms: float) -> int:
        played = math.floor((now_ms - item.start_ms) * BYTES_PER_MS)
        return min(len(item.audio), max(0, played))

    def _partial_bytes(self, now_ms: float) -> int:
        front = self._queue[0] if self._queue else None
        return self._played_part(front, now_ms) if isinstance(front, _QueuedAudio) else 0
