"""The realtime model's WebSocket: connect, configure, move messages. The thin I/O shell
around a ``Dialect``; all decisions about what to send live in the ``Call``."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
from aiohttp import ClientWebSocketResponse, WSMsgType

from phoneagent.logs import get_logger
from phoneagent.realtime.base import (
    Dialect,
    MalformedEvent,
    ModelCommand,
    ModelError,
    ModelEvent,
    ModelUnavailable,  # re-exported: the connection raises it
    SessionConfig,
    SessionReady,
    SessionUpdated,
    UpdateSession,
)
from phoneagent.realtime.stepfun import MODEL_ALIASES, StepFunDialect

log = get_logger(__name__)

# A model delta of a few seconds of pcm16 24 kHz in base64 is a few hundred KiB.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# From the stream's `start`, the longest a caller waits for the model's session before the
# apology (DESIGN budget: apology within 5 s; Twilio still has to fetch it). StepFun's handshake
# and set-up take well under a second when the service is well (reference section 1).
SETUP_BUDGET = 3.5
# A model that does not answer our close frame is not waited for longer than this (the
# library's default is 10 s, spent while a call ends or a caller waits for the apology).
CLOSE_SECONDS = 2.0
# Upgrade refusals that mean "this model name is wrong" rather than "you may not".
MODEL_NAME_REFUSALS = (400, 404)
# The model's keepalive: a ping after this many seconds without a frame from the model, and the
# session is lost if no pong comes within half of it (the websockets client this replaced
# pinged every 20 s and waited 20 s).
KEEPALIVE_SECONDS = 20.0
# What the model sends that is no message: the socket closing, or failing (a frame too large,
# a broken frame; aiohttp has then closed the socket).
_END_OF_SESSION = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED})

# Why aiohttp's client and not the websockets library: per message it costs about half as much
# CPU (its frame reader is compiled; issue 17 measured 4.8 against 8.2 µs to send an audio
# frame, 7 against 12.8 µs to receive a delta). Part of the difference is the masking key:
# websockets reads os.urandom (a system call) for every frame, aiohttp draws it from the
# standard library's Mersenne Twister (random.Random, seeded once from os.urandom), which is
# not unpredictable. RFC 6455 §5.3 asks for an unpredictable key so that a script in a browser
# cannot choose the bytes a proxy sees (cache poisoning); this client runs on a server and
# sends only what it builds itself, so that threat does not reach it.


class ModelConnectionLost(ConnectionError):
    """The session's socket closed: what was to be sent is lost with it."""


class ModelSession:
    """One open, configured realtime session (the shell's ``ModelChannel``)."""

    def __init__(self, ws: ClientWebSocketResponse, dialect: Dialect, model: str, session_id: str):
        self._ws = ws
        self.dialect = dialect
        self.model = model
        self.session_id = session_id

    async def send(self, command: ModelCommand) -> None:
        # aiohttp writes to a closed session without an error (the frame goes nowhere) and to a
        # closing transport with ClientConnectionResetError: both are a lost session here.
        if self._ws.closed:
            raise ModelConnectionLost(f"model session {self.session_id} closed")
        try:
            # A text frame (StepFun's events are JSON text), from the bytes the dialect wrote
            await self._ws.send_frame(self.dialect.encode(command), WSMsgType.TEXT)
        except (ConnectionError, aiohttp.ClientError):
            raise ModelConnectionLost(f"model session {self.session_id} closed") from None

    async def events(self) -> AsyncIterator[ModelEvent]:
        """Typed events until the socket closes. Undecodable messages are logged and skipped."""
        while True:
            message = await _receive(self._ws)
            if message is None:
                return
            try:
                event = self.dialect.decode(message)
            except MalformedEvent as exc:
                log.warning("model_message_malformed", error=str(exc), size=len(message))
                continue
            if event is not None:
                yield event

    async def close(self) -> None:
        await self._ws.close()

    @property
    def closed(self) -> bool:
        return self._ws.closed


async def _receive(ws: ClientWebSocketResponse) -> str | bytes | None:
    """The model's next message, or None when the session is over. StepFun's events are JSON
    text frames; a binary frame is handed to the dialect as it is (JSON is UTF-8 either way,
    as the websockets client did), which decodes it or reports it malformed."""
    message = await ws.receive()
    if message.type is WSMsgType.TEXT or message.type is WSMsgType.BINARY:
        return message.data
    if message.type is WSMsgType.ERROR:
        # A frame beyond MAX_MESSAGE_BYTES or a broken one: aiohttp has closed the socket.
        log.warning("model_socket_failed", error=f"{type(message.data).__name__}: {message.data}")
        return None
    if message.type not in _END_OF_SESSION:  # PING and PONG are answered inside aiohttp
        log.warning("model_frame_unexpected", kind=message.type.name)
    return None


class ModelNameRefused(Exception):
    """The session answered an error about the model name (see ``names_the_model``)."""


# What an error about the model's name looks like. StepFun documents none (D-ERR lists HTTP
# errors only): a code naming the model, or a message that says the model is not found or not
# allowed, in English or Chinese.
MODEL_ERROR_MARKERS = ("not found", "not exist", "no permission", "not support", "不存在", "无权")


def names_the_model(error: ModelError) -> bool:
    code, text = error.code.lower(), error.message.lower()
    if code.startswith("model_") or code == "invalid_model":
        return True
    mentions = "model" in text or "模型" in text
    return mentions and any(marker in text for marker in MODEL_ERROR_MARKERS)


@dataclass
class ModelConnector:
    """Opens configured sessions, with the model-name fallback the unsettled name needs."""

    url: str
    api_key: str
    model: str
    dialect: Dialect = field(default_factory=StepFunDialect)
    open_timeout: float = 10.0
    _http: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)

    async def close(self) -> None:
        """Close the HTTP session the connector opens sessions through (a later ``open`` makes
        a new one). The model sessions it opened are cut with it."""
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _client(self) -> aiohttp.ClientSession:
        """One HTTP session for every call: a session per call would cost its set-up (and its
        connector) every time."""
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                # limit=0: a model session per call, so a connection limit (aiohttp's default:
                # 100) would make the call after it wait for another to end. DNS answers are
                # cached for aiohttp's default 10 s: a moved endpoint is found within that.
                connector=aiohttp.TCPConnector(limit=0),
                # Proxies come from the environment by ``model_proxy`` (aiohttp's own reading
                # would use only WSS_PROXY for a wss:// URL).
                trust_env=False,
            )
        return self._http

    async def open(self, config: SessionConfig) -> ModelSession:
        """A configured session, under the configured model name or, if that name is refused
        (the upgrade answers 400/404, or the session answers an error naming the model), once
        under its other spelling (MODEL_ALIASES); the name that answered is kept for later."""
        model, tried = self.model, set()
        while True:
            tried.add(model)
            alias = MODEL_ALIASES.get(model)
            retry = alias is not None and alias not in tried
            try:
                ws = await self._connect_as(model)
            except _UpgradeRefused as exc:
                status = exc.status
                if status not in MODEL_NAME_REFUSALS or not retry:
                    raise ModelUnavailable(f"upgrade refused with HTTP {status}", status) from None
                log.warning("model_name_refused", model=model, status=status, retrying=alias)
                model = alias
                continue
            try:
                session_id = await self._configure(ws, config)
            except ModelNameRefused as exc:
                await ws.close()
                if not retry:
                    raise ModelUnavailable(f"session refused: {exc}") from None
                log.warning("model_name_refused", model=model, error=str(exc), retrying=alias)
                model = alias
                continue
            except (ConnectionError, aiohttp.ClientError, TimeoutError) as exc:
                await ws.close()
                raise ModelUnavailable(f"session set-up failed: {type(exc).__name__}") from None
            except asyncio.CancelledError:
                # The set-up budget ran out (Prewarmer.claim): a close handshake with a model
                # that answers nothing would wait its own timeout, so cut the connection.
                _cut(ws)
                raise
            except BaseException:
                await ws.close()
                raise
            if model != self.model:
                log.warning("model_name_fallback_answered", model=model, configured=self.model)
                self.model = model  # later calls go straight to the name that works
            return ModelSession(ws, self.dialect, model, session_id)

    async def _connect_as(self, model: str) -> ClientWebSocketResponse:
        url = self.dialect.connect_url(self.url, model)
        try:
            proxy = model_proxy(url)
            async with asyncio.timeout(self.open_timeout):
                return await self._client().ws_connect(
                    url,
                    headers=self.dialect.headers(self.api_key),
                    max_msg_size=MAX_MESSAGE_BYTES,
                    compress=0,  # base64 audio does not compress; deflate only costs CPU
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_SECONDS),
                    heartbeat=KEEPALIVE_SECONDS,
                    proxy=proxy,
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status != 101:  # any other answer than the upgrade: a refusal
                raise _UpgradeRefused(exc.status) from None
            # 101 with a wrong Upgrade, Connection or Sec-WebSocket-Accept: garbled on the way
            raise ModelUnavailable(f"cannot connect: bad handshake: {exc.message}") from None
        except (OSError, TimeoutError, aiohttp.ClientError, ValueError) as exc:
            # ClientError: a handshake cut short (a proxy, an overloaded host); ValueError: a
            # proxy address aiohttp cannot use
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise ModelUnavailable(f"cannot connect: {reason}") from None

    async def _configure(self, ws: ClientWebSocketResponse, config: SessionConfig) -> str:
        """Wait for ``session.created``, send the persona's session, wait for the update."""
        session_id = ""
        sent_update = False
        async with asyncio.timeout(self.open_timeout):
            while (message := await _receive(ws)) is not None:
                try:
                    event = self.dialect.decode(message)
                except MalformedEvent as exc:
                    # Mid-call a bad message is skipped; during set-up nothing can be trusted.
                    raise ModelUnavailable(f"malformed set-up message: {exc}") from None
                if isinstance(event, SessionReady) and not sent_update:
                    session_id = event.session_id
                    await ws.send_frame(self.dialect.encode(UpdateSession(config)), WSMsgType.TEXT)
                    sent_update = True
                elif isinstance(event, (SessionReady, SessionUpdated)) and sent_update:
                    # StepFun's sample of the update's answer is labelled session.created
                    # (D-REF 更新 session 响应): a second one is the ack too.
                    return session_id
                elif isinstance(event, ModelError) and not event.benign:
                    if names_the_model(event):
                        raise ModelNameRefused(f"{event.code} {event.message}")
                    raise ModelUnavailable(f"session refused: {event.code} {event.message}")
        raise ModelUnavailable("the model closed the socket while the session was set up")


class _UpgradeRefused(Exception):
    """The model answered the upgrade with another status than 101."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def _cut(ws: ClientWebSocketResponse) -> None:
    """Close the connection now, with no close handshake. aiohttp has no public call for it;
    its own ``close()`` does this (closing the upgrade's response) when it is cancelled."""
    ws._response.close()


def model_proxy(url: str) -> str | None:
    """The proxy to reach the model through, from the environment, as the websockets client
    chose it before (its ``get_proxy``): none for a host NO_PROXY names; for wss:// WSS_PROXY,
    then HTTPS_PROXY; for ws:// WS_PROXY, HTTPS_PROXY, then HTTP_PROXY. A SOCKS proxy (which
    websockets took through python-socks) is refused with a clear error rather than bypassed."""
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    if urllib.request.proxy_bypass(f"{parts.hostname}:{port}"):
        return None
    proxies = urllib.request.getproxies()
    for scheme in ("wss", "socks", "https") if secure else ("ws", "socks", "https", "http"):
        proxy = proxies.get(scheme)
        if proxy is None:
            continue
        if scheme == "socks" or proxy.startswith("socks"):
            raise ValueError(f"a SOCKS proxy ({scheme}_proxy) is not supported: use an HTTP one")
        return proxy
    return None


class Prewarmer:
    """Opens a call's model session while the phone is still ringing.

    The voice webhook starts it; the media stream claims it on ``start``. A warm session no
    stream claims (the caller hung up during the TwiML fetch) is closed after ``ttl`` seconds.
    """

    def __init__(
        self, connector: ModelConnector, ttl: float = 15.0, setup_budget: float = SETUP_BUDGET
    ):
        self.connector = connector
        self.ttl = ttl
        self.setup_budget = setup_budget
        self._warm: dict[str, asyncio.Task[ModelSession]] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._discarding: set[asyncio.Task[None]] = set()

    def start(self, call_sid: str, config: SessionConfig) -> None:
        if call_sid in self._warm:
            return  # Twilio retried the webhook: one session is enough
        self._warm[call_sid] = asyncio.create_task(self.connector.open(config))
        loop = asyncio.get_running_loop()
        self._expiry[call_sid] = loop.call_later(self.ttl, self._expire, call_sid)

    async def open(self, config: SessionConfig) -> ModelSession:
        """A new session now, not pre-warmed: a call reconnecting or renewing its session."""
        return await self.connector.open(config)

    async def claim(self, call_sid: str, config: SessionConfig) -> ModelSession:
        """The call's configured session: the warm one, or a new one if it failed; within
        ``setup_budget`` seconds whatever the model does (no answer, half a set-up), so a
        caller waits that long at most before the apology."""
        task = self._warm.pop(call_sid, None)
        if (handle := self._expiry.pop(call_sid, None)) is not None:
            handle.cancel()
        try:
            async with asyncio.timeout(self.setup_budget):
                if task is not None:
                    try:
                        session = await asyncio.shield(task)
                        log.info("model_session_prewarmed", model=session.model)
                        return session
                    except ModelUnavailable as exc:
                        log.warning("model_prewarm_failed", reason=str(exc), status=exc.status)
                return await self.connector.open(config)
        except TimeoutError:
            if task is not None:
                self._discard_later(task)
            raise ModelUnavailable(f"no session within {self.setup_budget:g} s") from None

    def _expire(self, call_sid: str) -> None:
        self._expiry.pop(call_sid, None)
        task = self._warm.pop(call_sid, None)
        if task is not None:
            log.info("model_prewarm_unclaimed", call_sid=call_sid)
            self._discard_later(task)

    def _discard_later(self, task: asyncio.Task[ModelSession]) -> None:
        discarding = asyncio.create_task(_discard(task))
        self._discarding.add(discarding)
        discarding.add_done_callback(self._discarding.discard)

    @property
    def waiting(self) -> int:
        return len(self._warm)

    async def close(self) -> None:
        for handle in self._expiry.values():
            handle.cancel()
        tasks = list(self._warm.values())
        self._warm.clear()
        self._expiry.clear()
        await asyncio.gather(*(_discard(t) for t in tasks), *self._discarding)
        await self.connector.close()


async def _discard(task: asyncio.Task[ModelSession]) -> None:
    """Close a warm session nobody will use, or swallow its failure."""
    if not task.done():
        task.cancel()
    try:
        session = await task
    except (asyncio.CancelledError, ModelUnavailable):
        return
    except Exception:
        log.exception("model_prewarm_failed")
        return
    await session.close()
