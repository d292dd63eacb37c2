"""The one shape of every API error, and the exception that carries it.

Every answer of ``/api/v1`` that is not a success reads::

    {"error": {"code": "invalid_request", "message": "to: not an E.164 number …", "field": "to"}}

``code`` is for programs (one of ``CODES``, stable), ``message`` for people (it may change),
``field`` names the input at fault when there is one (a JSON key, ``variables.name`` inside an
object, a query parameter), else it is absent. The route shell turns aiohttp's own refusals
(an unknown route, a method not allowed, a body too large) into the same shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

__all__ = ["CODES", "ApiError", "error_response"]

#: Every code, with its status: the OpenAPI document lists the same.
CODES: Mapping[str, int] = {
    "invalid_json": 400,  # the body is not JSON
    "unauthorized": 401,  # no key, or not a valid key (unknown, wrong, revoked)
    "forbidden": 403,  # the key is limited to other personas
    "not_found": 404,  # no such route, or no such call
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "unsupported_media_type": 415,  # a body that is not application/json
    "outside_calling_hours": 409,  # the persona does not call now (its calling hours)
    "invalid_request": 422,  # a value that is wrong: ``field`` names it
    "too_many_requests": 429,  # too many failed attempts from this address: see Retry-After
    "too_many_calls": 429,  # the persona has its limit of outbound calls under way
    "internal_error": 500,
    "twilio_refused": 502,  # Twilio refused to place the call (not for a number: that is 422)
    "outbound_unavailable": 503,  # no outbound dialer on this server, or it cannot dial now
    "store_unavailable": 503,  # the key store or the database cannot be read now
}


class ApiError(Exception):
    """An API refusal. Raise it in a route (or in an outbound dialer called by one): the
    client gets ``status`` and the error shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return error_response(self.status, self.code, self.message, self.field,
                              headers=self.headers)  # fmt: skip


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    error: dict[str, str] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return web.json_response(
        {"error": error},
        status=status,
        headers={"Cache-Control": "no-store", **(headers or {})},
        dumps=lambda value: json.dumps(value, ensure_ascii=False),
    )
