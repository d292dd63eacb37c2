"""The webhook receiver used by transcript-delivery tests."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from phoneagent.testing.webhook_sink import WebhookSink


async def post(url: str, body: object, headers: dict[str, str] | None = None):
    async with aiohttp.ClientSession() as session:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        async with session.post(url, data=data, headers=headers) as response:
            await response.read()
            return response


async def test_records_every_request():
    async with WebhookSink() as sink:
        response = await post(
            sink.url("/hooks/calls?x=1"), {"type": "call.ended"}, {"X-Signature": "v1=abc"}
        )
        assert response.status == 200
        (hook,) = await sink.wait_for(1)
    assert (hook.method, hook.path, hook.query, hook.status) == ("POST", "/hooks/calls", "x=1", 200)
    assert hook.json == {"type": "call.ended"}
    assert hook.body == b'{"type": "call.ended"}' and hook.text == '{"type": "call.ended"}'
    assert hook.headers["X-Signature"] == "v1=abc"


async def test_answers_the_scripted_statuses_then_repeats_the_last():
    async with WebhookSink([503, 503, 200], retry_after=2) as sink:
        responses = [await post(sink.url("/h"), {"n": n}) for n in range(4)]
    assert [r.status for r in responses] == [503, 503, 200, 200]
    assert [r.headers.get("Retry-After") for r in responses] == ["2", "2", None, None]
    assert [h.json["n"] for h in sink.received] == [0, 1, 2, 3]
    assert [h.status for h in sink.received] == [503, 503, 200, 200]


async def test_per_answer_retry_after_and_rescripting():
    async with WebhookSink([(429, "Wed, 21 Oct 2026 07:28:00 GMT"), 500]) as sink:
        first = await post(sink.url(), {})
        second = await post(sink.url(), {})
        sink.script([204])
        third = await post(sink.url(), {})
    assert first.status == 429 and first.headers["Retry-After"] == "Wed, 21 Oct 2026 07:28:00 GMT"
    assert second.status == 500 and "Retry-After" not in second.headers
    assert third.status == 204


async def test_non_json_bodies_are_kept_raw():
    async with (
        WebhookSink() as sink,
        aiohttp.ClientSession() as session,
        session.post(sink.url("/raw"), data=b"not json") as response,
    ):
        assert response.status == 200
    assert sink.received[0].json is None
    assert sink.received[0].body == b"not json"


async def test_stopped_sink_refuses_connections_then_comes_back_on_the_same_port():
    sink = WebhookSink()
    await sink.start()
    url = sink.url("/h")
    await post(url, {"n": 1})
    await sink.stop()
    assert not sink.running
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(url, {"n": 2})
    await sink.start()
    try:
        assert sink.url("/h") == url
        await post(url, {"n": 3})
        assert [h.json["n"] for h in await sink.wait_for(2)] == [1, 3]
    finally:
        await sink.stop()


async def test_wait_for_times_out_with_a_count():
    async with WebhookSink() as sink:
        with pytest.raises(TimeoutError, match="got 0"):
            await sink.wait_for(1, timeout=0.05)


async def test_wait_for_wakes_on_arrival():
    async with WebhookSink() as sink:
        waiter = asyncio.create_task(sink.wait_for(1, timeout=10))
        await asyncio.sleep(0)
        await post(sink.url(), {"late": True})
        assert (await waiter)[0].json == {"late": True}


async def test_a_slow_sink_lets_clients_time_out():
    async with WebhookSink(delay=5.0) as sink, aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            timeout = aiohttp.ClientTimeout(total=0.2)
            async with session.post(sink.url(), json={}, timeout=timeout):
                pass
