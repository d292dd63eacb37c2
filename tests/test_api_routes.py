"""The HTTP API through real HTTP on loopback, against the real server app: every route found on
the running app refuses a missing, malformed, wrong, unknown or revoked key (401) and a key
limited to other personas (403); every validation error names its field; every refusal is the
one error shape; ``POST /calls`` hands what it validated to the app's outbound dialer."""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import pytest
import structlog
from aiohttp import encode_basic_auth
from api_kit import CALL_SID, OTHER_CALL_SID, api_routes, bearer, error_of, make_key

from phoneagent.api.errors import ApiError
from phoneagent.api.keys import hash_key
from phoneagent.api.routes import API_KEYS, FAILURES_PER_CLIENT, OUTBOUND, PREFIX
from phoneagent.logs import REDACTED, configure_logging
from phoneagent.personas import Persona
from phoneagent.records import Answered, StreamStarted

OPEN = {("GET", f"{PREFIX}/openapi.json")}  # the one route that needs no key
# A request of each keyed route that involves a persona the test's limited key may not use
# (None: the route involves no single persona; what it shows is checked on its own below).
# A route added later and missing here fails the test, so its persona check is decided.
FORBIDDEN = {
    ("GET", f"{PREFIX}/personas"): None,
    ("GET", f"{PREFIX}/calls"): ("GET", f"{PREFIX}/calls?persona=bright-smile-dental", None),
    ("POST", f"{PREFIX}/calls"): (
        "POST",
        f"{PREFIX}/calls",
        {"to": "+14155550199", "persona": "bright-smile-dental"},
    ),
    ("GET", f"{PREFIX}/calls/{{call_sid}}"): ("GET", f"{PREFIX}/calls/{CALL_SID}", None),
}


def filled(path: str) -> str:
    return path.replace("{call_sid}", CALL_SID)


def record_calls(stack) -> None:
    """Two calls in the server's records, as its webhooks and streams record them."""
    calls = stack.state.calls
    calls.note(CALL_SID, Answered("bright-smile-dental", "+14155550111", "+14155550100"))
    calls.note(CALL_SID, StreamStarted(time.time() - 60, "bright-smile-dental", "sess_1"))
    calls.note(OTHER_CALL_SID, Answered("trattoria-luca", "+14155550122", "+14155550142"))
    calls.note(OTHER_CALL_SID, StreamStarted(time.time() - 30, "trattoria-luca", "sess_2"))


class RecordingDialer:
    """An outbound dialer that records what it is asked and answers as a dialer would."""

    def __init__(self, refusal: Exception | None = None) -> None:
        self.placed: list[dict[str, Any]] = []
        self.refusal = refusal

    async def place(self, *, to, persona, from_, variables, metadata) -> dict[str, Any]:
        self.placed.append(dict(to=to, persona=persona, from_=from_, variables=variables,
                                metadata=metadata))  # fmt: skip
        if self.refusal is not None:
            raise self.refusal
        return {"call_sid": "CA" + "9" * 32, "status": "queued", "to": to, "persona": persona.id}


async def test_the_route_list_is_found_on_the_app(api_stack):
    routes = api_routes(api_stack)
    assert set(routes) == set(FORBIDDEN) | OPEN


async def test_every_route_refuses_a_missing_malformed_wrong_unknown_or_revoked_key(
    api_stack, client
):
    good = await make_key(api_stack)
    revoked = await make_key(api_stack)
    store = api_stack._runner.app[API_KEYS]
    await store.revoke(revoked[3:15], at=time.time())
    wrong_secret = good[:-4] + ("0000" if not good.endswith("0000") else "1111")
    unknown_id = "pa_" + "0" * 12 + good[15:]
    attempts = {
        "no header": {},
        "Basic": {"Authorization": encode_basic_auth("u", "p")},
        "empty bearer": {"Authorization": "Bearer "},
        "not a key": {"Authorization": "Bearer hello"},
        "the key in another case": bearer(good.upper()),
        "a wrong secret": bearer(wrong_secret),
        "an unknown id": bearer(unknown_id),
        "a revoked key": bearer(revoked),
        "not UTF-8": {"Authorization": "Bearer pa_\udcff"},
    }
    keyed = [route for route in api_routes(api_stack) if route not in OPEN]
    assert keyed
    with structlog.testing.capture_logs() as logs:
        for method, path in keyed:
            for what, headers in attempts.items():
                body = {"to": "+14155550199", "persona": "trattoria-luca"}
                async with client.request(
                    method, filled(path), headers=headers, json=body
                ) as response:
                    assert response.status == 401, f"{method} {path} with {what}"
                    assert response.headers["WWW-Authenticate"].startswith("Bearer")
                    assert (await error_of(response))["code"] == "unauthorized"
            # A success clears this address's failures: the next route starts afresh.
            async with client.get(f"{PREFIX}/personas", headers=bearer(good)) as response:
                assert response.status == 200
    refused = [entry for entry in logs if entry["event"] == "api_key_refused"]
    assert len(refused) == len(keyed) * len(attempts)
    assert {entry["reason"] for entry in refused} == {
        "no key", "not a key", "unknown key", "wrong secret", "revoked",
    }  # fmt: skip
    text = repr(logs)
    for secret in (good, wrong_secret, unknown_id, revoked, good[16:], revoked[16:]):
        assert secret not in text


async def test_a_key_limited_to_other_personas_gets_403_on_every_route_naming_one(
    api_stack, client
):
    record_calls(api_stack)
    api_stack._runner.app[OUTBOUND].dialer = dialer = RecordingDialer()
    limited = await make_key(api_stack, "trattoria-luca")
    for route in api_routes(api_stack):
        if route in OPEN:
            continue
        assert route in FORBIDDEN, f"{route}: decide its persona check, add it to FORBIDDEN"
        if FORBIDDEN[route] is None:
            continue
        method, path, body = FORBIDDEN[route]
        async with client.request(method, path, headers=bearer(limited), json=body) as response:
            assert response.status == 403, f"{method} {path}: {response.status}"
            error = await error_of(response)
            assert error["code"] == "forbidden"
            assert error["field"] == "persona"
    assert dialer.placed == []
    # What a limited key lists: its personas and their calls only.
    async with client.get(f"{PREFIX}/personas", headers=bearer(limited)) as response:
        assert [p["id"] for p in (await response.json())["personas"]] == ["trattoria-luca"]
    async with client.get(f"{PREFIX}/calls", headers=bearer(limited)) as response:
        assert [c["call_sid"] for c in (await response.json())["calls"]] == [OTHER_CALL_SID]
    # And its own persona's call and calls are open to it.
    async with client.get(f"{PREFIX}/calls/{OTHER_CALL_SID}", headers=bearer(limited)) as r:
        assert r.status == 200
    body = {"to": "+14155550199", "persona": "trattoria-luca"}
    async with client.post(f"{PREFIX}/calls", headers=bearer(limited), json=body) as r:
        assert r.status == 201
    # A key for two personas sees both personas' calls, newest first.
    both = await make_key(api_stack, "trattoria-luca", "bright-smile-dental")
    async with client.get(f"{PREFIX}/calls", headers=bearer(both)) as response:
        calls = (await response.json())["calls"]
    assert [c["call_sid"] for c in calls] == [OTHER_CALL_SID, CALL_SID]


async def test_a_revoked_key_is_refused_from_the_next_request(api_stack, client):
    key = await make_key(api_stack)
    async with client.get(f"{PREFIX}/personas", headers=bearer(key)) as response:
        assert response.status == 200
    await api_stack._runner.app[API_KEYS].revoke(key[3:15], at=time.time())
    async with client.get(f"{PREFIX}/personas", headers=bearer(key)) as response:
        assert response.status == 401


async def test_personas_lists_the_lines_without_secrets(api_stack, client):
    key = await make_key(api_stack)
    async with client.get(f"{PREFIX}/personas", headers=bearer(key)) as response:
        assert response.status == 200
        assert response.headers["Cache-Control"] == "no-store"
        personas = (await response.json())["personas"]
    assert [p["id"] for p in personas] == [
        "bright-smile-dental", "bright-smile-reminders", "renxin-clinic", "trattoria-luca"
    ]  # fmt: skip
    dental = personas[0]
    assert dental == {
        "id": "bright-smile-dental",
        "name": api_stack.state.persona("bright-smile-dental").name,
        "numbers": ["+14155550100"],
        "language": "en-US",
        "voice": api_stack.state.persona("bright-smile-dental").voice,
        "default": True,
    }


async def test_a_call_reads_as_get_calls_reads_it(api_stack, client):
    record_calls(api_stack)
    key = await make_key(api_stack)
    async with client.get(f"{PREFIX}/calls/{CALL_SID}", headers=bearer(key)) as response:
        assert response.status == 200
        via_api = await response.json()
    settings = api_stack.settings
    auth = encode_basic_auth(settings.twilio_account_sid, settings.twilio_auth_token)
    async with client.get(f"/calls/{CALL_SID}", headers={"Authorization": auth}) as response:
        assert await response.json() == via_api
    assert via_api["persona"] == "bright-smile-dental"
    assert via_api["caller"] == "+14155550111"
    for missing in ("CA" + "3" * 32, "not-a-sid", "CA123"):
        async with client.get(f"{PREFIX}/calls/{missing}", headers=bearer(key)) as response:
            assert response.status == 404
            assert (await error_of(response))["code"] == "not_found"


async def test_calls_are_searched_as_the_console_searches_them(api_stack, client):
    record_calls(api_stack)
    key = await make_key(api_stack)

    async def found(query: str) -> list[str]:
        async with client.get(f"{PREFIX}/calls{query}", headers=bearer(key)) as response:
            assert response.status == 200, await response.text()
            calls = (await response.json())["calls"]
        for call in calls:
            assert "transcript" not in call and "twilio_events" not in call
        return [call["call_sid"] for call in calls]

    assert await found("") == [OTHER_CALL_SID, CALL_SID]
    assert await found("?persona=bright-smile-dental") == [CALL_SID]
    assert await found("?number=%2B1%20415%20555%200122") == [OTHER_CALL_SID]
    assert await found("?limit=1") == [OTHER_CALL_SID]
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert await found(f"?from={today}&to={today}") == [OTHER_CALL_SID, CALL_SID]
    assert await found("?to=2001-01-01") == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("number=call-me", "number"),
        ("persona=../x", "persona"),
        ("from=yesterday", "from"),
        ("to=2026-13-01", "to"),
        ("from=2026-02-02&to=2026-02-01", "to"),
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=ten", "limit"),
        ("personas=x", "personas"),
    ],
)
async def test_every_search_error_names_its_parameter(api_stack, client, query, field):
    key = await make_key(api_stack)
    async with client.get(f"{PREFIX}/calls?{query}", headers=bearer(key)) as response:
        assert response.status == 422
        error = await error_of(response)
    assert error["code"] == "invalid_request"
    assert error["field"] == field
    assert error["message"].startswith(f"{field}: ")


VALID = {"to": "+14155550199", "persona": "bright-smile-dental"}  # it calls out


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"persona": "bright-smile-dental"}, "to"),
        (VALID | {"to": "4155550199"}, "to"),
        (VALID | {"to": "+1 415 555 0199"}, "to"),
        (VALID | {"to": "+0155550199"}, "to"),
        (VALID | {"to": 14155550199}, "to"),
        ({"to": "+14155550199"}, "persona"),
        (VALID | {"persona": ""}, "persona"),
        (VALID | {"persona": 7}, "persona"),
        (VALID | {"persona": "no-such-line"}, "persona"),
        (VALID | {"from": "+1"}, "from"),
        (VALID | {"from": "caller"}, "from"),
        (VALID | {"variables": ["Dana"]}, "variables"),
        (VALID | {"variables": {"caller_name": 3}}, "variables.caller_name"),
        (VALID | {"variables": {"caller_name": "Dana\r\nX-Injected: 1"}}, "variables.caller_name"),
        (VALID | {"variables": {"first_name": "Dana"}}, "variables.first_name"),  # undeclared
        (VALID | {"variables": {"first name": "Dana"}}, "variables.first name"),
        (VALID | {"variables": {"9lives": "x"}}, "variables.9lives"),
        (VALID | {"variables": {"caller_name": "x" * 501}}, "variables.caller_name"),
        (VALID | {"variables": {f"v{i}": "x" for i in range(51)}}, "variables"),
        (VALID | {"metadata": "order 7"}, "metadata"),
        (VALID | {"metadata": [1, 2]}, "metadata"),
        (VALID | {"metadata": {"blob": "x" * 4096}}, "metadata"),
        (VALID | {"callback": "https://x"}, "callback"),
    ],
)
async def test_every_call_validation_error_names_its_field(api_stack, client, body, field):
    api_stack._runner.app[OUTBOUND].dialer = dialer = RecordingDialer()
    key = await make_key(api_stack)
    async with client.post(f"{PREFIX}/calls", headers=bearer(key), json=body) as response:
        assert response.status == 422
        error = await error_of(response)
    assert error == {"code": "invalid_request", "message": error["message"], "field": field}
    assert error["message"].startswith(f"{field}: ")
    assert dialer.placed == []


async def test_a_valid_call_goes_to_the_outbound_dialer(api_stack, client):
    api_stack._runner.app[OUTBOUND].dialer = dialer = RecordingDialer()
    key = await make_key(api_stack)
    body = {
        "to": "+14155550199",
        "persona": "bright-smile-dental",
        "from": "+14155550100",
        "variables": {"caller_name": "Dana", "appointment": "giovedì"},
        "metadata": {"crm_id": 42, "tags": ["vip"], "blob": "x" * 3900},
    }
    async with client.post(f"{PREFIX}/calls", headers=bearer(key), json=body) as response:
        assert response.status == 201
        assert await response.json() == {
            "call_sid": "CA" + "9" * 32,
            "status": "queued",
            "to": "+14155550199",
            "persona": "bright-smile-dental",
        }
    [placed] = dialer.placed
    assert isinstance(placed["persona"], Persona) and placed["persona"].id == "bright-smile-dental"
    assert placed["to"] == "+14155550199" and placed["from_"] == "+14155550100"
    assert placed["variables"] == body["variables"]
    assert placed["metadata"] == body["metadata"]
    # from, variables and metadata are optional.
    minimal = {"to": "+14155550199", "persona": "trattoria-luca"}
    async with client.post(f"{PREFIX}/calls", headers=bearer(key), json=minimal) as response:
        assert response.status == 201
    assert dialer.placed[1] | {"persona": None} == {
        "to": "+14155550199", "persona": None, "from_": None, "variables": {}, "metadata": {},
    }  # fmt: skip


async def test_the_dialers_refusals_are_answered_in_the_error_shape(api_stack, client):
    key = await make_key(api_stack)
    missing = ApiError(422, "invalid_request", "variables.first_name: required by the persona",
                       "variables.first_name")  # fmt: skip
    app = api_stack._runner.app
    app[OUTBOUND].dialer = RecordingDialer(missing)
    async with client.post(f"{PREFIX}/calls", headers=bearer(key), json=VALID) as response:
        assert response.status == 422
        assert await error_of(response) == {
            "code": "invalid_request",
            "message": "variables.first_name: required by the persona",
            "field": "variables.first_name",
        }
    app[OUTBOUND].dialer = RecordingDialer(RuntimeError("secret internals"))
    async with client.post(f"{PREFIX}/calls", headers=bearer(key), json=VALID) as response:
        assert response.status == 500
        error = await error_of(response)
        assert error["code"] == "internal_error" and "secret" not in error["message"]
    app[OUTBOUND].dialer = None
    async with client.post(f"{PREFIX}/calls", headers=bearer(key), json=VALID) as response:
        assert response.status == 503
        assert (await error_of(response))["code"] == "outbound_unavailable"


async def test_bodies_that_are_not_a_json_object(api_stack, client):
    api_stack._runner.app[OUTBOUND].dialer = RecordingDialer()
    key = await make_key(api_stack)
    url = f"{PREFIX}/calls"
    json_type = {"Content-Type": "application/json"}
    cases = [
        (b'{"to": ', json_type, 400, "invalid_json"),
        (b'{"to": NaN}', json_type, 400, "invalid_json"),
        (b"\xff\xfe", json_type, 400, "invalid_json"),
        (b'["+14155550199"]', json_type, 422, "invalid_request"),
        (b"null", json_type, 422, "invalid_request"),
        (json.dumps(VALID).encode(), {"Content-Type": "text/plain"}, 415,
         "unsupported_media_type"),
        (b"{}", {}, 415, "unsupported_media_type"),
        (b'{"to": "' + b"1" * 70_000 + b'"}', json_type, 413, "payload_too_large"),
    ]  # fmt: skip
    for body, headers, status, code in cases:
        async with client.post(url, data=body, headers=bearer(key) | headers) as response:
            assert response.status == status, body[:20]
            assert (await error_of(response))["code"] == code


async def test_unknown_routes_and_methods_answer_in_the_error_shape(api_stack, client):
    key = await make_key(api_stack)
    for headers in ({}, bearer(key)):
        async with client.get(f"{PREFIX}/nothing-here", headers=headers) as response:
            assert response.status == 404
            assert (await error_of(response))["code"] == "not_found"
        async with client.get(PREFIX, headers=headers) as response:
            assert response.status == 404
            assert (await error_of(response))["code"] == "not_found"
        async with client.delete(f"{PREFIX}/calls", headers=headers) as response:
            assert response.status == 405
            assert set(response.headers["Allow"].split(",")) >= {"GET", "POST"}
            assert (await error_of(response))["code"] == "method_not_allowed"


async def test_the_openapi_document_needs_no_key(api_stack, client):
    async with client.get(f"{PREFIX}/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        document = await response.json()
    assert document["openapi"].startswith("3.1")


async def test_failed_attempts_from_one_address_are_limited(api_stack, client):
    good = await make_key(api_stack)
    for _ in range(FAILURES_PER_CLIENT):
        async with client.get(f"{PREFIX}/personas", headers=bearer("pa_nope")) as response:
            assert response.status == 401
    # Past the bound, the address waits; its key is not even looked at meanwhile.
    for headers in (bearer("pa_nope"), bearer(good)):
        async with client.get(f"{PREFIX}/personas", headers=headers) as response:
            assert response.status == 429
            assert 1 <= int(response.headers["Retry-After"]) <= 61
            assert (await error_of(response))["code"] == "too_many_requests"
    # The document stays open.
    async with client.get(f"{PREFIX}/openapi.json") as response:
        assert response.status == 200
    async with client.get(api_stack.metrics_url) as response:
        scrape = await response.text()
    assert f'phoneagent_http_refused_total{{reason="api_key"}} {FAILURES_PER_CLIENT}.0' in scrape
    assert 'phoneagent_http_refused_total{reason="api_key_limit"} 2.0' in scrape


async def test_the_key_store_holds_only_the_keys_hash(api_stack):
    text = await make_key(api_stack, name="crm")
    files = api_stack.settings.data_dir.glob("api_keys.sqlite3*")  # the -wal file too
    data = b"".join(path.read_bytes() for path in files)
    assert text.encode() not in data and text[16:].encode() not in data
    assert hash_key(text).encode() in data


@pytest.mark.parametrize("log_format", ["json", "console"])
async def test_no_log_line_at_any_level_holds_a_key(api_stack, client, log_format):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    structlog_config = structlog.get_config()  # restored: later tests read the default's output
    stream = io.StringIO()
    configure_logging(log_format, "debug", secrets=())
    root.handlers[0].setStream(stream)
    try:
        good = await make_key(api_stack)
        revoked = await make_key(api_stack)
        await api_stack._runner.app[API_KEYS].revoke(revoked[3:15], at=time.time())
        wrong = good[:-1] + ("1" if good[-1] == "0" else "0")
        for text in (good, revoked, wrong):
            # In the header, and (a client's mistake) in the URL's path and query too.
            for url in (f"{PREFIX}/personas?key={text}", f"{PREFIX}/calls/{text}"):
                async with client.get(url, headers=bearer(text)) as response:
                    assert response.status in (200, 401, 404)
        logger = structlog.get_logger("phoneagent.test")
        logger.info("a_key_in_a_field", note=f"key is {good}")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**structlog_config)
    output = stream.getvalue()
    assert "api_key_refused" in output and "http_request" in output
    for text in (good, revoked, wrong):
        assert text[16:] not in output
    assert f"key is {good[:16]}{REDACTED}" in output  # the id stays: it names the key
