"""One signed POST of an outbox item to its webhook, and what came back. The HTTP half of the
worker: no retry rules here (``policy``), no outbox (``worker``).

Every attempt is signed afresh (a new ``webhook-timestamp``) with the same ``webhook-id``.
Redirects are not followed: a receiver that moved is told by a dead letter, not silently chased.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import aiohttp

from phoneagent.business_http import business_session, proxy_for, without_url_secrets
from phoneagent.delivery.outbox import OutboxItem
from phoneagent.delivery.signing import SigningError, signature_headers

__all__ = ["ERROR_SNIPPET", "Answer", "WebhookSender"]

ERROR_SNIPPET = 200  # characters of a failed answer's body kept for `events list`


class Answer(NamedTuple):
    """What one attempt got: the HTTP status (None: no answer), what went wrong, Retry-After."""

    status: int | None
    error: str | None
    retry_after: str | None


class WebhookSender:
    """POSTs outbox items, signed with the secret in ``environ[item.secret_env]``, read at each
    attempt (the outbox stores the variable's name, never the secret). Uses ``session`` if
    given, else makes its own, which :meth:`close` closes."""

    def __init__(
        self,
        *,
        timeout: float,
        concurrency: int,
        environ: Mapping[str, str],
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.timeout = timeout
        self.concurrency = concurrency
        self.environ = environ
        self._session = session
        self._own_session = session is None

    async def post(self, item: OutboxItem, now: float) -> Answer:
        """One attempt at ``item``, signed for ``now`` (Unix seconds)."""
        secret = self.environ.get(item.secret_env, "")
        try:
            headers = signature_headers(item.id, item.body, secret, timestamp=int(now))
        except SigningError as exc:
            return Answer(None, f"cannot sign with ${item.secret_env}: {exc}", None)
        headers["Content-Type"] = "application/json"
        try:
            async with self._http().post(
                item.url,
                proxy=proxy_for(item.url),
                data=item.body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as response:
                detail = None
                if not 200 <= response.status < 300:
                    detail = _snippet(await response.content.read(ERROR_SNIPPET))
                return Answer(response.status, detail, response.headers.get("Retry-After"))
        except TimeoutError:
            return Answer(None, f"no answer within {self.timeout:g} s", None)
        except (aiohttp.ClientError, OSError) as exc:
            # Some errors print the URL whole (NonHttpUrlClientError, InvalidUrlClientError):
            # the error is stored, listed and shown in the console, so its token goes.
            return Answer(None, without_url_secrets(f"{type(exc).__name__}: {exc}", item.url), None)

    async def close(self) -> None:
        """Close the HTTP session if this sender made it (a later post makes a new one)."""
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = business_session("webhooks", connections=self.concurrency)
        return self._session


def _snippet(raw: bytes) -> str | None:
    text = " ".join(raw.decode("utf-8", errors="replace").split())
    return text[:ERROR_SNIPPET] or None
