"""`<Connect action>` waits up to END_REASON_WAIT for another instance to record how a stream
ended. A Twilio signature has no timestamp, so one captured action can be sent again and again:
the waits must be bounded (one poll per call, a bound on calls polled at once), not one
2-second database poll per request."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from phoneagent.records import CallRecords, StreamEnded, StreamStarted
from phoneagent.records.memory import MemoryCallRecords
from phoneagent.twilio.routes import webhooks


class CountingStore(MemoryCallRecords):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get(self, call_sid):
        self.reads += 1
        return await super().get(call_sid)


def started(calls: CallRecords, call_sid: str) -> None:
    calls.note(call_sid, StreamStarted(at=time.time(), persona="p", model_session="s",
                                       caller="+1", called="+2"))  # fmt: skip


async def test_replayed_actions_for_one_call_share_one_poll(monkeypatch):
    monkeypatch.setattr(webhooks, "END_REASON_WAIT", 0.3)
    store = CountingStore()
    calls = CallRecords(store)
    state = SimpleNamespace(active_calls={}, calls=calls, settings=SimpleNamespace(max_calls=4))
    sid = "CA" + "a" * 32
    started(calls, sid)  # a stream that died with its instance: live for ever
    await asyncio.sleep(0.05)  # the write lands
    store.reads = 0
    reasons = await asyncio.gather(*(webhooks.end_reason_of(state, sid) for _ in range(200)))
    assert reasons == [None] * 200
    # One poll (about END_REASON_WAIT / END_REASON_POLL reads), not one per request.
    assert store.reads <= 10


async def test_calls_polled_at_once_are_bounded_and_an_end_is_still_seen(monkeypatch):
    monkeypatch.setattr(webhooks, "END_REASON_WAIT", 0.5)
    store = CountingStore()
    calls = CallRecords(store)
    state = SimpleNamespace(active_calls={}, calls=calls, settings=SimpleNamespace(max_calls=4))
    sids = ["CA" + f"{i:032x}" for i in range(100)]
    for sid in sids:
        started(calls, sid)
    await asyncio.sleep(0.05)
    store.reads = 0
    waits = [asyncio.create_task(webhooks.end_reason_of(state, sid)) for sid in sids]
    await asyncio.sleep(0.15)
    calls.note(sids[0], StreamEnded(at=time.time(), end_reason="agent_hung_up", transcript=[],
                                    stats={}))  # fmt: skip
    reasons = await asyncio.gather(*waits)
    assert reasons[0] == "agent_hung_up"  # a polled call still gets its end
    bound = webhooks.end_reason_pollers(state)
    polls = 0.5 / webhooks.END_REASON_POLL + 2
    assert store.reads <= bound * polls + len(sids)  # the rest read the record once
