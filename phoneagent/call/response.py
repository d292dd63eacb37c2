"""The model's response: idle, generating, or cancelling; what waits for it to end; which
response an event is of; the tool calls it made. No I/O.

A realtime model takes one response at a time: ``response.create`` during one is an error
("ongoing response already exists"), so commands that ask for one wait for the model to be idle.
A cancelled response still ends with its ``response.done``; until then the model is not idle.
"""

from __future__ import annotations

import enum
from typing import ClassVar

from phoneagent.call.actions import Action, ToModel
from phoneagent.call.machine import Machine, Unexpected
from phoneagent.logs import get_logger
from phoneagent.realtime.base import CancelResponse, CreateResponse, ToolCall, UpdateInstructions

log = get_logger(__name__)

# Limits hold whatever the model does. A response that has sent no audio for this long (stream
# time) is given up on: the model is treated as idle again.
RESPONSE_STALL_MS = 10_000


class ResponseState(enum.Enum):
    IDLE = "idle"  # the model takes a new response.create
    GENERATING = "generating"  # a response is in progress (older cancelled ones may be ending)
    CANCELLING = "cancelling"  # none in progress; cancelled ones have not sent response.done


# A table entry meaning: IDLE, or CANCELLING while a cancelled response's done is still due.
SETTLES = "settles"


class ModelResponse(Machine[ResponseState]):
    TRANSITIONS: ClassVar[dict] = {
        (ResponseState.IDLE, "started"): ResponseState.GENERATING,
        (ResponseState.CANCELLING, "started"): ResponseState.GENERATING,
        # A response started without the last one's done: the new one is the one in progress.
        (ResponseState.GENERATING, "started"): ResponseState.GENERATING,
        (ResponseState.GENERATING, "done"): SETTLES,
        (ResponseState.GENERATING, "cancelled_done"): ResponseState.GENERATING,
        (ResponseState.CANCELLING, "cancelled_done"): SETTLES,
        # The done of a response given up on (stalled), or of one never seen: nothing changes.
        (ResponseState.IDLE, "other_done"): ResponseState.IDLE,
        (ResponseState.GENERATING, "other_done"): ResponseState.GENERATING,
        (ResponseState.CANCELLING, "other_done"): ResponseState.CANCELLING,
        (ResponseState.GENERATING, "cancel"): ResponseState.CANCELLING,  # barge-in
        (ResponseState.GENERATING, "give_up"): SETTLES,  # stalled: its done may never come
        (ResponseState.IDLE, "new_session"): ResponseState.IDLE,
        (ResponseState.GENERATING, "new_session"): ResponseState.IDLE,
        (ResponseState.CANCELLING, "new_session"): ResponseState.IDLE,
    }

    def __init__(self, instructions: str, unexpected: Unexpected) -> None:
        super().__init__(ResponseState.IDLE, unexpected)
        self.active: str | None = None
        # Cancelled responses whose response.done is due, oldest first (an ordered set).
        self._cancelling: dict[str, None] = {}
        self._discarded: set[str] = set()  # cancelled, cut or given up: their late events drop
        # For events without a response_id (StepFun's documented samples): the response each
        # announced item is of, and the latest response started (see response_of).
        self._item_responses: dict[str, str] = {}
        self._latest: str | None = None
        self._deferred: list[Action] = []  # commands that must wait for the model to be idle
        self.alive_ms = 0  # stream time the active response last started or spoke
        self.tools = ToolCalls()
        self.guide = Guide(instructions)

    def _resolve(self, next_state):
        if next_state == SETTLES:
            return ResponseState.CANCELLING if self._cancelling else ResponseState.IDLE
        return next_state

    @property
    def idle(self) -> bool:
        return self.state is ResponseState.IDLE

    # --- events ----------------------------------------------------------------------------

    def item_added(self, response_id: str, item_id: str) -> None:
        self._item_responses[item_id] = response_id

    def started(self, response_id: str, stream_ms: int) -> None:
        self._fire("started")
        self.active = self._latest = response_id
        self.alive_ms = stream_ms
        self.guide.started(response_id)

    def spoke(self, stream_ms: int) -> None:
        self.alive_ms = stream_ms

    def done(self, response_id: str) -> list[Action]:
        """response.done: the state moves on; the persona's instructions come back if this
        response had its own."""
        if response_id == self.active:
            self.active = None
            self._cancelling.pop(response_id, None)
            self._fire("done")
        elif response_id in self._cancelling:
            del self._cancelling[response_id]
            self._fire("cancelled_done")
        else:
            self._fire("other_done")
        return self.guide.done(response_id)

    def cancel(self) -> list[Action]:
        """Barge-in: cancel the response in progress, if any; its done is still to come."""
        if self.active is None:
            return []
        self._discarded.add(self.active)
        self._cancelling[self.active] = None
        self.active = None
        self._fire("cancel")
        return [ToModel(CancelResponse())]

    def give_up(self) -> list[Action]:
        """A stuck response: cancelled but not awaited (a stuck session may never answer the
        cancel either). If it had instructions of its own, the persona's come back now: its
        response.done, which would bring them back, may never come."""
        given_up = self.active
        if given_up is None:
            return []
        self._discarded.add(given_up)
        self.active = None
        self._fire("give_up")
        return [ToModel(CancelResponse()), *self.guide.given_up(given_up)]

    def new_session(self) -> bool:
        """A new model session knows nothing of the old one's responses. True if one was being
        generated (the new session is asked to finish it)."""
        was_answering = self.active is not None
        self.active, self._cancelling = None, {}
        self.tools.by_response.clear()
        self._deferred = []
        # The new session was configured with the persona's own instructions.
        self.guide.reset()
        self._fire("new_session")
        return was_answering

    # --- commands that wait for the model to be idle --------------------------------------

    def when_idle(self, actions: list[Action]) -> list[Action]:
        """Send now if the model is idle, else once its response is done (sending
        response.create during one is an error: "ongoing response already exists")."""
        if self.idle:
            return actions
        self._deferred += actions
        return []

    def after_asked(self, actions: list[Action]) -> list[Action]:
        """As ``when_idle``, but also after a guided response that was asked for and has not
        started yet: the model is idle until its response.created, and a response.create then
        would be refused ("ongoing response already exists")."""
        if self.guide.waiting:
            self._deferred += actions
            return []
        return self.when_idle(actions)

    def release(self, *, even_if_busy: bool = False) -> list[Action]:
        """What waited, once the model is idle (or at once, after a stalled response)."""
        if not self._deferred or not (self.idle or even_if_busy):
            return []
        actions, self._deferred = self._deferred, []
        return actions

    def drop_deferred(self) -> list[Action]:
        """What waited is no longer wanted (a handoff went on without its sentence). A guided
        response asked for and not done (waiting here, or sent and never started) is not
        wanted either: the persona's instructions come back."""
        self._deferred = []
        return self.guide.abandon()

    # --- rules -----------------------------------------------------------------------------

    def stalled(self, stream_ms: int, playing: bool) -> bool:
        """A response that has said nothing for RESPONSE_STALL_MS (nothing left to play)."""
        return (
            self.active is not None
            and not playing
            and stream_ms - self.alive_ms >= RESPONSE_STALL_MS
        )

    def discard(self, response_id: str) -> None:
        self._discarded.add(response_id)

    def discarded(self, response_id: str) -> bool:
        return response_id in self._discarded

    def response_of(self, response_id: str | None, item_id: str | None, played: str | None) -> str:
        """The response an event is of. StepFun's documented samples leave response_id out of
        audio and transcript deltas, function-call events and a tool call's response.done, so
        an event without one is of its item's response if the item is known (played, or
        announced by response.output_item.added), else of the response in progress, else of
        the latest one started (a late event of a cancelled response is then dropped with it).

        This lives here, not in the dialect: the dialect is pure and shared by every session,
        while the call tracks the response in progress and the items it played.

        Known limit: a late delta without a response_id, of a cancelled response, for an item
        neither played nor announced, arriving after the next response started, is taken as
        the new response's and plays. Nothing in it tells the two apart, and the other choice
        (an unknown item is the cancelled response's while its done is due) would silence the
        new response's first item whenever the model is slow with, or never sends, the
        cancelled one's done. A cancelled response stops generating, so its items are almost
        always known already, and response.output_item.added (D-REF's sample has the id)
        announces new ones with their response."""
        if response_id:
            return response_id
        if item_id is not None:
            if played is not None:
                return played
            if (known := self._item_responses.get(item_id)) is not None:
                return known
        if self.active is not None:
            return self.active
        if len(self._cancelling) == 1:
            return next(iter(self._cancelling))
        return self._latest or ""

    def done_of(self, response_id: str | None, tool_calls: tuple[ToolCall, ...]) -> str:
        """The response a response.done is of. StepFun's documented tool-call sample has none
        of the ids, so an id-less done is, in this order:

        1. of the response a tool call it lists was already noted for (an id says it all);
        2. of the oldest cancelled response whose done is due, even while a newer response is
           in progress. The documented order is a cancelled response's done before the next
           response.created, so while the model keeps it nothing is due when a new response
           starts; a cancelled response still due then means its done is late, and an id-less
           done is far more likely that one than the new response's (which has only just
           started). Taking it for the new one would close that one early, and its later
           deltas for new items would be attributed to the cancelled response and dropped.
           If the cancelled response's done never comes, the new response's done is taken
           for it: the new one stays in progress until it is given up as stalled
           (RESPONSE_STALL_MS), a bounded wait instead of a caller who hears nothing;
        3. otherwise as any event (response_of): the response in progress, or the latest."""
        if response_id:
            return response_id
        for tool_call in tool_calls:
            if (noted := self.tools.response_of_call(tool_call.call_id)) is not None:
                return noted
        if self._cancelling:
            return next(iter(self._cancelling))
        return self.response_of(None, None, None)


class ToolCalls:
    """Tool calls by response, handled at its end (the documented tool flow: output and the
    next response only after response.done)."""

    def __init__(self) -> None:
        # Call ids, from either place they are listed: the response each was noted for.
        self._seen: dict[str, str] = {}
        self.by_response: dict[str, list[ToolCall]] = {}

    def note(self, response_id: str, tool_call: ToolCall) -> None:
        """Keep a tool call for its response's end, once: it may be listed both by
        function_call_arguments.done and in response.done's output (D-GUIDE 自定义 Tool Call)."""
        if tool_call.call_id in self._seen:
            return
        self._seen[tool_call.call_id] = response_id
        self.by_response.setdefault(response_id, []).append(tool_call)

    def response_of_call(self, call_id: str) -> str | None:
        return self._seen.get(call_id)

    def of(self, response_id: str) -> list[ToolCall]:
        return self.by_response.pop(response_id, [])


class Guide:
    """A response with instructions of its own, the way StepFun documents (D-GUIDE
    开发技巧/实现开场白): they become the session's instructions, then response.create
    (carrying them too, as the guide's sample does); StepFun documents no per-response
    instructions. The persona's come back when that response is done."""

    def __init__(self, instructions: str) -> None:
        self._instructions = instructions  # the persona's own
        self._pending = False  # such a response was asked for and has not started
        self._response: str | None = None  # it started: restore when it is done

    @property
    def waiting(self) -> bool:
        """Such a response was asked for and has not started."""
        return self._pending

    def respond(self, instructions: str) -> list[Action]:
        self._pending = True
        return [
            ToModel(UpdateInstructions(instructions)),
            ToModel(CreateResponse(instructions=instructions)),
        ]

    def started(self, response_id: str) -> None:
        if self._pending:
            self._pending, self._response = False, response_id

    def done(self, response_id: str) -> list[Action]:
        if response_id != self._response:
            return []
        # Back to the persona's own instructions before anything else asks for a response.
        self._response = None
        return [self._restore()]

    def given_up(self, response_id: str) -> list[Action]:
        """The response was given up on (stalled): a stuck model may never send its
        response.done, and every later answer would follow these instructions. A guided
        response still waiting to be sent keeps its turn (it is sent next)."""
        if response_id != self._response:
            return []
        self._response = None
        return [self._restore()]

    def abandon(self) -> list[Action]:
        """The guided response is not wanted any more, started or not: the persona's
        instructions come back (its response.done, if it ever comes, changes nothing)."""
        if not self._pending and self._response is None:
            return []
        self.reset()
        return [self._restore()]

    def reset(self) -> None:
        self._pending, self._response = False, None

    def _restore(self) -> Action:
        return ToModel(UpdateInstructions(self._instructions))
