"""Twilio's REST API for calls: place one (outbound calls), hand a live one to a person (new
TwiML) or hang it up.

Through the ``twilio`` library's async client, pointed at ``TWILIO_API_BASE_URL``. Every request
has our own time limit: the library's ``timeout`` option does not reach aiohttp (twilio 9.13).
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from phoneagent.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")

REQUEST_SECONDS = 10.0
# "Call is not in-progress. Cannot redirect." — the call already ended: a hang-up is done.
CALL_NOT_IN_PROGRESS = 21220


class CallUpdateFailed(Exception):
    """Twilio refused or did not answer. ``code`` is Twilio's error code, when it gave one."""

    def __init__(self, reason: str, *, status: int | None = None, code: int | None = None):
        super().__init__(reason)
        self.status = status
        self.code = code


@dataclass
class TwilioCalls:
    account_sid: str
    auth_token: str
    base_url: str = "https://api.twilio.com"
    timeout: float = REQUEST_SECONDS

    def __post_init__(self) -> None:
        self._client: Client | None = None

    def _api(self) -> Client:
        if self._client is None:
            # A session per request: transfers and hang-ups are rare, and a pooled connection
            # would sit idle between them (and outlive calls in leak checks).
            http = AsyncTwilioHttpClient(pool_connections=False)
            self._client = Client(self.account_sid, self.auth_token, http_client=http)
            self._client.api.base_url = self.base_url  # read on every request
        return self._client

    def _calls(self, call_sid: str):
        return self._api().calls(call_sid)

    async def create(self, **params) -> dict[str, str | None]:
        """Place a call (Calls create; ``params`` as ``CallList.create`` names them): the new
        call's sid, status, to, from and direction as Twilio answered them."""
        call = await self._request(self._api().calls.create_async(**params))
        return {"sid": call.sid, "status": call.status, "to": call.to, "from": call._from,
                "direction": call.direction}  # fmt: skip

    async def redirect(self, call_sid: str, twiml: str) -> None:
        """Replace the call's TwiML (Twilio then stops our media stream)."""
        await self._update(call_sid, twiml=twiml)

    async def hang_up(self, call_sid: str) -> None:
        """End the call. A call that already ended counts as hung up."""
        try:
            await self._update(call_sid, status="completed")
        except CallUpdateFailed as exc:
            if exc.code != CALL_NOT_IN_PROGRESS:
                raise
            log.info("twilio_call_already_ended", call_sid=call_sid)

    async def _update(self, call_sid: str, **params: str) -> None:
        await self._request(self._calls(call_sid).update_async(**params))

    async def _request(self, request: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                with warnings.catch_warnings():
                    # twilio's async client still uses aiohttp.BasicAuth, deprecated in 3.14.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return await request
        except TwilioRestException as exc:
            raise CallUpdateFailed(exc.msg, status=exc.status, code=exc.code) from None
        except TimeoutError:
            raise CallUpdateFailed(f"no answer in {self.timeout:.0f} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise CallUpdateFailed(f"cannot reach Twilio: {exc}") from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.http_client.close()
