"""Twilio requests that must act once: a stream token opens one stream, and a webhook that
starts something (a stream token, a model pre-warm) starts it once per call.

Twilio's signature has no timestamp, so a captured request stays valid for ever: anyone who saw
one could replay it to open model sessions at the business's expense. :class:`ReplayGuard` is
where both records live: :class:`MemoryReplayGuard` in this instance's memory (bounded, and a
token is only remembered until it expires anyway), the default without a database;
``pg_replay.PostgresReplayGuard`` in the database every instance shares
(``PHONEAGENT_DATABASE_URL``), so a token opens one stream across all instances and a webhook
replayed to another instance gets the first answer.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

REMEMBERED = 1000  # answers kept; calls older than that are long over


class ReplayGuard(Protocol):
    """The records of requests that must act once, behind one small async interface."""

    async def claim_stream(
        self, token: str, expires_at: float, *, shared_only: bool = False
    ) -> bool:
        """True the first time ``token`` is claimed (on any instance sharing the guard); False
        ever after, until it expires (when the token itself is refused). A shared guard whose
        store is away claims in this instance's memory (a stream is served); with
        ``shared_only`` it claims nothing then and says False (for a claim that may fail
        closed: another instance may hold the token)."""
        ...

    async def answer_for(self, key: str) -> str | None:
        """The TwiML a side-effecting webhook got, by a key naming the request; None if new."""
        ...

    async def remember(self, key: str, twiml: str) -> tuple[str, bool]:
        """Keep ``twiml`` as the answer for ``key`` unless one is kept already (the first answer
        wins): (the answer kept, whether it is this one). Only the first may start anything."""
        ...


class StreamClaims:
    """Stream tokens already used: each opens one stream, once."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._used: dict[str, float] = {}  # token → when it expires

    def claim(self, token: str, expires_at: float) -> bool:
        """True the first time ``token`` is claimed; False ever after (until it expires, when
        the token itself is refused)."""
        now = self._clock()
        for old in [t for t, expiry in self._used.items() if expiry < now]:
            del self._used[old]
        if token in self._used:
            return False
        self._used[token] = expires_at
        return True

    def release(self, token: str) -> None:
        """Forget a claim that did not hold (see ``shared_only``)."""
        self._used.pop(token, None)


class AnsweredWebhooks:
    """The TwiML each side-effecting webhook got, by a key naming the request (the CallSid, and
    for a `<Dial>` action the dialled leg): a replay gets the same answer and starts nothing."""

    def __init__(self, limit: int = REMEMBERED):
        self._limit = limit
        self._answers: OrderedDict[str, str] = OrderedDict()

    def get(self, key: str) -> str | None:
        return self._answers.get(key)

    def remember(self, key: str, twiml: str) -> str:
        self._answers[key] = twiml
        while len(self._answers) > self._limit:
            self._answers.popitem(last=False)
        return twiml


class MemoryReplayGuard:
    """:class:`ReplayGuard` in this instance's memory. Nothing here awaits, so a check and the
    claim that follows it cannot interleave with another request's."""

    def __init__(self, clock: Callable[[], float] = time.time, limit: int = REMEMBERED):
        self.claims = StreamClaims(clock)
        self.answered = AnsweredWebhooks(limit)

    async def claim_stream(
        self, token: str, expires_at: float, *, shared_only: bool = False
    ) -> bool:
        return self.claims.claim(token, expires_at)  # this memory is the only store

    async def answer_for(self, key: str) -> str | None:
        return self.answered.get(key)

    async def remember(self, key: str, twiml: str) -> tuple[str, bool]:
        return self.remember_now(key, twiml)

    def remember_now(self, key: str, twiml: str) -> tuple[str, bool]:
        kept = self.answered.get(key)
        if kept is not None:
            return kept, False
        return self.answered.remember(key, twiml), True

    async def close(self) -> None:
        pass
