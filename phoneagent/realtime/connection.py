"""The realtime model's WebSocket: connect, configure, move messages. The thin I/O shell
around a ``Dialect``; all decisions about what to send live in the ``Call``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

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


class ModelConnectionLost(ConnectionError):
    """The session's socket closed: what was to be sent is lost with it."""


class ModelSession:
    """One open, configured realtime session (the shell's ``ModelChannel``)."""

    def __init__(self, ws: ClientConnection, dialect: Dialect, model: str, session_id: str):
        self._ws = ws
        self.dialect = dialect
        self.model = model
        self.session_id = session_id

    async def send(self, command: ModelCommand) -> None:
        try:
            await self._ws.send(self.dialect.encode(command))
        except ConnectionClosed:
            raise ModelConnectionLost(f"model session {self.session_id} closed") from None

    async def events(self) -> AsyncIterator[ModelEvent]:
        """Typed events until the socket closes. Undecodable messages are logged and skipped."""
        with contextlib.suppress(ConnectionClosed):
            async for message in self._ws:
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
        return self._ws.close_code is not None


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
            except InvalidStatus as exc:
                status = exc.response.status_code
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
            except (ConnectionClosed, TimeoutError) as exc:
                await ws.close()
                raise ModelUnavailable(f"session set-up failed: {type(exc).__name__}") from None
            except asyncio.CancelledError:
                # The set-up budget ran out (Prewarmer.claim): a close handshake with a model
                # that answers nothing would wait its own timeout, so cut the connection.
                ws.transport.abort()
                raise
            except BaseException:
                await ws.close()
                raise
            if model != self.model:
                log.warning("model_name_fallback_answered", model=model, configured=self.model)
                self.model = model  # later calls go straight to the name that works
            return ModelSession(ws, self.dialect, model, session_id)

    async def _connect_as(self, model: str) -> ClientConnection:
        try:
            return await connect(
                self.dialect.connect_url(self.url, model),
                additional_headers=self.dialect.headers(self.api_key),
                open_timeout=self.open_timeout,
                max_size=MAX_MESSAGE_BYTES,
                compression=None,  # base64 audio does not compress; deflate only costs CPU
                close_timeout=CLOSE_SECONDS,
            )
        except InvalidStatus:
            raise
        except (OSError, TimeoutError, WebSocketException) as exc:
            # WebSocketException: a handshake cut short or garbled (a proxy, an overloaded host)
            raise ModelUnavailable(f"cannot connect: {type(exc).__name__}: {exc}") from None

    async def _configure(self, ws: ClientConnection, config: SessionConfig) -> str:
        """Wait for ``session.created``, send the persona's session, wait for the update."""
        session_id = ""
        sent_update = False
        async with asyncio.timeout(self.open_timeout):
            async for message in ws:
                try:
                    event = self.dialect.decode(message)
                except MalformedEvent as exc:
                    # Mid-call a bad message is skipped; during set-up nothing can be trusted.
                    raise ModelUnavailable(f"malformed set-up message: {exc}") from None
                if isinstance(event, SessionReady) and not sent_update:
                    session_id = event.session_id
                    await ws.send(self.dialect.encode(UpdateSession(config)))
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
