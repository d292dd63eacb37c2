"""Child process of test_delivery_crash.py (run as a script, not collected by pytest).

``python outbox_child.py DATA_DIR URL COUNT``: commits COUNT call.ended events to the outbox
for URL, printing each id once its commit returned, then prints ENQUEUED and delivers until it
is killed. The signing secret comes from the environment, as in the server.
"""

from __future__ import annotations

import asyncio
import sys
import time

from delivery_helpers import SECRET_ENV, ended_event

from phoneagent.delivery.outbox import SQLiteOutbox
from phoneagent.delivery.policy import RetryPolicy
from phoneagent.delivery.worker import DeliveryWorker


async def main(data_dir: str, url: str, count: int) -> None:
    outbox = await SQLiteOutbox.in_data_dir(data_dir)
    worker = DeliveryWorker(
        outbox,
        policy=RetryPolicy(delays=[0.05] * 20, jitter=0.0),
        timeout=1.0,
        lease=1.5,
        per_destination=4,
        poll_interval=0.05,
    )
    for i in range(count):
        event = ended_event(i)
        await outbox.enqueue(event, url=url, secret_env=SECRET_ENV, now=time.time())
        print(event.id, flush=True)
    print("ENQUEUED", flush=True)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
