"""A WebSocket to an ASGI application in this process: the events a server (Hypercorn) would send it, and its
answers as frames. The unit tests drive the replica's chat socket (create_app, on the in-memory broker) through
this with the same protocol client as the system tests (support/chat.py), without a server or Quart's private
test-client internals."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

Event = MutableMapping[str, Any]
ASGIApp = Callable[[Event, Callable[[], Awaitable[Event]], Callable[[Event], Awaitable[None]]], Awaitable[None]]


class Refused(Exception):
    """The application refused the upgrade with an HTTP answer."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"upgrade refused with {status}")
        self.status = status
        self.body = body


class AsgiSocket:
    def __init__(self) -> None:
        self._to_app: asyncio.Queue[Event] = asyncio.Queue()
        self._from_app: asyncio.Queue[Event | None] = asyncio.Queue()
        self.close_code: int | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        app: ASGIApp,
        *,
        path: str = "/ws",
        query: str = "",
        headers: dict[str, str] | None = None,
        client: tuple[str, int] = ("127.0.0.1", 40000),
    ) -> AsgiSocket:
        """Connects and waits for the application to accept; raises Refused for an HTTP answer instead."""
        socket = cls()
        scope: Event = {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "scheme": "ws",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()],
            "client": client,
            "server": ("127.0.0.1", 8000),
            "subprotocols": [],
            "extensions": {"websocket.http.response": {}},
        }
        socket._task = asyncio.create_task(socket._serve(app, scope))
        await socket._to_app.put({"type": "websocket.connect"})
        first = await asyncio.wait_for(socket._from_app.get(), 10)
        if first is not None and first["type"] == "websocket.http.response.start":
            body = b""
            while (part := await asyncio.wait_for(socket._from_app.get(), 10)) is not None:
                body += part.get("body", b"")
                if not part.get("more_body"):
                    break
            raise Refused(int(first["status"]), body)
        if first is None or first["type"] != "websocket.accept":
            raise AssertionError(f"the application answered the connect with {first}")
        return socket

    async def _serve(self, app: ASGIApp, scope: Event) -> None:
        try:
            await app(scope, self._to_app.get, self._from_app.put)
        finally:
            await self._from_app.put(None)  # the application is done with this socket

    async def send(self, data: str | bytes) -> None:
        if isinstance(data, str):
            await self._to_app.put({"type": "websocket.receive", "text": data, "bytes": None})
        else:
            await self._to_app.put({"type": "websocket.receive", "text": None, "bytes": data})

    async def __aiter__(self) -> AsyncIterator[str | bytes]:
        """The frames the application sends, until it closes the socket."""
        while True:
            event = await self._from_app.get()
            if event is None:
                self.close_code = self.close_code or 1006
                return
            if event["type"] == "websocket.send":
                yield event["text"] if event.get("text") is not None else event["bytes"]
            elif event["type"] == "websocket.close":
                self.close_code = int(event.get("code", 1000))
                return

    async def close(self) -> None:
        """The client's close: the application hears the disconnect and ends the socket."""
        await self._to_app.put({"type": "websocket.disconnect", "code": 1000})
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, 10)
        if self.close_code is None:
            self.close_code = 1000
