"""Twilio requests that must act once: a stream token opens one stream, and a webhook that
starts something (a stream token, a model pre-warm) starts it once per call.

Twilio's signature has no timestamp, so a captured request stays valid for ever: anyone who saw
one could replay it to open model sessions at the business's expense. Both records are this
instance's memory (bounded, and a token is only remembered until it expires anyway).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

REMEMBERED = 1000  # answers kept; calls older than that are long over


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
