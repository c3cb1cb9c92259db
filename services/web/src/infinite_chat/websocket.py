"""The chat socket at /ws, served straight on ASGI in front of the Quart app.

Why not `@app.websocket`: the send path is where a chat spends its time (one frame per recipient), and every layer
on it costs per frame. Quart's websocket object adds an `asyncio.sleep(0)`, a signal dispatch and a queue hop.
Under Hypercorn, frames are written straight to the connection's transport (`hypercorn_internals.DirectFrames`);
any other server gets the plain ASGI send (`AsgiFrames`). Figures: docs/performance.md. Everything that is not this
socket (HTTP routes, startup and shutdown, the test client) stays Quart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope, WebsocketScope

from . import metrics
from .addresses import client_address
from .connection import Connection
from .hypercorn_internals import DirectFrames, direct_frames
from .protocol import CloseCode, HttpError
from .replica import Replica
from .session import Session
from .signin import ALB_DATA_MAX_BYTES, TOKEN_MAX_BYTES, Credentials

PATH = "/ws"
log = logging.getLogger(__name__)

ASGIApp = Any  # Quart's asgi_app: (scope, receive, send) -> awaitable


def credentials(scope: WebsocketScope) -> Credentials:
    """The sign-in the upgrade request carries; anything over its bound is left for the verifier to refuse."""
    query = scope.get("query_string", b"")
    tokens = parse_qs(query.decode("latin-1"), max_num_fields=8).get("token") if query else None
    token = tokens[0][: TOKEN_MAX_BYTES + 1] if tokens else None
    alb_data = None
    for key, value in scope["headers"]:
        if key.lower() == b"x-amzn-oidc-data":
            alb_data = value[: ALB_DATA_MAX_BYTES + 1].decode("latin-1")
    return Credentials(token=token, alb_data=alb_data)


def note_ignored_sign_in(credentials: Credentials, auth_mode: str) -> None:
    """An x-amzn-oidc-data header where no ALB signs people in: a proxy in front passes on a client's own (nginx
    clears it: services/nginx/proxy-headers.conf). Ignored, and said, so that a setup that lets it through shows."""
    if credentials.alb_data is not None and auth_mode != "alb":
        log.warning("sign-in header ignored", extra={"event": "sign_in_header_ignored", "auth_mode": auth_mode})


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
            await _refuse(send, 403, HttpError.FORBIDDEN_ORIGIN, "This page's origin may not open a chat socket.")
            return
        if replica.draining:
            await _refuse(send, 503, HttpError.DRAINING, "This replica is restarting; try again.")
            return
        address = client_address(scope["headers"], scope.get("client"))
        if not replica.sockets.open(address):
            metrics.SOCKETS_REFUSED.labels(HttpError.TOO_MANY_SOCKETS).inc()
            await _refuse(send, 429, HttpError.TOO_MANY_SOCKETS, "Too many chat sockets from your address; close some.")
            return
        try:
            await self._chat(scope, address, receive, send)
        finally:
            replica.sockets.closed(address)

    async def _chat(
        self, scope: WebsocketScope, address: str, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        replica = self.replica
        settings = replica.settings
        await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
        sink: DirectFrames | AsgiFrames = direct_frames(send) or AsgiFrames(send)
        rooms = replica.rooms
        connection = Connection(
            sink,
            replica.flusher,
            outbox_limit=settings.outbox_limit,
            outbox_limit_bytes=settings.outbox_limit_bytes,
            on_overflow=rooms.remove,
        )
        signed = credentials(scope)
        note_ignored_sign_in(signed, settings.auth_mode)
        session = Session(
            connection,
            rooms,
            replica.broker,
            settings,
            address=address,
            allowances=replica.allowances,
            signin=replica.signin,
            credentials=signed,
        )
        replica.opened(connection)
        try:
            while True:
                event = await receive()
                if event["type"] != "websocket.receive":
                    break
                text = event.get("text")
                await session.handle(text if text is not None else event.get("bytes") or b"")
        finally:
            connection.release()
            replica.closed(connection)
            await asyncio.shield(session.end())
            log.debug("socket closed", extra={"event": "socket_closed", "connection": connection.id})


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
        self._queue.put_nowait((CloseCode.TRY_AGAIN, "too slow"))

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


async def _refuse(send: ASGISendCallable, status: int, code: HttpError, detail: str) -> None:
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
