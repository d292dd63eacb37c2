"""One vocabulary for delivery statuses: the worker's decision, the outbox, `events list`."""

from __future__ import annotations

import random

from delivery_helpers import SECRET_ENV, T0, ended_event

from phoneagent.delivery.outbox import SQLiteOutbox
from phoneagent.delivery.policy import RetryPolicy, decide
from phoneagent.delivery.status import AttemptOutcome, DeliveryStatus


def test_each_outcome_names_the_status_it_leaves_the_event_in():
    assert {outcome: outcome.status for outcome in AttemptOutcome} == {
        AttemptOutcome.DELIVERED: DeliveryStatus.DELIVERED,
        AttemptOutcome.RETRY: DeliveryStatus.PENDING,
        AttemptOutcome.FAILED: DeliveryStatus.FAILED,
    }
    # The operator-facing spellings (README: `events list --status`, the metric's label).
    assert list(DeliveryStatus) == ["pending", "failed", "delivered"]
    assert list(AttemptOutcome) == ["delivered", "retry", "failed"]


async def test_a_dead_letter_is_failed_from_the_decision_to_the_outbox(tmp_path):
    decision = decide(1, status=410, now=T0, policy=RetryPolicy(), rng=random.Random(1))
    assert decision.action is AttemptOutcome.FAILED
    box = await SQLiteOutbox.in_data_dir(tmp_path)
    try:
        event = ended_event(0)
        await box.enqueue(event, url="https://crm.example/hooks", secret_env=SECRET_ENV, now=T0)
        [claimed] = await box.claim_due(now=T0, limit=1, lease=30)
        await box.mark_dead(event.id, claimed.claim, now=T0, status=410, error=decision.reason)
        item = await box.get(event.id)
        assert item is not None and item.status is decision.action.status
        assert (await box.counts())[DeliveryStatus.FAILED] == 1
    finally:
        await box.close()
