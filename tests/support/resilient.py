"""A chat client that outlives its replica, as the web client does: when its socket closes it reconnects with
`since` (the last message id it holds), and sends again what was never acknowledged, but only if the resumed
history does not already hold it. It keeps the raw stream of message ids the server delivered, so a test can
count lost, repeated and reordered messages across any number of reconnections."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from typing import TYPE_CHECKING, Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from .addresses import forwarded, new_address
from .chat import eventually
from .names import remember, token_for

if TYPE_CHECKING:
    from .stack import Stack

Obj = dict[str, Any]


class ResilientClient:
    def __init__(
        self,
        url: str,
        name: str,
        room: str,
        *,
        origin: str | None = None,
        address: str | None = None,
        retry_unavailable: bool = False,
    ) -> None:
        self.url = url
        # One person, one address, across every reconnection.
        self.address = address or new_address()
        self.name = name
        self.room = room
        self.origin = origin
        # Every message id in the order the server delivered it, repeats included: the test's evidence.
        self.delivered: list[str] = []
        # Each message once, in order: what a user would see.
        self.messages: list[Obj] = []
        self.arrived: dict[str, float] = {}  # message id -> time.monotonic() of its first arrival
        self.ids: set[str] = set()
        self.presence: list[tuple[float, Obj]] = []
        # Who is online as this client keeps it: each welcome's list, then every event's joined and left.
        self.online: set[str] = set()
        self.errors: list[Obj] = []
        self.welcomes: list[Obj] = []
        # One entry per socket lost while joined: (replica it was on, close code it got).
        self.closes: list[tuple[str, int]] = []
        self.reconnect_seconds: list[float] = []  # from losing a socket to the welcome on the next one
        self.failed_attempts = 0  # connections refused or broken before a welcome
        self.unacked: dict[str, str] = {}  # ref -> text: sent, neither echoed nor refused yet
        self.sent_at: dict[str, float] = {}  # ref -> time.monotonic() of the first send
        self.refused: dict[str, Obj] = {}  # ref -> the error that refused it (other than rate_limited)
        # As the page does: a say refused with `unavailable` is sent again (same ref) after a pause, until echoed.
        self.retry_unavailable = retry_unavailable
        self.unavailable: dict[str, int] = {}  # ref -> how many times it was refused with `unavailable`
        self.resent: list[str] = []
        self._ws: ClientConnection | None = None
        self._live = asyncio.Event()
        self._stopping = False
        self._lost_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def last_id(self) -> str | None:
        return self.messages[-1]["id"] if self.messages else None

    @property
    def live(self) -> bool:
        return self._live.is_set()

    @property
    def replica(self) -> str:
        return str(self.welcomes[-1]["replica"])

    async def start(self, timeout: float = 30) -> ResilientClient:
        """Connects and joins; returns once the first welcome is in."""
        self._task = asyncio.create_task(self._run())
        try:
            await asyncio.wait_for(self._live.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.name} could not join within {timeout}s") from None
        return self

    async def say(self, text: str, ref: str) -> None:
        """Sends now if connected; otherwise it goes out after the next welcome (if the history lacks it)."""
        self.unacked[ref] = text
        self.sent_at.setdefault(ref, time.monotonic())
        ws = self._ws
        if ws is not None and self.live:
            # On a closed socket the reader reconnects, and the message, still unacked, goes out after the welcome.
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.send(json.dumps({"type": "say", "text": text, "ref": ref}, ensure_ascii=False))

    async def stop(self) -> None:
        self._stopping = True
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            await asyncio.wait_for(self._task, 15)

    def has(self, ref: str) -> bool:
        return any(m.get("ref") == ref and m.get("name") == self.name for m in self.messages)

    async def _run(self) -> None:
        delay = 0.05
        while not self._stopping:
            joined = False
            try:
                headers = forwarded(self.address) | ({"Origin": self.origin} if self.origin else {})
                async with websockets.connect(
                    self.url, additional_headers=headers, compression=None, open_timeout=15, max_size=None
                ) as ws:
                    self._ws = ws
                    join: Obj = {"type": "join", "name": self.name, "room": self.room}
                    if self.last_id is not None:
                        join["since"] = self.last_id
                    token = token_for(self.name)
                    if token is not None:
                        join["token"] = token  # the name is its own: a reconnect is the same person
                    await ws.send(json.dumps(join))
                    async for frame in ws:
                        text = frame if isinstance(frame, str) else frame.decode()
                        for line in text.split("\n"):
                            if await self._receive(ws, json.loads(line)):
                                joined = True
                                delay = 0.05
            except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.ConnectionClosed):
                pass
            ws_closed = self._ws
            self._ws = None
            if joined and ws_closed is not None:
                code = ws_closed.close_code if ws_closed.close_code is not None else 1006
                if not self._stopping:
                    self.closes.append((self.replica, code))
            elif not self._stopping:
                self.failed_attempts += 1
            if self._live.is_set():
                self._live.clear()
                self._lost_at = time.monotonic()
            if not self._stopping:
                # Jittered, growing backoff: a crowd reconnecting at once does not arrive in step.
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 1.0)

    async def _receive(self, ws: ClientConnection, obj: Obj) -> bool:
        """Handles one server object; True when it was the welcome."""
        kind = obj.get("type")
        if kind == "message":
            self._take(obj)
        elif kind == "welcome":
            self.welcomes.append(obj)
            if "token" in obj:
                remember(self.name, obj["token"])
            self.online = set(obj["online"])
            for message in obj["history"]:
                self._take(message)
            if self._lost_at is not None:
                self.reconnect_seconds.append(time.monotonic() - self._lost_at)
                self._lost_at = None
            # What the resumed history lacks never reached the log: send it again, once per socket.
            for ref, text in list(self.unacked.items()):
                if self.has(ref):
                    self.unacked.pop(ref, None)
                else:
                    self.resent.append(ref)
                    await ws.send(json.dumps({"type": "say", "text": text, "ref": ref}, ensure_ascii=False))
            self._live.set()
            return True
        elif kind == "presence":
            self.presence.append((time.monotonic(), obj))
            self.online = (self.online | set(obj["joined"])) - set(obj["left"])
        elif kind == "error":
            self.errors.append(obj)
            refused = obj.get("ref")
            if isinstance(refused, str) and refused in self.unacked:
                if obj["code"] == "rate_limited":
                    asyncio.get_running_loop().call_later(
                        obj["retry_after_ms"] / 1000, lambda: asyncio.ensure_future(self._resend(refused))
                    )
                elif obj["code"] == "unavailable" and self.retry_unavailable:
                    # The page's backoff: 0.5 s, doubling, at most 5 s.
                    tries = self.unavailable[refused] = self.unavailable.get(refused, 0) + 1
                    asyncio.get_running_loop().call_later(
                        min(5.0, 0.5 * 2 ** (tries - 1)), lambda: asyncio.ensure_future(self._resend(refused))
                    )
                else:
                    self.refused[refused] = obj
                    self.unacked.pop(refused, None)
        return False

    async def _resend(self, ref: str) -> None:
        if ref in self.unacked:
            await self.say(self.unacked[ref], ref)

    def _take(self, message: Obj) -> None:
        message_id = message["id"]
        self.delivered.append(message_id)
        if message_id in self.ids:
            return
        self.ids.add(message_id)
        self.messages.append(message)
        self.arrived[message_id] = time.monotonic()
        if message.get("name") == self.name:
            self.unacked.pop(message.get("ref") or "", None)


async def start_all(clients: list[ResilientClient], *, concurrency: int = 20, timeout: float = 60) -> None:
    """Starts clients with at most `concurrency` handshakes in flight (a 2-core machine)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(client: ResilientClient) -> None:
        async with gate:
            await client.start(timeout)

    await asyncio.gather(*(one(client) for client in clients))


def read_log(base_url: str, room: str) -> list[Obj]:
    """The room's whole log through the HTTP API (pages of 100, oldest first): the accepted messages."""
    pages: list[list[Obj]] = []
    before: str | None = None
    with httpx.Client(base_url=base_url, timeout=30, headers=forwarded()) as http:
        while True:
            params = {"limit": "100"} | ({"before": before} if before else {})
            response = http.get(f"/api/rooms/{room}/messages", params=params)
            response.raise_for_status()
            body = response.json()
            pages.append(body["messages"])
            if not body["more"] or not body["messages"]:
                break
            before = body["messages"][0]["id"]
    return [message for page in reversed(pages) for message in page]


async def keep_saying(client: ResilientClient, stop: asyncio.Event, every: float, text: str = "") -> None:
    """One sender: a message every `every` seconds (under the rate limit) until `stop`."""
    n = 0
    while not stop.is_set():
        await client.say(text or f"{client.name} says {n}", ref=f"{client.name}-{n}")
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def settle(stack: Stack, room: str, clients: list[ResilientClient], timeout: float = 90) -> list[str]:
    """Waits until every sender's messages are acknowledged and every client has the whole log; returns its ids."""
    try:
        await eventually(
            lambda: all(not client.unacked for client in clients), timeout=timeout, what="every message acknowledged"
        )
    except AssertionError as error:
        waiting = {c.name: (sorted(c.unacked)[:5], c.closes, c.live, c.errors[-3:]) for c in clients if c.unacked}
        raise AssertionError(f"{error}; unacked (refs, closes, live, errors): {waiting}") from None
    log = await asyncio.to_thread(read_log, stack.base_url, room)
    ids = [message["id"] for message in log]
    try:
        await eventually(
            lambda: all(len(client.delivered) >= len(ids) for client in clients),
            timeout=timeout,
            what=f"every client holding all {len(ids)} messages",
        )
    except AssertionError as error:
        behind = {c.name: (len(c.delivered), c.closes, c.live) for c in clients if len(c.delivered) < len(ids)}
        raise AssertionError(f"{error}; behind (held, closes, live): {behind}") from None
    return ids
