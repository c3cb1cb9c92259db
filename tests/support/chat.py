"""The protocol v1 client of every test: keeps every object the server sent, in order, and waits for conditions
with a deadline (never a sleep-and-hope). Over a real WebSocket through nginx (`ChatClient.open`) in the system and
browser tests, over an in-process ASGI socket (`ChatClient.over(AsgiSocket)`, support/asgi.py) in the unit tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import websockets

from .addresses import forwarded
from .names import remember, token_for

Obj = dict[str, Any]
T = TypeVar("T")


async def eventually(condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05) -> None:
    """Waits until `condition()` holds; fails with `what` when the deadline passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def eventually_async(
    condition: Callable[[], Awaitable[bool]], *, timeout: float, what: str, interval: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def poll(probe: Callable[[], T | None], *, timeout: float, what: str, interval: float = 1.0) -> T:
    """`eventually` for tests that are not async, returning what `probe` found: calls it until it returns something
    other than None; fails with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def answer_to(ref: str) -> Callable[[Obj], bool]:
    """The server's answer to the say with this ref: its message, or an error."""
    return lambda obj: obj.get("ref") == ref and obj["type"] in ("message", "error")


class Socket(Protocol):
    """What the client needs of a socket: websockets' client connection, or support.asgi.AsgiSocket."""

    @property
    def close_code(self) -> int | None: ...

    async def send(self, data: str | bytes) -> None: ...

    def __aiter__(self) -> AsyncIterator[str | bytes]: ...

    async def close(self) -> None: ...


class ChatClient:
    def __init__(self, ws: Socket) -> None:
        self.ws = ws
        self.objects: list[Obj] = []
        self.frames = 0
        self.welcome: Obj | None = None
        self.close_code: int | None = None
        # Set whenever an object arrives (or the socket ends): waiting wakes at once, not at the next poll.
        self._arrived = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        origin: str | None = None,
        address: str | None = None,
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> ChatClient:
        """A new socket, from `address` (a fresh one when None: see addresses.py), with more `headers` if given."""
        headers = forwarded(address) | ({"Origin": origin} if origin else {}) | (headers or {})
        ws = await websockets.connect(
            url, additional_headers=headers, compression=None, open_timeout=15, max_size=None, **options
        )
        return cls(ws)

    @classmethod
    def over(cls, socket: Socket) -> ChatClient:
        """A client on a socket opened some other way (support/asgi.py)."""
        return cls(socket)

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                self.frames += 1
                text = frame if isinstance(frame, str) else frame.decode()
                # A server frame holds one or more objects, one per line.
                for line in text.split("\n"):
                    self.objects.append(json.loads(line))
                self._arrived.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code if self.ws.close_code is not None else 1006
            self._arrived.set()

    @property
    def closed(self) -> bool:
        return self._reader.done()

    @property
    def replica(self) -> str:
        assert self.welcome is not None, "not joined"
        return str(self.welcome["replica"])

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def send(self, obj: Obj) -> None:
        await self.ws.send(json.dumps(obj))

    async def join(
        self,
        name: str,
        room: str | None = "lobby",
        since: str | None = None,
        timeout: float = 15,
        *,
        token: str | None = None,
        moderator: str | None = None,
    ) -> Obj:
        """Joins as `name`, with its token from this run's jar (support/names.py) unless one is given; as a
        moderator with a moderator's token."""
        frame: Obj = {"type": "join", "name": name}
        if moderator is not None:
            frame["moderator"] = moderator
        if room is not None:
            frame["room"] = room
        if since is not None:
            frame["since"] = since
        token = token or token_for(name.strip())
        if token is not None:
            frame["token"] = token
        start = len(self.objects)
        await self.send(frame)
        reply = await self.wait_for(lambda o: o["type"] in ("welcome", "error"), timeout=timeout, start=start)
        if reply["type"] == "error":
            raise AssertionError(f"join refused: {reply}")
        if "token" in reply:
            remember(reply["name"], reply["token"])
            remember(name.strip(), reply["token"])
        self.welcome = reply
        return reply

    async def say(self, text: str, ref: str | None = None) -> None:
        frame: Obj = {"type": "say", "text": text}
        if ref is not None:
            frame["ref"] = ref
        await self.send(frame)

    async def reply_to(self, frame: Obj | str | bytes, timeout: float = 10) -> Obj:
        """Sends a frame and returns the server's answer to it: a welcome, an error, or an object with a ref (not
        someone else's traffic)."""
        start = len(self.objects)
        await (self.send(frame) if isinstance(frame, dict) else self.send_raw(frame))
        return await self.wait_for(
            lambda o: o["type"] in ("welcome", "error") or o.get("ref") is not None, timeout=timeout, start=start
        )

    async def say_and_wait(self, text: str, ref: str, timeout: float = 10) -> Obj:
        """Says something and returns the server's reply to it: its own message (accepted) or an error."""
        start = len(self.objects)
        await self.say(text, ref)
        return await self.wait_for(answer_to(ref), timeout=timeout, start=start)

    def of_type(self, kind: str) -> list[Obj]:
        return [obj for obj in self.objects if obj["type"] == kind]

    def messages(self) -> list[Obj]:
        """Every message received: the welcome's history first, then live ones."""
        history: list[Obj] = []
        for obj in self.objects:
            if obj["type"] == "welcome":
                history.extend(obj["history"])
        return history + self.of_type("message")

    def texts(self) -> list[str]:
        return [str(m["text"]) for m in self.messages()]

    async def wait_for(self, predicate: Callable[[Obj], bool], *, timeout: float = 10, start: int = 0) -> Obj:
        deadline = time.monotonic() + timeout
        index = start
        while True:
            while index < len(self.objects):
                obj = self.objects[index]
                index += 1
                if predicate(obj):
                    return obj
            if self.closed:
                raise AssertionError(f"connection closed ({self.close_code}) while waiting; got {self.objects[start:]}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout}s; received since: {self.objects[start:][-10:]}")
            self._arrived.clear()
            if index == len(self.objects) and not self.closed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)

    async def wait_closed(self, timeout: float = 10) -> int:
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        assert self.close_code is not None
        return self.close_code

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.wait_for(asyncio.shield(self._reader), 10)


async def client_on(
    url: str,
    replica: str | None,
    *,
    name: str,
    room: str,
    since: str | None = None,
    origin: str | None = None,
    attempts: int = 40,
    moderator: str | None = None,
) -> ChatClient:
    """A joined client (resuming after `since`, when given) on the given replica (or on any, for None). nginx sends a
    new socket to the replica with the fewest, so sockets that land elsewhere stay open until one lands right, then
    close."""
    others: list[ChatClient] = []
    try:
        for _ in range(attempts):
            client = await ChatClient.open(url, origin=origin)
            await client.join(name, room, since=since, moderator=moderator)
            if replica is None or client.replica == replica:
                return client
            others.append(client)
        raise AssertionError(f"no connection landed on replica {replica} in {attempts} attempts")
    finally:
        for other in others:
            await other.close()


async def clients_on_each_replica(
    url: str, replicas: list[str], *, room: str, prefix: str = "user"
) -> list[ChatClient]:
    """One joined client per replica, in the order given."""
    return [await client_on(url, replica, name=f"{prefix}-{i}", room=room) for i, replica in enumerate(replicas)]


async def still_chats(url: str, replicas: list[str], room: str) -> None:
    """The replicas still serve everyone else: a new client on each joins, and what the first says is accepted and
    heard by the others."""
    tag = secrets.token_hex(3)
    clients = [await client_on(url, replica, name=f"check-{n}-{tag}", room=room) for n, replica in enumerate(replicas)]
    sent = await clients[0].say_and_wait(f"still here {tag}", f"still-{tag}")
    assert sent["type"] == "message", sent
    for other in clients[1:]:
        heard = await other.wait_for(lambda o: o["type"] == "message" and o.get("ref") == f"still-{tag}")
        assert heard == sent
    for client in clients:
        await client.close()
