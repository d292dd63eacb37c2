"""The deliveries page over HTTP, with each outbox store (SQLite, and the PostgreSQL database
instances share): pending events and dead letters per receiver, and "Redeliver" reaching the
receiver. Events go through the real worker to real receivers on loopback."""

from __future__ import annotations

import asyncio
import html
import re
import time

import aiohttp
import pytest
from conftest import EXAMPLE_PERSONAS, free_port
from console_kit import PASSWORD, console_settings

from phoneagent.delivery.events import call_started_event
from phoneagent.delivery.status import DeliveryStatus
from phoneagent.testing.stack import LocalStack
from phoneagent.testing.webhook_sink import WebhookSink

SECRET_ENV = "CONSOLE_TEST_WEBHOOK_SECRET"
SECRET = "whsec_" + "c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cw=="


@pytest.fixture
async def sink():
    async with WebhookSink([410]) as sink:  # 410 Gone: a dead letter at the first attempt
        yield sink


@pytest.fixture
async def console_stack(store_backend, tmp_path, monkeypatch):
    """The console on a server whose outbox is SQLite or PostgreSQL (parametrized)."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    _, database_url = store_backend
    settings = console_settings(
        EXAMPLE_PERSONAS, tmp_path / "data", database_url=database_url or ""
    )
    async with LocalStack(EXAMPLE_PERSONAS, settings=settings) as stack:
        yield stack


async def submit(stack, url: str, call_sid: str) -> str:
    event = call_started_event(
        call_sid=call_sid,
        persona_id="bright-smile-dental",
        persona_name="Bright Smile Dental front desk",
        from_number="+14155550123",
        to_number="+14155550100",
        started_at=time.time(),
    )
    await stack.state.publisher.worker.submit(event, url=url, secret_env=SECRET_ENV)
    return event.id


async def until(condition, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(0.05)


async def signed_in_page(http, path: str = "/console/deliveries") -> tuple[int, str]:
    async with http.get(path, allow_redirects=False) as response:
        if response.status == 401:
            async with http.post(
                "/console/login", data={"password": PASSWORD, "next": path},
                allow_redirects=False,
            ) as signed:  # fmt: skip
                assert signed.status == 303
            return await signed_in_page(http, path)
        return response.status, html.unescape(await response.text())


def event_row(text: str, event_id: str) -> str:
    match = re.search(rf'<tr id="event-{event_id}">(.*?)</tr>', text, re.S)
    assert match, f"no row for {event_id}"
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", match.group(1))).strip()


async def test_dead_letters_and_pending_events_per_receiver_and_redeliver(
    console_stack, http, sink
):
    outbox = console_stack.state.publisher.worker.outbox
    hook = sink.url("/hooks?token=kept-out-of-pages")  # a query may hold a token: never shown
    refused = await submit(console_stack, hook, "CA" + "1" * 32)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: retried, so pending
    waiting = await submit(console_stack, down + "/hooks", "CA" + "2" * 32)

    async def settled():
        dead, late = await outbox.get(refused), await outbox.get(waiting)
        return dead.status == DeliveryStatus.FAILED and late.attempts == 1

    await until(settled)

    status, text = await signed_in_page(http)
    assert status == 200
    assert "<strong>1</strong> pending" in text and "<strong>1</strong> dead letter" in text
    # One section per receiver, the one with dead letters first.
    receivers = re.findall(r'<h2 id="receiver-\d+">([^<]+)</h2>', text)
    assert receivers == [sink.base_url, down]
    assert f'<p class="urls">To {sink.url("/hooks")}</p>' in text
    dead = event_row(text, refused)
    assert dead.startswith(f"{refused} call.started CA{'1' * 32} 1 HTTP 410 Gone")
    assert " UTC (" in dead and "Redeliver" in dead  # given up: when, and how long ago
    late = event_row(text, waiting)
    assert late.startswith(f"{waiting} call.started CA{'2' * 32} 1 no answer")
    assert "(in " in late and "Redeliver" not in late  # pending: its next attempt is coming
    assert "kept-out-of-pages" not in text and SECRET not in text

    # Redeliver the dead letter: the receiver now takes it.
    sink.script([200])
    token = re.search(r'name="csrf" value="([^"]+)"', text).group(1)
    async with http.post(
        "/console/deliveries/redeliver", data={"csrf": token, "id": refused},
        allow_redirects=False,
    ) as response:  # fmt: skip
        assert response.status == 303
        assert response.headers["Location"] == f"/console/deliveries?queued={refused}"
    received = await sink.wait_for(2)
    assert received[-1].json["id"] == refused and received[-1].status == 200
    assert received[-1].headers["webhook-id"] == refused
    await until(lambda: _status_is(outbox, refused, DeliveryStatus.DELIVERED))
    status, text = await signed_in_page(http, f"/console/deliveries?queued={refused}")
    assert f"{refused} (call.started) is queued again for {sink.url('/hooks')}" in text
    assert "Now: delivered." in text
    assert f'id="event-{refused}"' not in text  # no longer a dead letter
    assert "<strong>0</strong> dead letters" in text


async def _status_is(outbox, event_id: str, status: DeliveryStatus) -> bool:
    return (await outbox.get(event_id)).status == status


async def test_redelivering_an_unknown_or_malformed_id_says_so(console_stack, http):
    status, text = await signed_in_page(http)
    assert status == 200 and "Nothing waiting" in text
    token = re.search(r'name="csrf" value="([^"]+)"', text).group(1)
    unknown = "evt_" + "f" * 24
    async with http.post(
        "/console/deliveries/redeliver", data={"csrf": token, "id": unknown},
        allow_redirects=False,
    ) as response:  # fmt: skip
        assert response.headers["Location"] == f"/console/deliveries?missing={unknown}"
    _, text = await signed_in_page(http, f"/console/deliveries?missing={unknown}")
    assert f"No event {unknown} in the outbox" in text
    for bad in ("", "evt_1' OR 1=1", "x" * 65):
        async with http.post(
            "/console/deliveries/redeliver", data={"csrf": token, "id": bad},
            allow_redirects=False,
        ) as response:  # fmt: skip
            assert response.status == 400


# One backend stands for both: the page only sees an OutboxError.
@pytest.mark.parametrize("store_backend", [("sqlite", None)])
async def test_an_outbox_that_cannot_be_read_is_said_not_a_server_error(console_stack, http):
    await signed_in_page(http)
    await console_stack.state.publisher.worker.outbox.close()
    status, text = await signed_in_page(http)
    assert status == 503
    assert "The outbox cannot be read now" in text and "is closed" in text


async def test_without_an_outbox_the_page_says_delivery_is_off(tmp_path):
    settings = console_settings(EXAMPLE_PERSONAS, tmp_path / "data")
    async with (
        LocalStack(EXAMPLE_PERSONAS, settings=settings, webhooks=False) as stack,
        aiohttp.ClientSession(
            base_url=stack.base_url, cookie_jar=aiohttp.CookieJar(unsafe=True)
        ) as http,
    ):
        status, text = await signed_in_page(http)
        assert status == 200 and "Webhook delivery is off on this instance" in text
        token = re.search(r'name="csrf" value="([^"]+)"', text).group(1)
        async with http.post(
            "/console/deliveries/redeliver", data={"csrf": token, "id": "evt_0"},
            allow_redirects=False,
        ) as response:  # fmt: skip
            assert response.status == 409
