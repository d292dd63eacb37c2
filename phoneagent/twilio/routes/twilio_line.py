"""The media stream's aiohttp WebSocket as the shell's ``TwilioLine``: Twilio's messages parsed
into typed events (malformed ones logged and skipped), message texts sent."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import WSMsgType, web

from phoneagent.logs import get_logger
from phoneagent.twilio.wire.stream import MalformedMessage, TwilioEvent, parse_message

log = get_logger(__name__)


class AiohttpTwilioLine:
    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        # One iterator for the stream's whole life: `start` is read from it, then the call.
        self._events = _twilio_events(ws)

    def events(self) -> AsyncIterator[TwilioEvent]:
        return self._events

    async def send(self, text: str) -> None:
        await self.ws.send_str(text)  # ConnectionError once the socket is gone

    async def close(self) -> None:
        await self.ws.close()


async def _twilio_events(ws: web.WebSocketResponse) -> AsyncIterator[TwilioEvent]:
    """Typed Twilio events; malformed messages are logged and skipped, the call goes on."""
    async for message in ws:
        if message.type is not WSMsgType.TEXT:
            if message.type is WSMsgType.ERROR:
                return
            log.warning("twilio_message_skipped", reason=f"{message.type.name} frame")
            continue
        try:
            yield parse_message(message.data)
        except MalformedMessage as exc:
            log.warning("twilio_message_skipped", reason=str(exc), size=len(message.data))
