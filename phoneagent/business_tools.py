"""Asking the business: one signed POST per persona tool call, and its answer as the model
will read it. The HTTP half of the persona tools (the decisions are in call/tool_calls.py).

The request is JSON ``{call_sid, persona, tool, arguments}``, signed exactly like the call
events (Standard Webhooks headers, delivery/signing.py) with the tool's ``secret_env``, and
bounded by the tool's ``timeout_ms``. The answer must be 2xx with a JSON body of at most
MAX_ANSWER_BYTES; it goes to the model as it is (compact JSON). Anything else becomes
``{"error": ...}`` with a short reason that names no URL and no secret, so the model can
apologise; the details go to the log. Redirects are not followed (as for the call events).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping

import aiohttp

from phoneagent import strict_json
from phoneagent.business_http import (
    business_session,
    proxy_for,
    read_at_most,
    without_url_secrets,
)
from phoneagent.call.tool_calls import (
    BAD_ANSWER,
    HTTP_ERROR,
    NOT_SIGNED,
    OK,
    TIMEOUT,
    UNREACHABLE,
    ToolAnswer,
    error_output,
)
from phoneagent.delivery.signing import SigningError, signature_headers
from phoneagent.logs import get_logger
from phoneagent.personas import BusinessTool

__all__ = ["MAX_ANSWER_BYTES", "BusinessToolClient", "tool_request_body"]

log = get_logger(__name__)

# The largest answer read: a tool answers a question on a phone call, not a database dump, and
# the whole answer goes into the model's context.
MAX_ANSWER_BYTES = 64 * 1024


def tool_request_body(call_sid: str, persona: str, tool: str, arguments: dict) -> bytes:
    """What the business receives: the call, the tool, and the model's arguments."""
    payload = {"call_sid": call_sid, "persona": persona, "tool": tool, "arguments": arguments}
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


class BusinessToolClient:
    """POSTs persona tool calls; signs with the secret in ``environ[tool.secret_env]``, read at
    each request (the persona holds the variable's name, never the secret)."""

    def __init__(
        self, environ: Mapping[str, str], session: aiohttp.ClientSession | None = None
    ) -> None:
        self.environ = environ
        self._session = session
        self._own_session = session is None

    async def ask(
        self, call_sid: str, persona: str, tool: BusinessTool, arguments: dict
    ) -> ToolAnswer:
        """One request, answered within the tool's timeout whatever the business does."""
        started = time.monotonic()
        body = tool_request_body(call_sid, persona, tool.name, arguments)
        headers = {"Content-Type": "application/json"}
        if tool.secret_env:
            try:
                headers |= signature_headers(
                    f"tool_{uuid.uuid4().hex}", body, self.environ.get(tool.secret_env, "")
                )
            except SigningError as exc:
                log.error("business_tool_not_signed", tool=tool.name, secret_env=tool.secret_env,
                          error=str(exc))  # fmt: skip
                return _answer(started, error_output("the tool is not available"), NOT_SIGNED)
        try:
            async with asyncio.timeout(tool.timeout_ms / 1000):
                return await self._post(tool, body, headers, started)
        except TimeoutError:
            log.warning("business_tool_timeout", tool=tool.name, timeout_ms=tool.timeout_ms)
            return _answer(started, error_output("no answer in time"), TIMEOUT)
        except (aiohttp.ClientError, OSError) as exc:
            error = without_url_secrets(f"{type(exc).__name__}: {exc}", tool.url)
            log.warning("business_tool_unreachable", tool=tool.name, error=error)
            return _answer(
                started, error_output("the business's system could not be reached"), UNREACHABLE
            )

    async def _post(
        self, tool: BusinessTool, body: bytes, headers: dict[str, str], started: float
    ) -> ToolAnswer:
        async with self._http().post(
            tool.url, data=body, headers=headers, allow_redirects=False, proxy=proxy_for(tool.url)
        ) as response:
            status = response.status
            if not 200 <= status < 300:
                # Not the body: an error page may echo what the caller said.
                log.warning("business_tool_http_error", tool=tool.name, status=status)
                reason = f"the business's system answered with an error (HTTP {status})"
                return _answer(started, error_output(reason), HTTP_ERROR, status)
            raw = await read_at_most(response, MAX_ANSWER_BYTES)
        if raw is None:
            log.warning("business_tool_answer_too_large", tool=tool.name, limit=MAX_ANSWER_BYTES)
            return _answer(started, error_output("the answer was too large"), BAD_ANSWER, status)
        try:  # strictly: NaN or half a character in the output would break the model's socket
            answer = strict_json.loads(raw)
        except ValueError:
            log.warning("business_tool_answer_not_json", tool=tool.name, bytes=len(raw))
            return _answer(started, error_output("the answer was not JSON"), BAD_ANSWER, status)
        output = json.dumps(answer, ensure_ascii=False, separators=(",", ":"))
        return _answer(started, output, OK, status)

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = business_session("tools")
        return self._session


def _answer(started: float, output: str, outcome: str, status: int | None = None) -> ToolAnswer:
    return ToolAnswer(output, outcome, round((time.monotonic() - started) * 1000), status)
