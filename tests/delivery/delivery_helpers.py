"""Helpers shared by the delivery tests (imported by module name: pytest puts this directory on
sys.path, as for tests/audio/audio_signals.py). Not a conftest: a second conftest module would
shadow tests/conftest.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from collections.abc import Mapping

from phoneagent.delivery.events import Event, call_ended_event

# A whsec_ secret (32 bytes, base64) and the environment that names it, as a persona would.
KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
SECRET_ENV = "TEST_HOOK_SECRET"
ENV = {SECRET_ENV: SECRET}
T0 = 1_800_000_000.0  # a fixed "now" for the fake clock


def spec_signature_ok(body: bytes, headers: Mapping[str, str], secret: str) -> bool:
    """Standard Webhooks verification written from the spec, independent of our signer: the key
    is the base64 after ``whsec_``; the content is ``id.timestamp.body``; the header is a
    space-separated list of ``v1,<base64 HMAC-SHA256>``."""
    h = {k.lower(): v for k, v in headers.items()}
    key = base64.b64decode(secret.removeprefix("whsec_"))
    content = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    offered = [s.split(",", 1)[1] for s in h["webhook-signature"].split() if s.startswith("v1,")]
    return any(hmac.compare_digest(expected, s) for s in offered)


class FakeClock:
    """Wall-clock seconds that move only when told (or when the worker 'sleeps')."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


def ended_event(n: int = 0, **overrides) -> Event:
    args = dict(
        call_sid=f"CA{n:032x}",
        persona_id="bright-smile-dental",
        persona_name="Bright Smile Dental front desk",
        from_number="+14155550123",
        to_number="+14155550100",
        started_at=T0 - 95.5,
        ended_at=T0,
        end_reason="caller_hung_up",
        transcript=[
            {"role": "agent", "text": "Bright Smile Dental, how can I help?", "start_ms": 0,
             "end_ms": 2100, "interrupted": False},
            {"role": "caller", "text": "I'd like to book a cleaning.", "start_ms": 2600,
             "end_ms": 4300, "interrupted": False},
        ],
    )  # fmt: skip
    args.update(overrides)
    return call_ended_event(**args)
