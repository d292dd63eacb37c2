"""Playback: agent audio framed into Twilio messages and marks, and what the caller has heard.
No I/O; the ``Call`` feeds it the model's audio and Twilio's mark echoes.

Twilio plays what it is sent in order and echoes each mark once the audio before it has played,
so the marks still out say how much the caller has *not* heard yet. A barge-in ``clear``s
Twilio's buffer: every mark still out is written off (Twilio echoes them at once, unplayed).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from phoneagent.audio import ULAW_BYTES_PER_MS, ModelToCaller
from phoneagent.call.actions import Action, SendMark, SendMedia
from phoneagent.call.machine import Machine, Unexpected
from phoneagent.call.transcript import Turn

# Agent audio goes to Twilio in messages of up to this many 20 ms frames (whatever one model
# delta made, up to 200 ms).
FRAMES_PER_MESSAGE = 10
# A mark follows an item's first message, then the first message that ends this much audio or
# more after the last mark, then the item's last message. Between echoes the heard position
# runs on with the clock (Twilio plays at real time), so marks only re-anchor it; a mark per
# message would cost as many messages again as the model's deltas, each echoed by Twilio.
MARK_EVERY_MS = 200


@dataclass
class AgentItem:
    """Playback accounting for one assistant item: what was sent to Twilio, what was heard."""

    item_id: str
    response_id: str
    turn: Turn
    sent_bytes: int = 0  # μ-law: 8 bytes per ms
    marked_bytes: int = 0  # sent_bytes at its last mark
    played_ms: int = 0

    @property
    def sent_ms(self) -> int:
        return self.sent_bytes // ULAW_BYTES_PER_MS


@dataclass
class BargeInCandidate:
    """The model heard the caller start speaking over the agent; is it a real interruption?"""

    caller_item_id: str
    loud_ms: int = 0  # caller audio above the persona's energy threshold since then


@dataclass
class CallStats:
    """What a call measured, in milliseconds (the unit of the call record)."""

    first_audio_ms: int | None = None  # since the call started: first agent frame sent
    barge_ins: int = 0
    barge_ins_ignored: int = 0  # short speech under the persona's guard: the agent went on
    barge_in_reaction_ms: list[float] = field(default_factory=list)  # event in → `clear` sent
    discarded_ms: int = 0  # agent audio sent or generated but never heard
    # The persona's own tools called: {tool, outcome, duration_ms} each; never the arguments
    # or the answer (they are the caller's and the business's data).
    tool_calls: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        tools = {"tool_calls": list(self.tool_calls)} if self.tool_calls else {}
        return {
            "first_agent_audio_ms": self.first_audio_ms,
            "barge_ins": self.barge_ins,
            "barge_ins_ignored": self.barge_ins_ignored,
            "barge_in_reaction_ms": [round(ms, 3) for ms in self.barge_in_reaction_ms],
            "discarded_agent_ms": self.discarded_ms,
        } | tools


class PlaybackState(enum.Enum):
    IDLE = "idle"  # every mark sent has come back (or was written off): nothing left to hear
    PLAYING = "playing"  # marks are out: Twilio is playing agent audio the caller has not heard


class Playback(Machine[PlaybackState]):
    TRANSITIONS: ClassVar[dict] = {
        (PlaybackState.IDLE, "sent"): PlaybackState.PLAYING,
        (PlaybackState.PLAYING, "sent"): PlaybackState.PLAYING,
        (PlaybackState.PLAYING, "echo"): PlaybackState.PLAYING,  # later marks are still out
        (PlaybackState.PLAYING, "last_echo"): PlaybackState.IDLE,
        (PlaybackState.PLAYING, "clear"): PlaybackState.IDLE,  # barge-in: the rest is unheard
        (PlaybackState.IDLE, "clear"): PlaybackState.IDLE,  # an item was being framed, not sent
    }

    def __init__(
        self, clock: Callable[[], float], unexpected: Unexpected, model_rate: int = 24000
    ) -> None:
        super().__init__(PlaybackState.IDLE, unexpected)
        self._clock = clock
        self.items: dict[str, AgentItem] = {}
        # Marks sent and not yet echoed, oldest first: name → (item, its ms at the mark, when
        # the first message since the mark before it was sent).
        self._marks: OrderedDict[str, tuple[AgentItem, int, float]] = OrderedDict()
        # When the first message after the last mark was sent (None: no message is unmarked).
        self._unmarked_since: float | None = None
        self._last_echo_at: float | None = None
        self.current: AgentItem | None = None  # the item whose audio is being framed
        self.clears = 0  # barge-ins so far: frames made before the last one are written off
        self._to_caller = ModelToCaller(model_rate)

    @property
    def playing(self) -> bool:
        return self.state is PlaybackState.PLAYING

    @property
    def sounding(self) -> bool:
        """Twilio may still be playing agent audio: marks are out, or frames sent since the
        last mark have not played out yet by the clock (they are marked with later frames or
        at the item's end, which a slow or stuck model may not reach soon)."""
        if self.playing:
            return True
        item = self.current
        if item is None or self._unmarked_since is None:
            return False
        return self.heard_now().get(item.item_id, item.sent_ms) < item.sent_ms

    def plays(self, response_id: str | None) -> bool:
        """Twilio still has audio of this response to play."""
        return any(item.response_id == response_id for item, _, _ in self._marks.values())

    def audio(self, item: AgentItem, pcm: bytes) -> list[Action]:
        if self.current is not item:
            # A new item starts: whatever the previous one left in the framer belongs to it.
            actions = self.flush(send=True)
            self.current = item
        else:
            actions = []
        return actions + self._frames_to_twilio(item, self._to_caller.process(pcm))

    def flush(self, send: bool) -> list[Action]:
        """The current item is complete: frame what the resampler still holds (and drop it if
        the call is being handed on: the agent has had its last word)."""
        item, self.current = self.current, None
        if item is None:
            return []
        frames = self._to_caller.flush()
        actions = self._frames_to_twilio(item, frames) if send else []
        if item.sent_bytes > item.marked_bytes:  # the item's last mark: when it was all heard
            actions.append(self._mark(item))
            self._fire("sent")
        return actions

    def _frames_to_twilio(self, item: AgentItem, frames: list[bytes]) -> list[Action]:
        """The frames a model delta made, as few `media` messages as the chunk limit allows,
        a mark after some (``MARK_EVERY_MS``). Messages, not transcoding, are most of the
        server's work (bench/load.py), and Twilio plays any size; how much was heard runs on
        in real time from each mark echo (``heard_now``)."""
        actions: list[Action] = []
        marked = False
        for start in range(0, len(frames), FRAMES_PER_MESSAGE):
            chunk = b"".join(frames[start : start + FRAMES_PER_MESSAGE])
            item.sent_bytes += len(chunk)
            actions.append(SendMedia(chunk))
            if self._unmarked_since is None:
                self._unmarked_since = self._clock()
            unmarked_ms = (item.sent_bytes - item.marked_bytes) // ULAW_BYTES_PER_MS
            if item.marked_bytes == 0 or unmarked_ms >= MARK_EVERY_MS:
                actions.append(self._mark(item))
                marked = True
        if marked:
            self._fire("sent")
        return actions

    def _mark(self, item: AgentItem) -> SendMark:
        """A mark after everything sent so far. Its name is unique (every message adds bytes;
        a short tail may add no whole ms), and says whose audio it follows: Twilio echoes every
        pending mark after `clear`, and those echoes must not count as played."""
        name = f"{item.item_id}:{item.sent_bytes}"
        since = self._unmarked_since if self._unmarked_since is not None else self._clock()
        self._marks[name] = (item, item.sent_ms, since)
        self._unmarked_since = None
        item.marked_bytes = item.sent_bytes
        return SendMark(name)

    def echo(self, name: str) -> AgentItem | None:
        """Twilio played up to mark *name*: the item it ends, or None for an echo of a mark
        written off by `clear` (it proves nothing was played, and is expected after one)."""
        if name not in self._marks:
            return None
        # Twilio plays in order, so every mark sent before this one has played too.
        while self._marks:
            done, (item, played_ms, _) = self._marks.popitem(last=False)
            item.played_ms = played_ms
            if done == name:
                break
        self._last_echo_at = self._clock()
        self._fire("echo" if self._marks else "last_echo")
        return item

    def heard_now(self) -> dict[str, int]:
        """How much of the item now playing the caller has heard at this instant.

        A mark echo says the audio before it finished playing; Twilio plays on at real time, so
        the caller is ``now - echo`` further in (or, if the line was idle, ``now - sent``).
        Network transit of the echo and of our `clear` is not known, so this errs on the side
        of "heard less". Capped at what was sent.
        """
        if self._marks:
            item, _, first_sent_at = next(iter(self._marks.values()))
        elif self._unmarked_since is not None and self.current is not None:
            item, first_sent_at = self.current, self._unmarked_since  # its next mark is to come
        else:
            return {}
        playing_since = max(self._last_echo_at or first_sent_at, first_sent_at)
        elapsed_ms = max(0, round((self._clock() - playing_since) * 1000))
        return {item.item_id: min(item.sent_ms, item.played_ms + elapsed_ms)}

    def clear(self) -> list[tuple[AgentItem, int]]:
        """Barge-in: stop playback. The items cut, each with how much of it the caller heard."""
        heard_now = self.heard_now()
        cut = {item.item_id: item for item, _, _ in self._marks.values()}
        if self.current is not None:
            cut[self.current.item_id] = self.current
        self._marks.clear()  # their echoes, sent at once after `clear`, are not played
        self._unmarked_since = None
        self.current = None
        self._to_caller.reset()  # the cut reply's filter state must not leak into the next
        self.clears += 1
        self._fire("clear")
        return [
            (item, heard_now.get(item.item_id, min(item.played_ms, item.sent_ms)))
            for item in cut.values()
        ]
