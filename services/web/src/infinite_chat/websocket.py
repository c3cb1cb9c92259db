"""The chat socket at /ws, served straight on ASGI in front of the Quart app.

Why not `@app.websocket`: the send path is where a chat spends its time (one frame per recipient), and every layer
on it costs per frame. Quart's websocket object adds an `asyncio.sleep(0)`, a signal dispatch and a queue hop;
Hypercorn's ASGI send adds an event object, wsproto and a lock. Under Hypercorn's HTTP/1.1 server, frames are
therefore written straight to the connection's transport (`DirectFrames`); everything else (the handshake, pings,
close, reading) stays with Hypercorn, and any other server gets the plain ASGI send. Figures: docs/performance.md.
Everything that is not this socket (HTTP routes, startup and shutdown, the test client) stays Quart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import orjson
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope, WebsocketScope
from wsproto.connection import ConnectionState

from . import metrics
from .addresses import client_address
from .connection import CLOSE_TRY_AGAIN, Connection
from .replica import Replica
from .session import Session

PATH = "/ws"
log = logging.getLogger(__name__)

ASGIApp = Any  # Quart's asgi_app: (scope, receive, send) -> awaitable


def origin_allowed(headers: Iterable[tuple[bytes, bytes]], allowed: frozenset[str]) -> bool:
    """Refuses cross-site WebSocket hijacking: a browser always sends Origin, and only our own page (or a listed
    origin) may open a socket. Clients that are not browsers send no Origin and are let in."""
    origin = host = None
    for key, value in headers:
        if key == b"origin":
            origin = value.decode("latin-1").strip().lower().rstrip("/")
        elif key == b"host":
            host = value.decode("latin-1").strip().lower()
    if origin is None:
        return True
    if origin in allowed:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and host is not None and parts.netloc == host


class ChatSocketRoute:
    def __init__(self, replica: Replica, app: ASGIApp) -> None:
        self.replica = replica
        self.app = app

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "websocket" and scope["path"] == PATH:
            await self.serve(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def serve(self, scope: WebsocketScope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        replica = self.replica
        event = await receive()
        if event["type"] != "websocket.connect":
            return
        if not origin_allowed(scope["headers"], replica.settings.allowed_origins):
            await _refuse(send, 403, "forbidden_origin", "This page's origin may not open a chat socket.")
            return
        if replica.draining:
            await _refuse(send, 503, "draining", "This replica is restarting; try again.")
            return
        address = client_address(scope["headers"], scope.get("client"))
        if not replica.sockets.open(address):
            metrics.SOCKETS_REFUSED.labels("too_many_sockets").inc()
            await _refuse(send, 429, "too_many_sockets", "Too many chat sockets from your address; close some.")
            return
        try:
            await self._chat(address, receive, send)
        finally:
            replica.sockets.closed(address)

    async def _chat(self, address: str, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        replica = self.replica
        settings = replica.settings
        await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
        sink: DirectFrames | AsgiFrames = DirectFrames.under(send) or AsgiFrames(send)
        rooms = replica.rooms
        connection = Connection(
            sink,
            replica.flusher,
            outbox_limit=settings.outbox_limit,
            outbox_limit_bytes=settings.outbox_limit_bytes,
            on_overflow=rooms.remove,
        )
        session = Session(connection, rooms, replica.broker, settings, address=address, allowances=replica.allowances)
        replica.opened(connection)
        try:
            while True:
                event = await receive()
                if event["type"] != "websocket.receive":
                    break
                text = event.get("text")
                await session.handle(text if text is not None else event.get("bytes") or b"")
        finally:
            sink.stop()
            connection.release()
            replica.closed(connection)
            await asyncio.shield(session.end())
            log.debug("socket closed", extra={"event": "socket_closed", "connection": connection.id})


# Above this many bytes waiting in the transport (the asyncio default high-water mark) the peer counts as behind.
WRITE_BUFFER_HIGH = 64 * 1024


class DirectFrames:
    """Writes text frames to the socket under Hypercorn's WebSocket stream, as Hypercorn would but without its
    per-frame layers. A server frame is a 2-10 byte header and the payload (RFC 6455 5.2: servers do not mask, and
    no extension is negotiated because nginx strips the offer). Each write is a whole frame, so frames never
    interleave with Hypercorn's own (pings, close); nothing is written once the close handshake has begun, and the
    close itself goes through Hypercorn."""

    __slots__ = ("asgi_send", "stream", "transport", "writer")

    def __init__(self, stream: WSStream, writer: asyncio.StreamWriter, asgi_send: ASGISendCallable) -> None:
        self.stream = stream
        self.writer = writer
        self.transport = writer.transport
        self.asgi_send = asgi_send

    @classmethod
    def under(cls, send: ASGISendCallable) -> DirectFrames | None:
        """The direct path for this ASGI send, if it is Hypercorn's HTTP/1.1 WebSocket stream; else None."""
        stream = getattr(send, "__self__", None)
        if not isinstance(stream, WSStream):
            return None
        protocol = getattr(stream.send, "__self__", None)
        if not isinstance(protocol, H11Protocol):
            return None
        server = getattr(protocol.send, "__self__", None)
        if not isinstance(server, TCPServer):
            return None
        return cls(stream, server.writer, send)

    def write(self, payload: bytes) -> bool:
        transport = self.transport
        if self.stream.connection.state is not ConnectionState.OPEN or transport.is_closing():
            return True  # the socket is going away: nothing to wait for
        transport.write(frame_header(len(payload)) + payload)
        return transport.get_write_buffer_size() <= WRITE_BUFFER_HIGH

    async def drained(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def close(self, code: int, reason: str) -> None:
        await self.asgi_send({"type": "websocket.close", "code": code, "reason": reason})

    def abort(self) -> None:
        # Hypercorn sees the connection lost and ends the stream: the receive loop gets its disconnect.
        self.transport.abort()

    def stop(self) -> None:
        pass


class AsgiFrames:
    """The plain ASGI path, for any other server (and Quart's test client): frames go through a queue to one task,
    which keeps them in order."""

    def __init__(self, send: ASGISendCallable) -> None:
        self._send = send
        self._queue: asyncio.Queue[bytes | tuple[int, str]] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def write(self, payload: bytes) -> bool:
        self._queue.put_nowait(payload)
        return self._queue.qsize() <= 16

    async def drained(self) -> None:
        await self._queue.join()

    async def close(self, code: int, reason: str) -> None:
        self._queue.put_nowait((code, reason))

    def abort(self) -> None:
        # ASGI has no way to drop a connection: stop writing, and close it as soon as the server lets us.
        self._task.cancel()
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._queue.put_nowait((CLOSE_TRY_AGAIN, "too slow"))

    def stop(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            if isinstance(item, bytes):
                await self._send({"type": "websocket.send", "text": item.decode(), "bytes": None})
            else:
                await self._send({"type": "websocket.close", "code": item[0], "reason": item[1]})
            self._queue.task_done()


def frame_header(length: int) -> bytes:
    """FIN + text opcode, then the payload length in the shortest of its three encodings."""
    if length < 126:
        return bytes((0x81, length))
    if length < 65536:
        return b"\x81\x7e" + length.to_bytes(2, "big")
    return b"\x81\x7f" + length.to_bytes(8, "big")


async def _refuse(send: ASGISendCallable, status: int, code: str, detail: str) -> None:
    body = orjson.dumps({"error": code, "detail": detail})
    await send(
        {
            "type": "websocket.http.response.start",
            "status": status,
            # Hypercorn closes the connection after a refused upgrade; saying so keeps nginx from reusing it.
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
