"""The OpenAPI document (``phoneagent/api/openapi.json``) against the running app: every route
under /api/v1 is in it with the same methods and vice versa, it is a valid OpenAPI 3.1
document, its error codes are the server's, and real answers match its schemas."""

from __future__ import annotations

import time

import jsonschema
import openapi_spec_validator
import pytest
from api_kit import CALL_SID, DOCUMENT, api_routes, bearer, make_key, schema_check

from phoneagent.api.errors import CODES
from phoneagent.api.routes import PREFIX
from phoneagent.records import Answered, StreamStarted, TurnFinished

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def documented_routes() -> list[tuple[str, str]]:
    (server,) = DOCUMENT["servers"]
    return sorted(
        (method.upper(), server["url"] + path)
        for path, item in DOCUMENT["paths"].items()
        for method in item
        if method in METHODS
    )


def test_the_document_is_valid_openapi_3_1():
    openapi_spec_validator.validate(DOCUMENT)  # raises, naming what is wrong
    assert DOCUMENT["openapi"] == "3.1.0"


async def test_the_document_names_exactly_the_apps_routes(api_stack):
    assert documented_routes() == api_routes(api_stack)


def test_every_keyed_route_documents_401_and_only_the_document_is_open():
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            if path == "/openapi.json":
                assert operation["security"] == []
            else:
                assert "security" not in operation  # the document's default: the key
                assert "401" in operation["responses"], f"{method} {path}"
    assert DOCUMENT["security"] == [{"apiKey": []}]
    scheme = DOCUMENT["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")


def test_the_error_codes_are_the_servers():
    error = DOCUMENT["components"]["schemas"]["Error"]["properties"]["error"]
    assert sorted(error["properties"]["code"]["enum"]) == sorted(CODES)


async def test_real_answers_match_the_documents_schemas(api_stack, client):
    calls = api_stack.state.calls
    calls.note(CALL_SID, Answered("bright-smile-dental", "+14155550111", "+14155550100"))
    calls.note(CALL_SID, StreamStarted(time.time(), "bright-smile-dental", "sess_1"))
    turn = {"role": "caller", "text": "hello", "start_ms": 0, "end_ms": 900}
    calls.note(CALL_SID, TurnFinished(turn))
    key = await make_key(api_stack)

    async def get(path: str) -> object:
        async with client.get(PREFIX + path, headers=bearer(key)) as response:
            return await response.json()

    schema_check("Persona", (await get("/personas"))["personas"][0])
    for call in (await get("/calls"))["calls"]:
        schema_check("CallSummary", call)
    schema_check("Call", await get(f"/calls/{CALL_SID}"))
    schema_check("Error", await get("/calls?limit=0"))
    schema_check("Error", await get("/nothing"))
    with pytest.raises(jsonschema.ValidationError):  # the check can fail
        schema_check("Error", {"error": {"code": "not_found"}})

    # POST /calls's answers are checked against the document where a real dialer places the
    # call (test_outbound_api_e2e.py); the request's schema is the document's own example here.
    schema_check("CallRequest", {"to": "+14155550199", "persona": "bright-smile-dental",
                                 "variables": {"caller_name": "Dana"}})  # fmt: skip
