"""Twilio's REST API for a live call: hand it to a person (new TwiML) or hang it up.

Through the ``twilio`` library's async client, pointed at ``TWILIO_API_BASE_URL``. Every request
has our own time limit: the library's ``timeout`` option does not reach aiohttp (twilio 9.13).
"""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass

import aiohttp
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from phoneagent.logs import get_logger

log = get_logger(__name__)

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

    def _calls(self, call_sid: str):
        if self._client is None:
            # A session per request: transfers and hang-ups are rare, and a pooled connection
            # would sit idle between them (and outlive calls in leak checks).
            http = AsyncTwilioHttpClient(pool_connections=False)
            self._client = Client(self.account_sid, self.auth_token, http_client=http)
            self._client.api.base_url = self.base_url  # read on every request
        return self._client.calls(call_sid)

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
        try:
            async with asyncio.timeout(self.timeout):
                with warnings.catch_warnings():
                    # twilio's async client still uses aiohttp.BasicAuth, deprecated in 3.14.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    await self._calls(call_sid).update_async(**params)
        except TwilioRestException as exc:
            raise CallUpdateFailed(exc.msg, status=exc.status, code=exc.code) from None
        except TimeoutError:
            raise CallUpdateFailed(f"no answer in {self.timeout:.0f} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise CallUpdateFailed(f"cannot reach Twilio: {exc}") from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.http_client.close()
