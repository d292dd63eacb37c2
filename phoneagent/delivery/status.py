"""Where a webhook event stands, and what one delivery attempt led to: one vocabulary from the
outbox to ``phoneagent events list`` and the metrics.

A dead letter (an event given up on) is ``failed`` everywhere: in the outbox, in
``events list --status failed`` and ``events redeliver --all-failed``, and as the ``outcome``
label of ``phoneagent_webhook_deliveries_total``.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["AttemptOutcome", "DeliveryStatus"]


class DeliveryStatus(StrEnum):
    """An event's status in the outbox. The values are stored: they are the outbox's format."""

    PENDING = "pending"  # waiting for its first or next attempt, or being delivered now
    FAILED = "failed"  # a dead letter: given up on; `events redeliver` queues it again
    DELIVERED = "delivered"  # a receiver answered 2xx


class AttemptOutcome(StrEnum):
    """What one delivery attempt led to: the worker's decision, and the metric's label."""

    DELIVERED = "delivered"
    RETRY = "retry"  # the event stays pending, due again later
    FAILED = "failed"  # the event became a dead letter

    @property
    def status(self) -> DeliveryStatus:
        """The status the event has after this outcome."""
        return _STATUS_AFTER[self]


_STATUS_AFTER = {
    AttemptOutcome.DELIVERED: DeliveryStatus.DELIVERED,
    AttemptOutcome.RETRY: DeliveryStatus.PENDING,
    AttemptOutcome.FAILED: DeliveryStatus.FAILED,
}
