"""The routes of ``/api/v1``, their authentication, and the shell that gives every refusal the
error shape (``errors.py``).

A request names its key in ``Authorization: Bearer pa_…``. The key is read from the store at
every request (``key_store.py``: a revocation holds at once, on every instance). No key, a
malformed or unknown one, a wrong secret, a revoked key: 401 with ``WWW-Authenticate: Bearer``.
A key limited to some personas that asks about another: 403. Failed attempts are counted per
client address (the console's ``AttemptLimiter``); past the bound the address gets 429 until
its oldest failure is a minute old, without its key being looked at. The key's text is never
logged: its id is, once it has the shape of a key.

``GET /api/v1/openapi.json`` answers without a key: it describes the API, nothing of this
server's lines or calls.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, NoReturn, Protocol

from aiohttp import web

from phoneagent import strict_json
from phoneagent.api.errors import CODES, ApiError, error_response
from phoneagent.api.key_store import ApiKeyStore
from phoneagent.api.keys import ApiKey, key_id_of
from phoneagent.api.validation import invalid, outbound_request, search_limit
from phoneagent.call.context import OUTBOUND as OUTBOUND_DIRECTION
from phoneagent.call.context import ContextProblem, given_context
from phoneagent.console.auth import AttemptLimiter
from phoneagent.console.call_views import CALL_SID
from phoneagent.console.calls import SearchForm
from phoneagent.delivery.outbox import OutboxError
from phoneagent.logs import get_logger
from phoneagent.personas import Persona
from phoneagent.state import STATE

__all__ = ["API_KEYS", "OUTBOUND", "PREFIX", "Outbound", "OutboundDialer", "mount_api"]

log = get_logger(__name__)

PREFIX = "/api/v1"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Failed attempts per client address per minute. No bound over all addresses (the console has
# one): guesses at a 256-bit secret go nowhere, and such a bound would let anyone lock every
# business out of the API by failing from many addresses.
FAILURES_PER_CLIENT, FAILURE_WINDOW = 20, 60.0
SEARCH_PARAMETERS = frozenset({"number", "persona", "from", "to", "limit"})


class OutboundDialer(Protocol):
    """What places the calls ``POST /api/v1/calls`` asks for (``phoneagent/outbound/``).
    ``place`` returns the created call's fields (its ``call_sid`` at least), answered as they
    are with 201; it raises :class:`ApiError` to refuse (a persona outside its calling hours,
    its concurrency limit, a missing variable: the field it names), answered in the error
    shape."""

    async def place(
        self,
        *,
        to: str,
        persona: Persona,
        from_: str | None,
        variables: dict[str, str],
        metadata: dict[str, Any],
    ) -> dict[str, Any]: ...


@dataclass
class Outbound:
    """Where the app's outbound dialer goes: ``app[OUTBOUND].dialer = …``, before the app
    starts or at its start-up (a dialer may need what start-up makes); None: no outbound calls."""

    dialer: OutboundDialer | None = None


API_KEYS = web.AppKey("api_keys", ApiKeyStore)
OUTBOUND = web.AppKey("api_outbound", Outbound)
_LIMITER = web.AppKey("api_attempts", AttemptLimiter)
_OPENAPI = web.AppKey("api_openapi", bytes)
_KEY = web.RequestKey("api_key", ApiKey)


def mount_api(app: web.Application, store: ApiKeyStore) -> None:
    """``/api/v1`` on ``app``, its keys in ``store`` (closed with the app). The outbound dialer
    is ``app[OUTBOUND].dialer``; without one, ``POST /calls`` answers 503
    ``outbound_unavailable``."""
    app[API_KEYS] = store
    app[OUTBOUND] = Outbound()
    app[_LIMITER] = AttemptLimiter(
        per_client=FAILURES_PER_CLIENT, overall=2**62, window=FAILURE_WINDOW
    )
    app[_OPENAPI] = files("phoneagent.api").joinpath("openapi.json").read_bytes()
    app.middlewares.append(_error_shape)
    app.router.add_get(f"{PREFIX}/openapi.json", openapi_document)
    app.router.add_get(f"{PREFIX}/personas", keyed(list_personas))
    app.router.add_get(f"{PREFIX}/calls", keyed(list_calls))
    app.router.add_post(f"{PREFIX}/calls", keyed(place_call))
    app.router.add_get(f"{PREFIX}/calls/{{call_sid}}", keyed(get_call))

    async def close_store(app: web.Application) -> None:
        await store.close()

    app.on_cleanup.append(close_store)


# --- the shell --------------------------------------------------------------------------------


@web.middleware
async def _error_shape(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Under ``/api/v1``, every refusal in the error shape: ours, aiohttp's (an unknown route, a
    method not allowed, a body too large), and an unexpected exception (logged, 500)."""
    if not (request.path == PREFIX or request.path.startswith(PREFIX + "/")):
        return await handler(request)
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _AIOHTTP_CODES.get(exc.status, "invalid_request")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, code, _AIOHTTP_MESSAGES.get(code, exc.reason),
                              headers=headers)  # fmt: skip
    except Exception:
        log.exception("api_error", method=request.method, path=request.path)
        return error_response(500, "internal_error", "the server failed; it is logged")


_AIOHTTP_CODES = {status: code for code, status in CODES.items() if status in (404, 405, 413, 415)}
_AIOHTTP_MESSAGES = {
    "not_found": "no such route: see /api/v1/openapi.json",
    "method_not_allowed": "this route does not take this method (see the Allow header)",
    "payload_too_large": "the body is too large",
}


def keyed(handler: Handler) -> Handler:
    """A route that needs a valid key: it is ``request[_KEY]`` in the handler."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        request[_KEY] = await _authenticate(request)
        return await handler(request)

    return guarded


async def _authenticate(request: web.Request) -> ApiKey:
    limiter, client = request.app[_LIMITER], request.remote or "?"
    wait = limiter.wait_seconds(client)
    if wait > 0:
        request.app[STATE].metrics.http_refused.labels("api_key_limit").inc()
        log.warning("api_auth_limited", remote=client)
        seconds = str(int(wait) + 1)
        raise ApiError(429, "too_many_requests",
                       f"too many failed attempts from this address: try again in {seconds} s",
                       headers={"Retry-After": seconds})  # fmt: skip
    scheme, _, text = request.headers.get("Authorization", "").partition(" ")
    text = text.strip()
    if scheme.lower() != "bearer" or not text:
        _refuse(request, "no key")
    key_id = key_id_of(text)
    if key_id is None:
        _refuse(request, "not a key")
    try:
        key = await request.app[API_KEYS].get(key_id)
    except OutboxError as exc:
        log.warning("api_key_store_unavailable", error=str(exc))
        raise ApiError(503, "store_unavailable", "API keys cannot be read now; try again soon",
                       headers={"Retry-After": "5"}) from None  # fmt: skip
    if key is None:
        _refuse(request, "unknown key", key_id)
    if not key.matches(text):
        _refuse(request, "wrong secret", key_id)
    if key.revoked_at is not None:
        _refuse(request, "revoked", key_id)
    limiter.succeeded(client)
    return key


def _refuse(request: web.Request, reason: str, key_id: str | None = None) -> NoReturn:
    client = request.remote or "?"
    request.app[_LIMITER].failed(client)
    request.app[STATE].metrics.http_refused.labels("api_key").inc()
    log.warning("api_key_refused", reason=reason, key_id=key_id, remote=client,
                path=request.path)  # fmt: skip
    raise ApiError(401, "unauthorized",
                   "use a valid API key: Authorization: Bearer pa_… (phoneagent keys create)",
                   headers={"WWW-Authenticate": 'Bearer realm="phoneagent-api"'})  # fmt: skip


def _may_use(request: web.Request, persona_id: str, *, named_by_client: bool = True) -> None:
    """403 unless the key may use the persona. The message names it only if the client did:
    a call's persona is not for a key limited to others to learn (its persona list hides it)."""
    if not request[_KEY].allows(persona_id):
        log.warning("api_persona_forbidden", key_id=request[_KEY].id, persona=persona_id)
        which = repr(persona_id) if named_by_client else "of this call"
        raise ApiError(403, "forbidden", f"this API key may not use the persona {which}",
                       "persona")  # fmt: skip


def _json(value: Any, status: int = 200) -> web.Response:
    # UTF-8 as it is: a Chinese transcript reads as Chinese, not as \u escapes.
    return web.json_response(value, status=status, headers={"Cache-Control": "no-store"},
                             dumps=lambda v: json.dumps(v, ensure_ascii=False))  # fmt: skip


# --- the routes -------------------------------------------------------------------------------


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=request.app[_OPENAPI], content_type="application/json")


def persona_view(persona: Persona) -> dict[str, Any]:
    """A line as the API shows it: what a client needs to choose one, no secret (a webhook's
    URL may hold a token: not shown)."""
    return {
        "id": persona.id,
        "name": persona.name,
        "numbers": list(persona.numbers),
        "language": persona.language,
        "voice": persona.voice,
        "default": persona.default,
    }


async def list_personas(request: web.Request) -> web.Response:
    personas = request.app[STATE].personas.current.personas.values()
    shown = [persona_view(p) for p in personas if request[_KEY].allows(p.id)]
    return _json({"personas": sorted(shown, key=lambda p: p["id"])})


async def get_call(request: web.Request) -> web.Response:
    call_sid = request.match_info["call_sid"]
    # Anything but a CallSid is a 404 before any lookup, as in the console.
    record = (
        await request.app[STATE].calls.fetch(call_sid) if CALL_SID.fullmatch(call_sid) else None
    )
    if record is None:
        raise ApiError(404, "not_found", f"no call {call_sid}")
    _may_use(request, record.persona, named_by_client=False)
    return _json(record.as_dict())


def call_summary(record: Any) -> dict[str, Any]:
    """A call in a list: its record without the transcript and Twilio's events (read them with
    ``GET /calls/{sid}``)."""
    summary = record.as_dict()
    del summary["transcript"], summary["twilio_events"]
    return summary


async def list_calls(request: web.Request) -> web.Response:
    for name in request.query:
        if name not in SEARCH_PARAMETERS:
            raise invalid(
                name, f"unknown parameter; they are {', '.join(sorted(SEARCH_PARAMETERS))}"
            )
    form = SearchForm(request.query)  # the console's search: the same fields and checks
    if form.errors:
        name, message = next(iter(form.errors.items()))
        raise invalid(name, message)
    limit = search_limit(request.query)
    key = request[_KEY]
    if form.persona:
        _may_use(request, form.persona)
        chosen: list[str | None] = [form.persona]
    else:  # a limited key sees its personas' calls, one search each
        chosen = list(key.personas) or [None]
    calls = request.app[STATE].calls
    found = []
    for persona in chosen:
        found += await calls.search(**(form.filters | {"persona": persona}), limit=limit)
    if len(chosen) > 1:  # each search is newest first; together, by when each call started
        found.sort(key=lambda r: (r.started_at or 0.0, r.call_sid), reverse=True)
    return _json({"calls": [call_summary(r) for r in found[:limit]]})


async def place_call(request: web.Request) -> web.Response:
    body = await _json_body(request)
    call = outbound_request(body)
    _may_use(request, call.persona)
    state = request.app[STATE]
    persona = state.persona(call.persona)
    if persona is None:
        raise invalid("persona", f"no persona {call.persona!r} (GET /api/v1/personas lists them)")
    # The one check of a call's variables and metadata (the dialer's too), here before the
    # dialer is looked for. A persona without [outbound] is the dialer's to refuse, by name.
    try:
        if persona.outbound is not None:
            given_context(persona, OUTBOUND_DIRECTION, call.variables, call.metadata)
    except ContextProblem as problem:
        raise invalid(problem.field, problem.reason) from None
    dialer = request.app[OUTBOUND].dialer
    if dialer is None:
        raise ApiError(503, "outbound_unavailable", "this server does not place outbound calls")
    created = await dialer.place(
        to=call.to,
        persona=persona,
        from_=call.from_,
        variables=call.variables,
        metadata=call.metadata,
    )
    log.info("api_call_placed", key_id=request[_KEY].id, persona=persona.id,
             call_sid=created.get("call_sid"))  # fmt: skip
    return _json(created, status=201)


async def _json_body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    raw = await request.read()
    try:
        return strict_json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError too
        raise ApiError(400, "invalid_json", f"the body is not JSON: {exc}") from None
