"""The media-stream shell: one Twilio media stream, one model session, one ``Call`` between them.

It takes both as small protocols (``TwilioLine``, ``ModelChannel``: the aiohttp adapters are in
the route and in ``realtime/connection.py``), so it runs in memory in tests.
It reads from both, hands each event to the ``Call`` (and a ``Tick`` every
TICK_SECONDS), and performs the actions it returns. It decides nothing about the conversation:
when the model's socket drops, or a new session cannot be opened, it tells the ``Call``, which
says whether and when to try again (``ReconnectModel``) or to end the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from phoneagent.call import (
    Action,
    AskBusinessTool,
    Call,
    EndCall,
    HangUpCall,
    ReconnectModel,
    RenewModelSession,
    SendClear,
    SendMark,
    SendMedia,
    ToModel,
    ToolAnswer,
    ToolCallFinished,
    TransferCall,
    TurnFinished,
)
from phoneagent.call.tool_calls import UNREACHABLE, error_output
from phoneagent.call.watchers import Tick
from phoneagent.logs import get_logger
from phoneagent.metrics import Metrics
from phoneagent.personas import BusinessTool, TransferTarget
from phoneagent.realtime.base import ModelCommand, ModelEvent, ModelUnavailable
from phoneagent.twilio.wire.stream import (
    Media,
    Start,
    TwilioEvent,
    clear_message,
    mark_message,
    media_message,
)

log = get_logger(__name__)

START_TIMEOUT_SECONDS = 10.0  # Twilio sends `connected` and `start` right after the upgrade
# The watchers' timer: caller frames tick the Call too (every 20 ms), so this only matters when
# they stop (Twilio omits silence on some calls); it bounds how late a nudge or a renewal can
# be. While frames arrive the timer only checks every TICK_WHILE_STREAMING_SECONDS whether
# they stopped: a wake-up and a tick per call every 100 ms cost ~0.1 ms of CPU per call-second
# (1–2% of the server's), for nothing. A nudge (2 s) is then at most 0.5 s later than it was.
TICK_SECONDS = 0.1
TICK_WHILE_STREAMING_SECONDS = 0.5
CALLER_FRAMES_SAMPLED = 10  # phoneagent_media_processing_seconds{direction="caller_to_model"}


class StreamRefused(Exception):
    """The stream cannot become a call (no `start`, a bad token, an unknown persona)."""


class TwilioLine(Protocol):
    """The media stream as the shell uses it: Twilio's events in, message texts out."""

    def events(self) -> AsyncIterator[TwilioEvent]:
        """Typed events until the stream closes; one iterator for the stream's whole life."""
        ...

    async def send(self, text: str) -> None:
        """Raises ConnectionError once the stream is gone."""
        ...

    async def close(self) -> None: ...


class ModelChannel(Protocol):
    """One configured model session as the shell uses it."""

    session_id: str

    def events(self) -> AsyncIterator[ModelEvent]:
        """Typed events until the session's socket closes."""
        ...

    async def send(self, command: ModelCommand) -> None:
        """Raises ConnectionError once the session is gone."""
        ...

    async def close(self) -> None: ...


async def read_start(line: TwilioLine) -> Start:
    """Read events up to `start`. Nothing can be sent before it: the streamSid is in it."""
    async with asyncio.timeout(START_TIMEOUT_SECONDS):
        async for event in line.events():
            if isinstance(event, Start):
                return event
    raise StreamRefused("the stream closed before `start`")


TurnListener = Callable[[Call, dict], None]


class Handoffs(Protocol):
    """Performs what the Call decides about the call itself (Twilio's REST API); each returns
    None when done, else a short reason for the log and the model."""

    async def transfer(self, call: Call, target: TransferTarget, reason: str) -> str | None: ...

    async def hang_up(self, call: Call) -> str | None: ...


class BusinessTools(Protocol):
    """Asks the business a persona tool call (business_tools.py); always answers, within the
    tool's timeout: the answer, or an error for the model."""

    async def ask(
        self, call_sid: str, persona: str, tool: BusinessTool, arguments: dict
    ) -> ToolAnswer: ...


@dataclass
class CallShell:
    line: TwilioLine
    model: ModelChannel
    call: Call
    turn_listeners: Sequence[TurnListener] = ()
    handoffs: Handoffs | None = None
    business_tools: BusinessTools | None = None
    metrics: Metrics | None = None
    # Opens a new, configured model session for this call (reconnect, 30-minute renewal).
    open_model: Callable[[], Awaitable[ModelChannel]] | None = None

    def __post_init__(self) -> None:
        self._requests: set[asyncio.Task[None]] = set()  # REST requests in flight
        # Set when the Call ends, whoever's action ended it: a REST answer can end a call while
        # both pumps wait for a socket that may stay quiet.
        self._ended = asyncio.Event()
        self._twilio_at = time.perf_counter()  # when Twilio's last event arrived
        self._frames = 0  # caller frames, for the metric's sample

    async def run(self) -> None:
        """Bridge until the call ends one way or another; then close both sockets."""
        pumps = [
            asyncio.create_task(self._pump_twilio(), name="twilio"),
            asyncio.create_task(self._pump_model(), name="model"),
            asyncio.create_task(self._ended.wait(), name="ended"),
            asyncio.create_task(self._tick(), name="tick"),
        ]
        try:
            await self.perform(self.call.begin())
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in [*pumps, *self._requests]:
                pump.cancel()
            for pump in [*pumps, *self._requests]:
                try:
                    await pump
                except asyncio.CancelledError:
                    pass
                except Exception:
                    log.exception("call_task_failed", task=pump.get_name())
            await self._close_sockets()

    async def drain(self) -> None:
        """The instance stops: the agent says goodbye and hangs up (see ``Call.on_drain``)."""
        await self.perform(self.call.on_drain())

    async def shut_down(self) -> None:
        """The drain time is up: end the call now; ``run`` closes both sockets."""
        await self.perform(self.call.on_shutdown())

    async def _pump_twilio(self) -> None:
        async for event in self.line.events():
            await self.feed_twilio(event)
            if self.call.ended:
                return
        await self.perform(self.call.on_twilio_closed())

    async def _tick(self) -> None:
        while not self.call.ended:
            if time.perf_counter() - self._twilio_at < TICK_SECONDS:
                await asyncio.sleep(TICK_WHILE_STREAMING_SECONDS)  # the frames tick the Call
                continue
            await self.perform(self.call.on_tick(Tick(None, self.call.clock())))
            await asyncio.sleep(TICK_SECONDS)

    async def _pump_model(self) -> None:
        while not self.call.ended:
            session = self.model
            async for event in session.events():
                await self.feed_model(event)
                if self.call.ended:
                    return
            if self.call.ended:
                return
            if self.model is not session:
                continue  # renewed: read the new session
            # The Call answers with ReconnectModel, performed here until a new session serves
            # the call or the Call gives up and ends.
            await self.perform(self.call.on_model_dropped())

    async def _reconnect(self, after_s: float) -> None:
        """Open a new session for the Call, and tell it how that went."""
        if self.open_model is None:
            await self.perform(self.call.on_model_reconnect_failed("no model connector"))
            return
        await asyncio.sleep(after_s)
        try:
            session = await self.open_model()
        except ModelUnavailable as exc:
            log.warning("model_reconnect_failed", reason=str(exc), status=exc.status)
            await self.perform(self.call.on_model_reconnect_failed(str(exc)))
            return
        log.info("model_reconnected", model_session=session.session_id)
        await self._switch_to(session)

    async def _renew(self) -> None:
        """Before StepFun's 30-minute limit: a new session, then the switch, then the old one
        closes — the caller hears nothing of it."""
        assert self.open_model is not None
        try:
            session = await self.open_model()
        except ModelUnavailable as exc:
            await self.perform(self.call.on_model_renewal_failed(f"{exc} ({exc.status})"))
            return
        old = self.model
        await self._switch_to(session)
        log.info("model_session_renewed", model_session=session.session_id)
        await old.close()

    async def _switch_to(self, session: ModelChannel) -> None:
        self.model = session
        if self.metrics is not None:
            self.metrics.model_reconnects.inc()
        await self.perform(self.call.on_model_reconnected())

    async def feed_twilio(self, event: TwilioEvent) -> None:
        received_at = self._twilio_at = time.perf_counter()
        await self.perform(self.call.on_twilio(event), received_at)
        if self.metrics is not None and isinstance(event, Media):
            # One frame in CALLER_FRAMES_SAMPLED: the distribution is the same, and a histogram
            # observation (a lock per bucket) on each of 50 frames a second costs as much as
            # a third of the Call's own work per frame.
            self._frames += 1
            if self._frames % CALLER_FRAMES_SAMPLED == 0:
                self.metrics.inbound_media.observe(time.perf_counter() - received_at)

    async def feed_model(self, event: ModelEvent) -> None:
        received_at = time.perf_counter()
        actions = self.call.on_model(event)
        await self.perform(actions, received_at)
        if self.metrics is not None:
            messages = sum(isinstance(action, SendMedia) for action in actions)
            if messages:  # the work of one event (a delta, a flush), shared by its messages
                per_message = (time.perf_counter() - received_at) / messages
                for _ in range(messages):
                    self.metrics.outbound_media.observe(per_message)

    async def perform(self, actions: list[Action], received_at: float | None = None) -> None:
        """Carry out the Call's actions in order. ``received_at`` is when the event that caused
        them arrived: the barge-in reaction time is measured from it."""
        stream_sid = self.call.stream_sid
        # Another event's actions can run while these wait on a socket (a send waits when the
        # socket's buffer is full): agent audio framed before a barge-in's `clear` that came
        # in meanwhile was written off by the Call, and must not follow the `clear`.
        clears = self.call.clears
        for action in actions:
            match action:  # the most frequent first: each caller frame is one ToModel
                case ToModel(command):
                    # A session that just dropped, before the pump has told the Call: what it
                    # cannot take is lost with it (the Call replays the call to the next one).
                    try:
                        await self.model.send(command)
                    except ConnectionError:
                        log.debug("model_command_lost", command=type(command).__name__)
                case SendMedia(payload):
                    if self.call.clears == clears:
                        await self._to_twilio(media_message(stream_sid, payload))
                case SendMark(name):
                    if self.call.clears == clears:
                        await self._to_twilio(mark_message(stream_sid, name))
                case SendClear():
                    await self._to_twilio(clear_message(stream_sid))
                    if received_at is not None:
                        reaction_ms = (time.perf_counter() - received_at) * 1000
                        self.call.on_clear_sent(reaction_ms)
                case TurnFinished(turn):
                    for listener in self.turn_listeners:
                        listener(self.call, turn)
                case TransferCall(target, reason):
                    self._request(self._transfer(target, reason))
                case HangUpCall():
                    self._request(self._hang_up())
                case AskBusinessTool(call_id, tool, arguments):
                    self._request(self._ask_business(call_id, tool, arguments))
                case ToolCallFinished(tool, outcome, duration_ms):
                    if self.metrics is not None:
                        self.metrics.record_tool_call(outcome, duration_ms)
                case RenewModelSession():
                    if self.open_model is not None:
                        self._request(self._renew())
                    else:
                        await self.perform(self.call.on_model_renewal_failed("no connector"))
                case ReconnectModel(after_s):
                    await self._reconnect(after_s)  # only the model pump's events ask for it
                case EndCall(reason):
                    log.info("call_ending", reason=reason.value)
            if self.call.ended:
                self._ended.set()
                return

    def _request(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """REST requests run beside the pumps: audio and marks keep flowing meanwhile."""
        task = asyncio.create_task(coroutine)
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _transfer(self, target: TransferTarget, reason: str) -> None:
        error = "no Twilio API configured"
        if self.handoffs is not None:
            error = await self.handoffs.transfer(self.call, target, reason)
        await self.perform(self.call.on_transfer_result(error))

    async def _hang_up(self) -> None:
        error = "no Twilio API configured"
        if self.handoffs is not None:
            error = await self.handoffs.hang_up(self.call)
        await self.perform(self.call.on_hang_up_result(error))

    async def _ask_business(self, call_id: str, tool: BusinessTool, arguments: dict) -> None:
        if self.business_tools is None:
            answer = ToolAnswer(error_output("the tool is not available"), UNREACHABLE, 0)
        else:
            answer = await self.business_tools.ask(
                self.call.call_sid, self.call.persona.id, tool, arguments
            )
        await self.perform(self.call.on_tool_answer(call_id, answer))

    async def _to_twilio(self, text: str) -> None:
        try:
            await self.line.send(text)
        except ConnectionError:
            await self.perform(self.call.on_twilio_closed())

    async def _close_sockets(self) -> None:
        with contextlib.suppress(Exception):
            await self.model.close()
        with contextlib.suppress(Exception):
            await self.line.close()


def bind_call_context(call_sid: str, stream_sid: str, persona: str) -> None:
    """Every log line of this call's task carries these."""
    structlog.contextvars.bind_contextvars(
        call_sid=call_sid, stream_sid=stream_sid, persona=persona
    )


def unbind_call_context() -> None:
    structlog.contextvars.unbind_contextvars("call_sid", "stream_sid", "persona")
