"""When to try a webhook event again, and when to give up: the delivery rules, pure.

Rules (what a receiver can count on):

- 2xx: delivered. 408, 429, 5xx, a network error or no answer within the worker's timeout:
  tried again after the next delay of the :class:`RetryPolicy` (default: 5 s, 5 min, 30 min,
  2 h, 5 h, 10 h, 14 h, 20 h, 24 h, each ±20 % jitter; ten attempts over about three days), or
  later if the answer carried ``Retry-After`` (seconds or an HTTP date; at most 24 h).
- 410 Gone, any other 4xx, or a 3xx (redirects are not followed: fix the URL instead): given up
  at once, the event becomes a dead letter (``failed``). So does an event whose schedule ran out.
  ``phoneagent events redeliver ID`` queues a dead letter again.

No clock and no randomness of its own: ``now`` and ``rng`` are passed in, so every rule is
tested with a seeded ``rng`` and no waiting.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from phoneagent.delivery.status import AttemptOutcome

__all__ = [
    "DEFAULT_DELAYS",
    "RETENTION",
    "Decision",
    "RetryPolicy",
    "decide",
    "parse_retry_after",
]

MINUTE, HOUR = 60.0, 3600.0
#: How long delivered events are kept (then purged), and call records with them.
RETENTION = 30 * 24 * HOUR
#: The Standard Webhooks spec's example schedule: the delay before attempts 2 to 10.
DEFAULT_DELAYS = (5.0, 5 * MINUTE, 30 * MINUTE, 2 * HOUR, 5 * HOUR, 10 * HOUR, 14 * HOUR,
                  20 * HOUR, 24 * HOUR)  # fmt: skip
#: Statuses worth another try besides 5xx: the receiver is busy, not refusing.
RETRY_STATUSES = frozenset({408, 429})


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again. ``delays[i]`` is the pause after failed attempt ``i + 1``; after
    ``len(delays) + 1`` failed attempts the event is a dead letter. Each pause is scaled by a
    random factor in ``[1 - jitter, 1 + jitter]`` so a receiver coming back from an outage is
    not hit by every event at the same instant."""

    delays: Sequence[float] = DEFAULT_DELAYS
    jitter: float = 0.2
    #: A ``Retry-After`` longer than this is cut to it: a receiver cannot park events forever.
    max_retry_after: float = 24 * HOUR

    def __post_init__(self) -> None:
        if not self.delays or any(d < 0 for d in self.delays):
            raise ValueError("delays must be a non-empty list of seconds ≥ 0")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    @property
    def max_attempts(self) -> int:
        return len(self.delays) + 1

    def delay_after(self, attempts: int, rng: random.Random) -> float | None:
        """The pause after ``attempts`` failed attempts, or None: give up."""
        if attempts >= self.max_attempts:
            return None
        base = self.delays[attempts - 1]
        return base * rng.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass(frozen=True)
class Decision:
    """What to do with an event after an attempt."""

    action: AttemptOutcome
    reason: str
    at: float | None = None  # when to try again, for a retry


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT by definition
        return None
    return max(0.0, when.timestamp() - now)


def decide(
    attempts: int,
    *,
    status: int | None,
    error: str | None = None,
    retry_after: str | None = None,
    now: float,
    policy: RetryPolicy,
    rng: random.Random,
) -> Decision:
    """The fate of an event after its ``attempts``-th attempt got ``status`` (None: no answer,
    ``error`` says why). Pure: the worker's rules, testable with a seeded ``rng``."""
    if status is not None and 200 <= status < 300:
        return Decision(AttemptOutcome.DELIVERED, f"HTTP {status}")
    if status is not None and status not in RETRY_STATUSES and status < 500:
        if status == 410:
            why = "HTTP 410 Gone: the receiver no longer wants these events"
        elif 300 <= status < 400:
            why = f"HTTP {status}: redirects are not followed; set the persona's webhook URL"
        else:
            why = f"HTTP {status}: the receiver refused the event"
        return Decision(AttemptOutcome.FAILED, _with_detail(why, error))
    failure = _with_detail(f"HTTP {status}" if status is not None else "no answer", error)
    delay = policy.delay_after(attempts, rng)
    if delay is None:
        gave_up = f"gave up after {attempts} attempts; last: {failure}"
        return Decision(AttemptOutcome.FAILED, gave_up)
    wait = parse_retry_after(retry_after, now)
    if wait is not None:
        delay = max(delay, min(wait, policy.max_retry_after))
    return Decision(AttemptOutcome.RETRY, failure, at=now + delay)


def _with_detail(what: str, detail: str | None) -> str:
    return f"{what}: {detail}" if detail else what
