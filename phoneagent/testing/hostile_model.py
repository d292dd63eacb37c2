"""A model server that misbehaves while a session is set up, for fault tests and benchmarks.

The protocol fake (``fake_model.py``) behaves as StepFun documents; this one does what a broken
network, an overloaded host or a buggy release would: answer nothing, stop half-way, or send
what no document describes. Each connection gets the same :class:`SetupFault`.

    async with HostileModel(SetupFault.NO_SESSION_UPDATED) as hostile:
        connector = ModelConnector(url=hostile.url, api_key="k", model="stepaudio-2.5-realtime")
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import hashlib
import json

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

__all__ = ["HostileModel", "SetupFault"]

# The first server event as StepFun's reference shows it (session.created sample), minus what
# each fault takes away.
SESSION = {
    "id": "sess_hostile",
    "object": "realtime.session",
    "model": "stepaudio-2.5-realtime",
    "modalities": ["text", "audio"],
    "instructions": "",
    "voice": "linjiajiejie",
    "input_audio_format": "pcm16",
    "output_audio_format": "pcm16",
}
HUGE_BYTES = 9 * 1024 * 1024  # past any sane client's message limit
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3


class SetupFault(enum.Enum):
    NO_UPGRADE = "no_upgrade"  # TCP accepted, the HTTP upgrade never answered
    NO_SESSION_CREATED = "no_session_created"  # upgraded, then silence
    NO_SESSION_UPDATED = "no_session_updated"  # session.created, then silence
    CLOSED_AFTER_CREATED = "closed_after_created"  # session.created, then a close
    NOT_JSON = "not_json"  # a text frame that is not JSON
    NO_SESSION_OBJECT = "no_session_object"  # session.created without `session`
    SESSION_NOT_OBJECT = "session_not_object"  # session.created with `session: "x"`
    JSON_LIST = "json_list"  # a top-level JSON list
    BINARY = "binary"  # a binary frame
    HUGE = "huge"  # a frame of several MiB
    DEEP = "deep"  # deeply nested JSON
    DEAF = "deaf"  # upgraded, session.created, then deaf: not even a close is answered


class HostileModel:
    """Listens on 127.0.0.1; ``connections`` counts the clients that came. With ``fault`` None
    the set-up succeeds (session.created, then session.updated for the update) and the model is
    mute ever after: no VAD event, no response, whatever the client sends."""

    def __init__(self, fault: SetupFault | None = None) -> None:
        self.fault = fault
        self.connections = 0
        self._server: Server | asyncio.Server | None = None
        self._held: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    async def __aenter__(self) -> HostileModel:
        if self.fault is SetupFault.NO_UPGRADE:
            self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        elif self.fault is SetupFault.DEAF:
            self._server = await asyncio.start_server(self._deaf, "127.0.0.1", 0)
        else:
            self._server = await serve(self._handle, "127.0.0.1", 0, max_size=None)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for writer in self._held:
            writer.close()
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read the upgrade request and never answer it."""
        self.connections += 1
        self._held.add(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(4096):
                pass

    async def _deaf(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer the upgrade (RFC 6455 4.2.2) and send session.created by hand, then read and
        ignore everything, close frames included: a websockets server would answer the close."""
        self.connections += 1
        self._held.add(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        created = json.dumps({"type": "session.created", "session": SESSION}).encode()
        writer.write(bytes([0x81, 126]) + len(created).to_bytes(2, "big") + created)
        with contextlib.suppress(ConnectionError):
            while await reader.read(4096):
                pass

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        created = json.dumps({"type": "session.created", "event_id": "e1", "session": SESSION})
        fault = self.fault
        with contextlib.suppress(ConnectionClosed):
            if fault is None:
                await ws.send(created)
                await ws.recv()  # the session.update
                updated = {"type": "session.updated", "event_id": "e2", "session": SESSION}
                await ws.send(json.dumps(updated))
                async for _ in ws:  # heard, never answered
                    pass
            elif fault is SetupFault.NO_SESSION_UPDATED or fault is SetupFault.CLOSED_AFTER_CREATED:
                await ws.send(created)
                if fault is SetupFault.CLOSED_AFTER_CREATED:
                    await ws.close(1011, "internal error")
                    return
            elif fault is not SetupFault.NO_SESSION_CREATED:
                await ws.send(_garbage(fault))
            await ws.wait_closed()


def _garbage(fault: SetupFault) -> str | bytes:
    match fault:
        case SetupFault.NOT_JSON:
            return "<html>502 Bad Gateway</html>"
        case SetupFault.NO_SESSION_OBJECT:
            return json.dumps({"type": "session.created", "event_id": "e1"})
        case SetupFault.SESSION_NOT_OBJECT:
            return json.dumps({"type": "session.created", "session": "sess_1"})
        case SetupFault.JSON_LIST:
            return json.dumps([{"type": "session.created", "session": SESSION}])
        case SetupFault.BINARY:
            return b"\x00\x01binary"
        case SetupFault.HUGE:
            return json.dumps({"type": "session.created", "pad": "x" * HUGE_BYTES})
        case SetupFault.DEEP:
            return "[" * 100_000 + "]" * 100_000
    raise ValueError(f"not a garbage fault: {fault}")
