"""The webhook sender keeps no cookie from one event's answer for the next event: one HTTP
session sends every call's events, and a receiver's session cookie is about one of them."""

from __future__ import annotations

from delivery_helpers import ENV, SECRET_ENV, T0, ended_event

from phoneagent.delivery.outbox import OutboxItem
from phoneagent.delivery.sender import WebhookSender
from phoneagent.delivery.status import DeliveryStatus
from phoneagent.testing.cookie_setter import CookieSetter


async def test_a_cookie_set_answering_one_event_never_goes_with_the_next():
    sender = WebhookSender(timeout=2.0, concurrency=1, environ=ENV)
    try:
        async with CookieSetter() as receiver:
            url = receiver.named_url("/hook")
            for _ in range(2):
                event = ended_event()
                item = OutboxItem(
                    event.id, event.type, url, url.rsplit("/", 1)[0], SECRET_ENV, event.body(),
                    DeliveryStatus.PENDING, 0, T0, T0, None, None, None, None, None,
                )  # fmt: skip
                answer = await sender.post(item, now=T0)
                assert answer.status == 200, answer
    finally:
        await sender.close()
    assert receiver.cookies == [None, None]
