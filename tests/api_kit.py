"""The API's test kit: a server on loopback (the real app, the test kit's stack), keys made in
its store, and a client. Test modules import what they use from here."""

from __future__ import annotations

import json
import time
from importlib.resources import files
from typing import Any

import aiohttp
import jsonschema
import pytest
from conftest import EXAMPLE_PERSONAS

from phoneagent.api.keys import new_key
from phoneagent.api.routes import API_KEYS, PREFIX
from phoneagent.testing.stack import LocalStack

CALL_SID = "CA" + "1" * 32  # a call of bright-smile-dental
OTHER_CALL_SID = "CA" + "2" * 32  # a call of trattoria-luca
DOCUMENT = json.loads(files("phoneagent.api").joinpath("openapi.json").read_text())


def schema_check(name: str, instance: object) -> None:
    """``instance`` against the OpenAPI document's schema ``name`` (its $refs resolved in the
    document): JSON Schema 2020-12, the dialect of OpenAPI 3.1."""
    root = DOCUMENT | {"$ref": f"#/components/schemas/{name}"}
    jsonschema.Draft202012Validator(root).validate(instance)


@pytest.fixture
async def api_stack():
    async with LocalStack(EXAMPLE_PERSONAS) as stack:
        yield stack


@pytest.fixture
async def client(api_stack):
    async with aiohttp.ClientSession(base_url=api_stack.base_url) as session:
        yield session


async def make_key(stack: LocalStack, *personas: str, name: str = "test") -> str:
    """A key in the server's own store (as `phoneagent keys create` makes one); its text."""
    key, text = new_key(name, personas, now=time.time())
    await stack._runner.app[API_KEYS].add(key)
    return text


def bearer(text: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {text}"}


def api_routes(stack: LocalStack) -> list[tuple[str, str]]:
    """(method, path pattern) of every route under /api/v1 on the running app, HEAD aside."""
    found = []
    for resource in stack._runner.app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info.get("formatter", "")
        if not path.startswith(PREFIX + "/"):
            continue
        found += [(route.method, path) for route in resource if route.method != "HEAD"]
    return sorted(set(found))


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The error shape's inside, checked: code and message, and nothing but field besides."""
    assert response.content_type == "application/json", await response.text()
    body = await response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    assert set(error) <= {"code", "message", "field"}, error
    return error
