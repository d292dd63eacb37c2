"""The persona's lookup: before an inbound call is answered, phoneagent asks the business who is
calling, and the call gets the variables it answers ("Hello Dana, calling about Thursday's
cleaning?") without a model round trip.

The request is a POST of ``{"call_sid", "from", "to", "persona": {"id", "name"}}`` to the
persona's ``[lookup] url``, signed exactly as the call events are (Standard Webhooks headers,
``delivery/signing.py``, with the persona's ``secret_env``). The answer is
``{"variables": {…}, "metadata": {…}}``, both optional. The caller is on the line, hearing it
ring: the whole exchange gets the persona's ``timeout_ms`` and no more, and anything but a good
answer in time (no answer, an error status, a body that is not JSON or is too large) leaves the
call with its persona's defaults, logged and counted (``phoneagent_lookup_failures_total``).
Each answered value is checked (declared, a string of one line, not too long); one that fails
is dropped, logged by name (``lookup_values_dropped``; never by value: it is the business's
data about a person), and its default is used.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from phoneagent.business_http import business_session, proxy_for, read_at_most
from phoneagent.call.context import INBOUND, CallContext, metadata_problem
from phoneagent.delivery.signing import SigningError, signature_headers
from phoneagent.logs import get_logger
from phoneagent.personas import Persona
from phoneagent.personas.variables import resolve, value_problem

__all__ = ["MAX_ANSWER_BYTES", "CallerLookups", "LookupFailed", "lookup_body", "read_answer"]

log = get_logger(__name__)

#: The largest answer read: a few variables and some metadata are far smaller.
MAX_ANSWER_BYTES = 64 * 1024


class LookupFailed(Exception):
    """The lookup gave nothing usable: ``reason`` is the metric's label, the message the log's."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def lookup_body(persona: Persona, *, call_sid: str, caller: str, called: str) -> bytes:
    """The request's JSON body: who is calling which line of which persona."""
    body = {
        "call_sid": call_sid,
        "from": caller,
        "to": called,
        "persona": {"id": persona.id, "name": persona.name},
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def read_answer(persona: Persona, body: bytes) -> tuple[CallContext, list[tuple[str, str]]]:
    """The context an answer gives an inbound call, and what was dropped from it (field,
    reason). Raises LookupFailed when the body is not a JSON object."""
    try:
        answer = json.loads(body.decode("utf-8"), parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise LookupFailed("not_json", "the answer is not JSON") from None
    if not isinstance(answer, dict):
        raise LookupFailed("not_json", "the answer is not a JSON object")
    dropped: list[tuple[str, str]] = []
    given = answer.get("variables", {})
    if not isinstance(given, dict):
        dropped.append(("variables", "must be a JSON object"))
        given = {}
    values = {}
    for name, value in given.items():
        problem = value_problem(name, value, persona.variables)
        if problem:
            dropped.append((f"variables.{name}"[:100], problem))
        else:
            values[name] = value
    metadata = answer.get("metadata", {})
    if problem := metadata_problem(metadata):
        dropped.append(("metadata", problem))
        metadata = {}
    # Every variable has a default on a persona that answers calls (personas/validation.py).
    return CallContext(INBOUND, resolve(persona.variables, values), metadata), dropped


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


class CallerLookups:
    """Asks personas' lookups, with one HTTP session (made at the first lookup, closed by
    :meth:`close`). The signing secret is read from ``environ`` at each request, as the
    delivery worker reads it. ``on_failure(reason)``: counts a lookup that fell back."""

    def __init__(
        self,
        *,
        environ: Mapping[str, str] | None = None,
        on_failure: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.environ = os.environ if environ is None else environ
        self.on_failure = on_failure
        self._session: aiohttp.ClientSession | None = None

    async def context_for(
        self, persona: Persona, *, call_sid: str, caller: str, called: str
    ) -> CallContext:
        """An inbound call's context: the lookup's answer, else (no lookup, or it failed
        within the persona's timeout) the persona's defaults."""
        if persona.lookup is None:
            return CallContext.defaults(persona)
        started = time.monotonic()
        try:
            async with asyncio.timeout(persona.lookup.timeout_ms / 1000):
                body = await self._ask(persona, call_sid=call_sid, caller=caller, called=called)
            context, dropped = read_answer(persona, body)
        except TimeoutError:
            failure = LookupFailed("timeout", f"no answer within {persona.lookup.timeout_ms} ms")
        except LookupFailed as exc:
            failure = exc
        else:
            if dropped:  # one line, whatever the answer holds (a hostile one: thousands)
                first = [f"{field}: {reason}" for field, reason in dropped[:5]]
                log.warning("lookup_values_dropped", call_sid=call_sid, persona=persona.id,
                            count=len(dropped), first=first)  # fmt: skip
            log.info("lookup_answered", call_sid=call_sid, persona=persona.id,
                     variables=sorted(context.variables), ms=_ms_since(started))  # fmt: skip
            return context
        log.warning("lookup_failed", call_sid=call_sid, persona=persona.id,
                    reason=failure.reason, error=str(failure), ms=_ms_since(started))  # fmt: skip
        self.on_failure(failure.reason)
        return CallContext.defaults(persona)

    async def _ask(self, persona: Persona, *, call_sid: str, caller: str, called: str) -> bytes:
        assert persona.lookup is not None
        body = lookup_body(persona, call_sid=call_sid, caller=caller, called=called)
        secret = self.environ.get(persona.lookup.secret_env, "")
        try:
            headers = signature_headers("lkp_" + secrets.token_hex(12), body, secret)
        except SigningError as exc:
            raise LookupFailed(
                "unsigned", f"cannot sign with ${persona.lookup.secret_env}: {exc}"
            ) from None
        headers["Content-Type"] = "application/json"
        try:
            url = persona.lookup.url
            async with self._http().post(
                url, data=body, headers=headers, allow_redirects=False, proxy=proxy_for(url)
            ) as response:
                if not 200 <= response.status < 300:
                    raise LookupFailed("status", f"HTTP {response.status}")
                answer = await read_at_most(response, MAX_ANSWER_BYTES)
            if answer is None:
                raise LookupFailed("too_large", f"the answer is over {MAX_ANSWER_BYTES} bytes")
            return answer
        except (aiohttp.ClientError, OSError) as exc:
            # The exception's text may hold the URL, query string and all: not logged.
            raise LookupFailed("unreachable", type(exc).__name__) from None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = business_session("lookup")
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _ms_since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
