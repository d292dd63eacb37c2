"""One call's writes reach the outbox in the order the call made them, even when one is slow
(a full or busy disk): the open-call record, call.started, then call.ended."""

import asyncio

from conftest import EXAMPLE_PERSONAS

from phoneagent.delivery.outbox import SQLiteOutbox
from phoneagent.delivery.publisher import CallEventPublisher
from phoneagent.delivery.worker import DeliveryWorker
from phoneagent.personas import PersonaRegistry
from phoneagent.records import CallRecord


async def test_a_short_call_s_end_waits_for_its_slow_start(tmp_path, monkeypatch):
    monkeypatch.setenv("HOOK_SECRET", "whsec_c2VjcmV0")
    (tmp_path / "personas").mkdir()
    dental = (EXAMPLE_PERSONAS / "bright-smile-dental.toml").read_text()
    (tmp_path / "personas" / "bright-smile-dental.toml").write_text(
        dental + '\n[webhook]\nurl = "https://hooks.example.com/h"\nsecret_env = "HOOK_SECRET"\n'
        'events = ["call.started", "call.ended"]\n'
    )
    persona = PersonaRegistry(tmp_path / "personas").current.personas["bright-smile-dental"]
    outbox = await SQLiteOutbox.in_data_dir(tmp_path / "data")
    slow_open = outbox.open_call

    async def open_call_slowly(*args):  # the first write of the call is slow
        await asyncio.sleep(0.2)
        await slow_open(*args)

    monkeypatch.setattr(outbox, "open_call", open_call_slowly)
    publisher = CallEventPublisher(DeliveryWorker(outbox))
    record = CallRecord("CA" + "1" * 32, started_at=1.0, ended_at=2.0, end_reason="caller_hung_up")
    # As the media-stream route does: each publication is its own task, started in order.
    started = asyncio.create_task(publisher.call_started(persona, record))
    ended = asyncio.create_task(publisher.call_ended(persona, record))
    await asyncio.gather(started, ended)
    committed = [item.type for item in reversed(await outbox.list())]  # oldest first
    await outbox.close()
    assert committed == ["call.started", "call.ended"]
