"""A fake Twilio REST API on loopback: the Call resource's create, fetch and update (reference
§5.1; create: https://www.twilio.com/docs/voice/api/call-resource#create-a-call-resource).

It answers what ``twilio.rest.Client`` sends for ``client.calls(sid).update(...)`` and
``.fetch()`` — ``POST``/``GET /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`` with HTTP
basic auth (account SID : auth token) — with Twilio's JSON call resource, or with Twilio's JSON
error body ``{"code", "message", "more_info", "status"}``, which the library turns into a
``TwilioRestException`` carrying ``status`` and ``code`` (``twilio/base/version.py``).

Pointing the real ``twilio`` client at the fake
-----------------------------------------------
Every Call request goes through the ``api`` domain, whose ``base_url`` (normally
``https://api.twilio.com``) is read on each request (``twilio/base/domain.py``), so replacing
it is enough::

    from twilio.http.async_http_client import AsyncTwilioHttpClient
    from twilio.rest import Client

    client = Client(account_sid, auth_token, http_client=AsyncTwilioHttpClient())
    client.api.base_url = fake.base_url          # e.g. "http://127.0.0.1:43127"
    await client.calls(call_sid).update_async(twiml="<Response><Hangup/></Response>")
    await client.http_client.close()

(:meth:`FakeTwilioApi.client` does exactly this.) Leave ``TWILIO_EDGE`` / ``TWILIO_REGION`` unset
(or pass ``edge``/``region`` as None): with either set, the client rewrites the host to
``api.{edge}.{region}.twilio.com`` (``ClientBase.get_hostname``). The product does the same with
its ``TWILIO_API_BASE_URL`` setting.

What Twilio does that the fake reproduces
-----------------------------------------
* ``Twiml`` and ``Url`` are mutually exclusive; inline TwiML is at most 4000 characters (32018);
  ``action`` URLs in inline TwiML must be absolute (15004). §5.1.
* ``Status=completed`` ends the call; ``canceled`` only affects queued or ringing calls. §5.1.
* Redirecting or ending a call that is no longer in progress fails with 21220 ("Call is not
  in-progress. Cannot redirect.", HTTP 400 — the status and text are as reported from the field).
* A successful TwiML/URL replacement or ``completed`` makes Twilio send ``stop`` on the media
  stream and close it (§5.1, §7): :meth:`FakeTwilioApi.attach` wires a :class:`TwilioCaller` so
  that it does exactly that.

Calls create (outbound calls), from Twilio's Call resource and Answering Machine Detection docs:

* ``To`` and ``From`` are required (21201 "No 'To' number is specified", 21213 "No 'From'
  number is specified"), and one of ``Url``, ``Twiml`` or ``ApplicationSid``; a phone number is
  E.164 (21211 Invalid 'To' Phone Number, 21212 Invalid 'From' Phone Number); ``From`` must be
  a number on the account or a verified caller ID (21210). ``MachineDetection`` is ``Enable``
  or ``DetectMessageEnd``; ``StatusCallbackEvent`` values are ``initiated``, ``ringing``,
  ``answered``, ``completed``. The answer is 201 with the call resource, ``status`` "queued",
  ``direction`` "outbound-api" (tests/fixtures/twilio/call-create-response.json: Twilio's
  documented sample).
* Test controls play the far end: :meth:`FakeTwilioApi.answer` (the callee picks up: the
  progress callbacks, then the ``Url`` requested, signed, with ``AnsweredBy`` when detection is
  on; a :class:`TwilioCaller` is returned to open the stream if the TwiML says so),
  :meth:`FakeTwilioApi.finish` (the call ends: busy, no-answer, failed, canceled or completed,
  with its signed status callback).

Assumptions where the docs are silent (change them if a live call says otherwise): ``Twiml``
with ``Url`` answers 400 with code 21200 (the Calls-resource catch-all); TwiML that does not
parse answers 400 with 12100; an unknown ``Status`` value answers 400 with 20001; a path naming
another account answers 404 (20404). Calls create without ``Url``, ``Twiml`` or
``ApplicationSid``, or with a ``Url`` that is not absolute http(s), answers 400 with 21205
(Invalid URL); an unknown ``MachineDetection`` or ``StatusCallbackEvent`` value answers 400 with
21200.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from yarl import URL

from phoneagent.testing.twilio_sids import new_sid
from phoneagent.testing.twilio_signing import Signature, signature_headers
from phoneagent.testing.webhook_sink import LoopbackServer, wait_for_count

if TYPE_CHECKING:
    from twilio.rest import Client

    from phoneagent.testing.caller import TwilioCaller

__all__ = [
    "CALL_NOT_IN_PROGRESS",
    "ApiRequest",
    "CallCreate",
    "CallUpdate",
    "FakeCall",
    "FakeNumber",
    "FakeTwilioApi",
    "TwilioApiError",
]

API_VERSION = "2010-04-01"
TWIML_MAX_CHARS = 4000  # §5.1, error 32018
ENDED_STATUSES = frozenset({"completed", "canceled", "failed", "busy", "no-answer"})


@dataclass(frozen=True)
class TwilioApiError:
    """An error as Twilio's REST API returns it: HTTP status, Twilio code, message."""

    status: int
    code: int
    message: str

    def body(self) -> dict[str, Any]:
        """Twilio's JSON error shape (what ``twilio.base.version.Version.exception`` parses)."""
        return {
            "code": self.code,
            "message": self.message,
            "more_info": f"https://www.twilio.com/docs/errors/{self.code}",
            "status": self.status,
        }


AUTHENTICATE = TwilioApiError(401, 20003, "Authenticate")
CALL_NOT_IN_PROGRESS = TwilioApiError(400, 21220, "Call is not in-progress. Cannot redirect.")
TWIML_TOO_LONG = TwilioApiError(
    400, 32018, "Twiml size exceeded maximum allowed value of 4000 characters"
)
TWIML_AND_URL = TwilioApiError(400, 21200, "Twiml and Url parameters are mutually exclusive")
RELATIVE_ACTION = TwilioApiError(
    400,
    15004,
    "Action Callback URL must be an absolute URL when using TwiML to update in-progress calls",
)
INTERNAL_ERROR = TwilioApiError(500, 20500, "Internal Server Error")
NO_TO = TwilioApiError(400, 21201, "No 'To' number is specified")
NO_FROM = TwilioApiError(400, 21213, "No 'From' number is specified")
INVALID_TO = TwilioApiError(400, 21211, "Invalid 'To' Phone Number")
INVALID_FROM = TwilioApiError(400, 21212, "Invalid 'From' Phone Number")
FROM_NOT_VERIFIED = TwilioApiError(
    400, 21210, "The source phone number provided, From, is not yet verified for your account"
)
INVALID_URL = TwilioApiError(400, 21205, "Url parameter is required and must be a valid URL")
MACHINE_DETECTION = ("Enable", "DetectMessageEnd")
STATUS_CALLBACK_EVENTS = ("initiated", "ringing", "answered", "completed")
# What a Calls create may dial besides a phone number (Call resource: To).
_NON_PHONE = ("sip:", "client:")
_E164 = re.compile(r"\+[1-9]\d{1,14}")


def _endpoint(number: str) -> bool:
    return number.startswith(_NON_PHONE) or _E164.fullmatch(number) is not None


async def _post_signed(
    auth_token: str, url: str, params: dict[str, str], session: aiohttp.ClientSession | None
) -> int:
    """POST a form to our server as Twilio does, signed with the account's auth token."""
    headers = {"User-Agent": "TwilioProxy/1.1", **signature_headers(Signature.VALID, auth_token,
                                                                    url, params)}  # fmt: skip
    own = session is None
    http = session or aiohttp.ClientSession()
    try:
        async with http.post(URL(url, encoded=True), data=params, headers=headers) as response:
            return response.status
    finally:
        if own:
            await http.close()


def _not_found(path: str) -> TwilioApiError:
    return TwilioApiError(404, 20404, f"The requested resource {path} was not found")


def _rfc2822(moment: datetime | None) -> str | None:
    return format_datetime(moment) if moment else None  # Twilio's "Tue, 31 Aug 2010 … +0000"


@dataclass
class FakeCall:
    """One call the fake knows about, and what was done to it."""

    sid: str
    account_sid: str
    from_: str = "+14155550123"
    to: str = "+15550001111"
    status: str = "in-progress"
    direction: str = "inbound"
    twiml: str | None = None  # the TwiML now running, after an update
    url: str | None = None
    # Calls create: where Twilio reports the call's progress, which events, and its detection.
    status_callback: str | None = None
    status_callback_events: tuple[str, ...] = ("completed",)
    machine_detection: str | None = None
    answered_by: str | None = None
    sequence: int = 0  # SequenceNumber of the status callbacks sent
    date_created: datetime = field(default_factory=lambda: datetime.now(UTC))
    end_time: datetime | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED_STATUSES

    def end(self, status: str = "completed") -> None:
        self.status = status
        self.end_time = self.end_time or datetime.now(UTC)

    def resource(self) -> dict[str, Any]:
        """The call as Twilio's JSON call resource (fields of ``CallInstance``)."""
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{self.sid}"
        duration = None
        if self.end_time is not None:
            duration = str(int((self.end_time - self.date_created).total_seconds()))
        return {
            "sid": self.sid,
            "account_sid": self.account_sid,
            "parent_call_sid": None,
            "date_created": _rfc2822(self.date_created),
            "date_updated": _rfc2822(datetime.now(UTC)),
            "to": self.to,
            "to_formatted": self.to,
            "from": self.from_,
            "from_formatted": self.from_,
            "phone_number_sid": None,
            "status": self.status,
            "start_time": _rfc2822(self.date_created),
            "end_time": _rfc2822(self.end_time),
            "duration": duration,
            "price": None,
            "price_unit": "USD",
            "direction": self.direction,
            "answered_by": self.answered_by,
            "api_version": API_VERSION,
            "forwarded_from": None,
            "group_sid": None,
            "caller_name": None,
            "queue_time": "0",
            "trunk_sid": None,
            "uri": uri + ".json",
            "subresource_uris": {
                name: f"{uri}/{name.title().replace('_', '')}.json"
                for name in (
                    "notifications",
                    "recordings",
                    "payments",
                    "events",
                    "siprec",
                    "streams",
                    "user_defined_message_subscriptions",
                    "user_defined_messages",
                )
            },
        }


@dataclass(frozen=True)
class CallUpdate:
    """One update request to a call, and how the fake answered it."""

    call_sid: str
    params: dict[str, str]
    at: float  # time.monotonic()
    status: int  # HTTP status answered
    error_code: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def ends_stream(self) -> bool:
        """True when Twilio would stop the call's media stream because of this update (§5.1)."""
        replaces_twiml = "Twiml" in self.params or "Url" in self.params
        return self.ok and (replaces_twiml or self.params.get("Status") == "completed")


@dataclass(frozen=True)
class CallCreate:
    """One Calls create request (its form, ``StatusCallbackEvent`` as the list it repeats),
    and how the fake answered it."""

    params: dict[str, str]
    status_callback_events: list[str]
    at: float
    status: int
    error_code: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == 201


@dataclass(frozen=True)
class ApiRequest:
    """Any request the fake received: method, path, when, the status answered."""

    method: str
    path: str
    at: float
    status: int


UpdateHook = Callable[[CallUpdate], Awaitable[None] | None]


@dataclass
class _Fault:
    remaining: int
    error: TwilioApiError | None = None
    delay: float = 0.0


class FakeTwilioApi(LoopbackServer):
    """Twilio's Call resource (fetch, update) with call state, fault injection and stream hooks.

    :param auto_create_calls: a call SID seen for the first time is an in-progress call (else
        404, and tests register calls with :meth:`add_call`).
    :param ended_call_error: the answer to updating a call that has ended; None answers 200
        with the unchanged resource instead.
    """

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        auto_create_calls: bool = True,
        ended_call_error: TwilioApiError | None = CALL_NOT_IN_PROGRESS,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.auto_create_calls = auto_create_calls
        self.ended_call_error = ended_call_error
        self.calls: dict[str, FakeCall] = {}
        self.updates: list[CallUpdate] = []
        self.requests: list[ApiRequest] = []
        self._faults: list[_Fault] = []
        self._hooks: dict[str, list[UpdateHook]] = {}
        self._hook_tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()
        # The Account and IncomingPhoneNumber resources (``phoneagent doctor`` reads them).
        self.account_status = "active"
        self.account_type = "Full"
        self.numbers: dict[str, FakeNumber] = {}
        # Calls create: every request, the verified caller IDs, the status callbacks sent
        # (call sid, event, CallStatus, the HTTP status our server answered).
        self.created: list[CallCreate] = []
        self.verified_caller_ids: set[str] = set()
        self.callbacks: list[tuple[str, str, str, int]] = []

    # -- test controls ------------------------------------------------------------------------

    def add_call(self, call_sid: str | None = None, **fields: Any) -> FakeCall:
        """Register a call (in progress unless ``status=`` says otherwise)."""
        call = FakeCall(sid=call_sid or new_sid("CA"), account_sid=self.account_sid, **fields)
        self.calls[call.sid] = call
        return call

    def add_number(self, phone_number: str, **fields: Any) -> FakeNumber:
        """Put ``phone_number`` (E.164) on the account, e.g. ``voice_url=…``, ``voice_method=…``."""
        number = FakeNumber(phone_number=phone_number, account_sid=self.account_sid, **fields)
        self.numbers[phone_number] = number
        return number

    def verify_caller_id(self, number: str) -> None:
        """A number the account verified as an outgoing caller ID (Calls create's From)."""
        self.verified_caller_ids.add(number)

    async def wait_for_created(self, count: int = 1, timeout: float = 10.0) -> list[CallCreate]:
        """Wait until ``count`` Calls create requests were answered; return them all."""
        await wait_for_count(self.created, count, self._changed, timeout, "calls created")
        return self.created

    async def answer(
        self,
        call_sid: str,
        answered_by: str = "human",
        *,
        session: aiohttp.ClientSession | None = None,
        **caller_options: Any,
    ) -> TwilioCaller:
        """The callee of a created call picks up: Twilio reports ``ringing`` and ``answered``
        (if asked), then requests the call's ``Url`` (signed, ``AnsweredBy`` when detection is
        on). The returned caller holds the TwiML answer (:attr:`TwilioCaller.answer`); if it
        is ``<Connect><Stream>``, ``await caller.connect()`` opens the stream as the callee.
        Any other answer is run to its end: the call completes, with its status callback."""
        from phoneagent.testing.caller import TwilioCaller

        call = self._call(call_sid)
        if call.url is None:
            raise ValueError("the call was created without a Url: nothing to request")
        await self._progress(call, "ringing", "ringing", session)
        call.status = "in-progress"
        call.answered_by = answered_by if call.machine_detection else None
        await self._progress(call, "in-progress", "answered", session)
        public = urlsplit(call.url)
        caller = TwilioCaller(
            f"{public.scheme}://{public.netloc}",
            account_sid=self.account_sid,
            auth_token=self.auth_token,
            to=call.to,
            from_=call.from_,
            call_sid=call.sid,
            session=session,
            **caller_options,
        )
        self.attach(caller)
        answer = await caller.pick_up(call.url, call.answered_by)
        if answer.stream_url is None:  # <Say>, <Hangup>: the call ends once it has run
            await self.finish(call_sid, "completed", session=session)
        return caller

    async def finish(
        self,
        call_sid: str,
        status: str = "completed",
        *,
        session: aiohttp.ClientSession | None = None,
    ) -> int | None:
        """The call ends on Twilio's side with ``status`` (``busy``, ``no-answer``, ``failed``,
        ``canceled`` or ``completed``): its ``completed`` status callback is sent, signed, as
        Twilio does for each of them. Returns the callback's HTTP status (None: none asked)."""
        if status not in ENDED_STATUSES:
            raise ValueError(f"not a final CallStatus: {status}")
        call = self._call(call_sid)
        call.end(status)
        return await self._progress(call, status, "completed", session)

    async def _progress(
        self,
        call: FakeCall,
        call_status: str,
        event: str,
        session: aiohttp.ClientSession | None,
    ) -> int | None:
        """The status callback of ``event`` (if the call asked for it) with ``call_status``."""
        if call.status_callback is None or event not in call.status_callback_events:
            return None
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": call.sid,
            "CallStatus": call_status,
            "Called": call.to,
            "Caller": call.from_,
            "Direction": call.direction,
            "From": call.from_,
            "To": call.to,
            "CallbackSource": "call-progress-events",
            "SequenceNumber": str(call.sequence),
            "Timestamp": format_datetime(datetime.now(UTC)),
        }
        call.sequence += 1
        if event == "completed":
            params["CallDuration"] = str(
                int(((call.end_time or datetime.now(UTC)) - call.date_created).total_seconds())
            )
        if call.answered_by:
            params["AnsweredBy"] = call.answered_by
        status = await _post_signed(self.auth_token, call.status_callback, params, session)
        self.callbacks.append((call.sid, event, call_status, status))
        return status

    def end_call(self, call_sid: str, status: str = "completed") -> None:
        """The call ended on Twilio's side (caller hung up): later updates get 21220."""
        self._call(call_sid).end(status)

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = INTERNAL_ERROR.status,
        code: int = INTERNAL_ERROR.code,
        message: str = INTERNAL_ERROR.message,
    ) -> None:
        """Answer the next ``count`` requests with this error instead of handling them."""
        self._faults.append(_Fault(count, error=TwilioApiError(status, code, message)))

    def delay_next(self, count: int = 1, *, seconds: float = 30.0) -> None:
        """Hold the next ``count`` requests for ``seconds`` before handling them (timeouts)."""
        self._faults.append(_Fault(count, delay=seconds))

    def on_update(self, call_sid: str, hook: UpdateHook) -> None:
        """Call ``hook(update)`` (sync or async) after each update request to ``call_sid``."""
        self._hooks.setdefault(call_sid, []).append(hook)

    def attach(self, caller: TwilioCaller) -> None:
        """Make ``caller`` receive Twilio's ``stop`` and close when its call's TwiML is replaced
        or the call is completed through the API (§5.1, §7)."""

        async def stop_stream(update: CallUpdate) -> None:
            if update.ends_stream:
                if "Twiml" in update.params:
                    caller.run_instead(update.params["Twiml"])
                await caller.receive_stop_from_twilio()
                if update.params.get("Status") == "completed":
                    caller.end_call()

        self.on_update(caller.call_sid, stop_stream)
        # The call ends with its stream unless TwiML follows (§1.3): then updates get 21220.
        caller.on_call_ended = lambda: self.end_call(caller.call_sid)

    async def wait_for_updates(self, count: int, timeout: float = 10.0) -> list[CallUpdate]:
        """Wait until ``count`` update requests were answered; return all updates so far."""
        await wait_for_count(self.updates, count, self._changed, timeout, "call updates")
        return self.updates

    async def settle(self) -> None:
        """Wait for the hooks started by past updates (e.g. a caller's stop) to finish."""
        if self._hook_tasks:
            await asyncio.gather(*self._hook_tasks, return_exceptions=True)

    def client(self, **client_options: Any) -> Client:
        """A real ``twilio.rest.Client`` on ``AsyncTwilioHttpClient``, pointed at this fake.

        Close it with ``await client.http_client.close()``.
        """
        from twilio.http.async_http_client import AsyncTwilioHttpClient
        from twilio.rest import Client

        client = Client(
            self.account_sid,
            self.auth_token,
            http_client=AsyncTwilioHttpClient(),
            **client_options,
        )
        client.api.base_url = self.base_url
        return client

    async def stop(self) -> None:
        await self.settle()
        await super().stop()

    # -- the HTTP side ------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application()
        path = f"/{API_VERSION}/Accounts/{{account_sid}}/Calls/{{call_sid}}.json"
        app.router.add_get(path, self._fetch)
        app.router.add_post(path, self._update)
        app.router.add_post(f"/{API_VERSION}/Accounts/{{account_sid}}/Calls.json", self._create)
        _add_account_routes(app, self)
        return app

    async def _fetch(self, request: web.Request) -> web.Response:
        error = await self._precheck(request)
        if error is None:
            call = self._lookup(request.match_info["call_sid"])
            if call is not None:
                return self._answer(request, 200, call.resource())
            error = _not_found(request.path)
        return self._answer(request, error.status, error.body())

    async def _update(self, request: web.Request) -> web.Response:
        params = {key: str(value) for key, value in (await request.post()).items()}
        call_sid = request.match_info["call_sid"]
        error = await self._precheck(request)
        call = None if error else self._lookup(call_sid)
        if error is None:
            error = _not_found(request.path) if call is None else self._apply(call, params)
        status = error.status if error else 200
        update = CallUpdate(call_sid, params, time.monotonic(), status, error and error.code)
        self.updates.append(update)
        async with self._changed:
            self._changed.notify_all()
        self._run_hooks(update)
        return self._answer(request, status, error.body() if error else call.resource())

    async def _create(self, request: web.Request) -> web.Response:
        params = await request.post()
        error = await self._precheck(request)
        call = None
        if error is None:
            call, error = self._place(params)
        status = error.status if error else 201
        self.created.append(CallCreate({k: str(v) for k, v in params.items()},
                                       params.getall("StatusCallbackEvent", []),
                                       time.monotonic(), status, error and error.code))  # fmt: skip
        async with self._changed:
            self._changed.notify_all()
        return self._answer(request, status, error.body() if error else call.resource())

    def _place(self, params: Any) -> tuple[FakeCall | None, TwilioApiError | None]:
        """Validate a Calls create as Twilio does, then queue the call."""
        to, from_ = params.get("To", ""), params.get("From", "")
        url, twiml = params.get("Url"), params.get("Twiml")
        if not to:
            return None, NO_TO
        if not from_:
            return None, NO_FROM
        if not _endpoint(to):
            return None, INVALID_TO
        if not _endpoint(from_):
            return None, INVALID_FROM
        if from_ not in self.numbers and from_ not in self.verified_caller_ids:
            return None, FROM_NOT_VERIFIED
        if url is None and twiml is None and params.get("ApplicationSid") is None:
            return None, INVALID_URL
        if url is not None and twiml is not None:
            return None, TWIML_AND_URL
        if url is not None and (urlsplit(url).scheme not in ("http", "https") or
                                not urlsplit(url).netloc):  # fmt: skip
            return None, INVALID_URL
        if twiml is not None and (error := _check_inline_twiml(twiml)) is not None:
            return None, error
        detection = params.get("MachineDetection")
        if detection is not None and detection not in MACHINE_DETECTION:
            return None, TwilioApiError(400, 21200, f"Invalid MachineDetection: {detection}")
        events = params.getall("StatusCallbackEvent", [])
        unknown = [e for e in events if e not in STATUS_CALLBACK_EVENTS]
        if unknown:
            return None, TwilioApiError(400, 21200, f"Invalid StatusCallbackEvent: {unknown[0]}")
        call = self.add_call(
            to=to,
            from_=from_,
            status="queued",
            direction="outbound-api",
            url=url,
            twiml=twiml,
            status_callback=params.get("StatusCallback"),
            status_callback_events=tuple(events) or ("completed",),
            machine_detection=detection,
        )
        return call, None

    async def _precheck(self, request: web.Request) -> TwilioApiError | None:
        """Injected faults, then basic auth, then the account in the path."""
        fault = self._take_fault()
        if fault is not None and fault.delay:
            await asyncio.sleep(fault.delay)
        if fault is not None and fault.error is not None:
            return fault.error
        if _basic_credentials(request) != (self.account_sid, self.auth_token):
            return AUTHENTICATE
        if request.match_info["account_sid"] != self.account_sid:
            return _not_found(request.path)
        return None

    def _apply(self, call: FakeCall, params: dict[str, str]) -> TwilioApiError | None:
        """Validate an update as Twilio does, then change the call's state (§5.1)."""
        twiml, url, status = params.get("Twiml"), params.get("Url"), params.get("Status")
        if twiml is not None and url is not None:
            return TWIML_AND_URL
        if twiml is not None:
            error = _check_inline_twiml(twiml)
            if error is not None:
                return error
        if status is not None and status not in ("completed", "canceled"):
            return TwilioApiError(400, 20001, f"Invalid Status: {status}")
        if call.ended:
            if self.ended_call_error is not None:
                return self.ended_call_error
            return None
        if twiml is not None or url is not None:
            call.twiml, call.url = twiml, url
        if status == "completed" or (status == "canceled" and call.status in ("queued", "ringing")):
            call.end(status)
        return None

    def _answer(self, request: web.Request, status: int, body: dict[str, Any]) -> web.Response:
        self.requests.append(ApiRequest(request.method, request.path, time.monotonic(), status))
        headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if status == 401 else None
        return web.json_response(body, status=status, headers=headers)

    def _take_fault(self) -> _Fault | None:
        if not self._faults:
            return None
        fault = self._faults[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            self._faults.pop(0)
        return replace(fault)

    def _lookup(self, call_sid: str) -> FakeCall | None:
        if call_sid not in self.calls and self.auto_create_calls:
            self.add_call(call_sid)
        return self.calls.get(call_sid)

    def _call(self, call_sid: str) -> FakeCall:
        call = self._lookup(call_sid)
        if call is None:
            raise KeyError(f"unknown call {call_sid}")
        return call

    def _run_hooks(self, update: CallUpdate) -> None:
        # Hooks run after the answer is on its way: Twilio answers the update, then the stream
        # stops. A test that needs them finished awaits settle().
        for hook in self._hooks.get(update.call_sid, []):
            task = asyncio.create_task(_call_hook(hook, update))
            self._hook_tasks.add(task)
            task.add_done_callback(self._hook_tasks.discard)


async def _call_hook(hook: UpdateHook, update: CallUpdate) -> None:
    result = hook(update)
    if inspect.isawaitable(result):
        await result


def _basic_credentials(request: web.Request) -> tuple[str, str] | None:
    # By hand: aiohttp.BasicAuth is deprecated (aiohttp 3.14) and goes away in aiohttp 4.
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        login, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (login, password) if sep else None


def _check_inline_twiml(twiml: str) -> TwilioApiError | None:
    if len(twiml) > TWIML_MAX_CHARS:
        return TWIML_TOO_LONG
    try:
        root = ET.fromstring(twiml)
    except ET.ParseError as exc:
        return TwilioApiError(400, 12100, f"Document parse failure: {exc}")
    for element in root.iter():
        action = element.get("action")
        if action is not None and not urlsplit(action).scheme:
            return RELATIVE_ACTION
    return None


# ---------------------------------------------------------------------------------------------
# The Account resource and the account's IncomingPhoneNumbers, read-only: what
# ``phoneagent doctor`` fetches to check the credentials and each number's voice webhook.
# ---------------------------------------------------------------------------------------------


@dataclass
class FakeNumber:
    """A phone number on the account: an IncomingPhoneNumber resource.

    Fields and their meaning: https://www.twilio.com/docs/phone-numbers/api/incomingphonenumber-resource
    (and ``IncomingPhoneNumberInstance`` in the ``twilio`` library, which reads them).
    """

    phone_number: str  # E.164
    account_sid: str
    voice_url: str = ""
    voice_method: str = "POST"
    # When set, Twilio ignores the voice_* URLs and uses the TwiML App's (docs).
    voice_application_sid: str = ""
    sid: str = field(default_factory=lambda: new_sid("PN"))
    friendly_name: str = ""
    date_created: datetime = field(default_factory=lambda: datetime.now(UTC))

    def resource(self) -> dict[str, Any]:
        created = _rfc2822(self.date_created)
        return {
            "account_sid": self.account_sid,
            "address_sid": None,
            "address_requirements": "none",
            "api_version": API_VERSION,
            "beta": False,
            "capabilities": {"voice": True, "sms": True, "mms": True, "fax": False},
            "date_created": created,
            "date_updated": created,
            "friendly_name": self.friendly_name or self.phone_number,
            "identity_sid": None,
            "phone_number": self.phone_number,
            "origin": "twilio",
            "sid": self.sid,
            "sms_application_sid": "",
            "sms_fallback_method": "POST",
            "sms_fallback_url": "",
            "sms_method": "POST",
            "sms_url": "",
            "status_callback": "",
            "status_callback_method": "POST",
            "trunk_sid": None,
            "uri": f"/{API_VERSION}/Accounts/{self.account_sid}/IncomingPhoneNumbers/"
            f"{self.sid}.json",
            "voice_receive_mode": "voice",
            "voice_application_sid": self.voice_application_sid or None,
            "voice_caller_id_lookup": False,
            "voice_fallback_method": "POST",
            "voice_fallback_url": None,
            "voice_method": self.voice_method,
            "voice_url": self.voice_url or None,
            "emergency_status": "Inactive",
            "emergency_address_sid": None,
            "emergency_address_status": "unregistered",
            "bundle_sid": None,
            "status": "in-use",
        }


def _account_resource(api: FakeTwilioApi) -> dict[str, Any]:
    """The Account resource: https://www.twilio.com/docs/iam/api/account (Account Properties).

    Twilio returns the auth token in it: a client must never print this resource whole.
    """
    uri = f"/{API_VERSION}/Accounts/{api.account_sid}"
    created = _rfc2822(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC))
    subresources = ("calls", "incoming_phone_numbers", "recordings", "notifications", "balance")
    return {
        "auth_token": api.auth_token,
        "date_created": created,
        "date_updated": created,
        "friendly_name": "phoneagent test account",
        "owner_account_sid": api.account_sid,
        "sid": api.account_sid,
        "status": api.account_status,
        "subresource_uris": {
            name: f"{uri}/{name.title().replace('_', '')}.json" for name in subresources
        },
        "type": api.account_type,
        "uri": uri + ".json",
    }


def _matches(pattern: str, phone_number: str) -> bool:
    """Twilio's PhoneNumber filter: "partial numbers, and '*' as a wildcard for any digit"."""
    regex = "".join(r"\d" if c == "*" else re.escape(c) for c in pattern)
    return re.search(regex, phone_number) is not None


def _add_account_routes(app: web.Application, api: FakeTwilioApi) -> None:
    base = f"/{API_VERSION}/Accounts/{{account_sid}}"

    async def fetch_account(request: web.Request) -> web.Response:
        error = await api._precheck(request)
        if error is not None:
            return api._answer(request, error.status, error.body())
        return api._answer(request, 200, _account_resource(api))

    async def list_numbers(request: web.Request) -> web.Response:
        """The read (list) of IncomingPhoneNumbers, in Twilio's paged list shape."""
        error = await api._precheck(request)
        if error is not None:
            return api._answer(request, error.status, error.body())
        pattern = request.query.get("PhoneNumber", "")
        page_size = int(request.query.get("PageSize", "50"))
        found = [n.resource() for n in api.numbers.values() if _matches(pattern, n.phone_number)]
        found = found[:page_size]  # one page is all a test registers
        uri = f"/{API_VERSION}/Accounts/{api.account_sid}/IncomingPhoneNumbers.json"
        query = (
            f"?PhoneNumber={pattern}&PageSize={page_size}" if pattern else f"?PageSize={page_size}"
        )
        body = {
            "end": max(len(found) - 1, 0),
            "first_page_uri": f"{uri}{query}&Page=0",
            "incoming_phone_numbers": found,
            "next_page_uri": None,
            "page": 0,
            "page_size": page_size,
            "previous_page_uri": None,
            "start": 0,
            "uri": f"{uri}{query}&Page=0",
        }
        return api._answer(request, 200, body)

    app.router.add_get(base + ".json", fetch_account)
    app.router.add_get(base + "/IncomingPhoneNumbers.json", list_numbers)
