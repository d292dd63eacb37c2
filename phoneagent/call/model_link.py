"""The model session under a call: renewed before StepFun's 30-minute end, reopened when it
drops, given up on after RECONNECT_DELAYS. No I/O: the shell opens sessions when told to and
reports how it went (``Call.on_model_dropped`` and the others).
"""

from __future__ import annotations

import enum
from typing import ClassVar

from phoneagent.call.actions import Action, ReconnectModel, ToModel
from phoneagent.call.machine import Machine, Unexpected
from phoneagent.realtime.base import AddTextItem

# StepFun ends a session at 30 minutes (reference section 7): a call renews its session before
# that, at a quiet moment.
SESSION_RENEW_SECONDS = 25 * 60
# A renewal that failed is tried again this much later (the old session has minutes left).
RENEW_RETRY_SECONDS = 60.0
# A dropped model session is reopened at once, then after these pauses; then the caller hears
# the persona's apology. The caller hears silence meanwhile, so the whole is a few seconds.
RECONNECT_DELAYS = (0.0, 0.5, 1.5)


class LinkState(enum.Enum):
    CONNECTED = "connected"
    RENEWING = "renewing"  # a new session is being opened; the old one still serves
    RECONNECTING = "reconnecting"  # the session dropped: nothing reaches the model
    LOST = "lost"  # every reconnect failed: the call ends


class ModelLink(Machine[LinkState]):
    TRANSITIONS: ClassVar[dict] = {
        (LinkState.CONNECTED, "renew"): LinkState.RENEWING,
        (LinkState.RENEWING, "switched"): LinkState.CONNECTED,
        (LinkState.RENEWING, "renewal_failed"): LinkState.CONNECTED,  # retried later
        (LinkState.CONNECTED, "dropped"): LinkState.RECONNECTING,
        (LinkState.RENEWING, "dropped"): LinkState.RECONNECTING,
        (LinkState.RECONNECTING, "reconnect_failed"): LinkState.RECONNECTING,
        (LinkState.RECONNECTING, "switched"): LinkState.CONNECTED,
        (LinkState.RECONNECTING, "given_up"): LinkState.LOST,
    }

    def __init__(self, now: float, unexpected: Unexpected) -> None:
        super().__init__(LinkState.CONNECTED, unexpected)
        self._session_started = now
        self._failures = 0  # reconnect attempts failed since the drop
        # Notes for the model said while no session could hear them (a time-limit warning,
        # keypad digits, a failed transfer): the new session hears them after the replay.
        self._held: list[Action] = []

    def renewal_due(self, now: float, quiet: bool) -> bool:
        if not quiet or self.state is not LinkState.CONNECTED:
            return False
        if now - self._session_started < SESSION_RENEW_SECONDS:
            return False
        self._fire("renew")
        return True

    def renewal_failed(self, now: float) -> None:
        if self._fire("renewal_failed"):
            self._session_started = now - SESSION_RENEW_SECONDS + RENEW_RETRY_SECONDS

    def dropped(self) -> list[Action]:
        self._fire("dropped")
        self._failures = 0
        return [ReconnectModel(RECONNECT_DELAYS[0])]

    def reconnect_failed(self) -> list[Action]:
        """The next attempt, or [] when there is none left (the call is lost)."""
        self._failures += 1
        if self._failures < len(RECONNECT_DELAYS):
            self._fire("reconnect_failed")
            return [ReconnectModel(RECONNECT_DELAYS[self._failures])]
        self._fire("given_up")
        return []

    def switched(self, now: float) -> list[Action]:
        """A new session serves the call: the notes held for it."""
        self._fire("switched")
        self._session_started = now
        held, self._held = self._held, []
        return held

    def outbound(self, actions: list[Action]) -> list[Action]:
        """While reconnecting nothing reaches the model. Notes are held for the new session;
        the rest is dropped on purpose: audio, cancels, truncations and tool outputs refer to
        the old session's buffer, responses, items and calls, and what the new session must say
        is decided when it comes (``Call.on_model_reconnected``)."""
        if self.state is not LinkState.RECONNECTING:
            return actions
        kept: list[Action] = []
        for action in actions:
            if isinstance(action, ToModel):
                if isinstance(action.command, AddTextItem):
                    self._held.append(action)
                continue
            kept.append(action)
        return kept
