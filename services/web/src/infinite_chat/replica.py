"""What one replica runs beside its HTTP routes: the broker, its rooms, its open connections, and the drain on
shutdown that hands every client to another replica without losing a message."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from . import metrics
from .addresses import Sockets
from .allowances import Allowances
from .broker import Broker, BrokerUnavailable, open_broker
from .config import Settings
from .connection import Connection, Flusher
from .moderation import is_moderator_token
from .protocol import CloseCode, ErrorCode
from .rooms import Rooms
from .signin import SignIn, SignInRefused

log = logging.getLogger(__name__)


class Replica:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connections: set[Connection] = set()
        self.sockets = Sockets(settings.sockets_per_address)
        self.draining = False
        self._broker: Broker | None = None
        self._rooms: Rooms | None = None
        self._allowances: Allowances | None = None
        self._signin: SignIn | None = None
        self.flusher = Flusher(settings.coalesce_ms / 1000)
        self._tasks: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            raise RuntimeError("the replica has not started")
        return self._broker

    @property
    def rooms(self) -> Rooms:
        if self._rooms is None:
            raise RuntimeError("the replica has not started")
        return self._rooms

    @property
    def allowances(self) -> Allowances:
        if self._allowances is None:
            raise RuntimeError("the replica has not started")
        return self._allowances

    async def moderator_of(self, token: str | None, alb_data: str | None) -> bool | None:
        """Whether the bearer of these credentials is a moderator; None when they prove nobody (none, or invalid)."""
        if self.settings.auth_mode == "names":
            if not token:
                return None
            return True if is_moderator_token(self.settings, token) else None
        try:
            signed_in = await self.signin.identify(token=token, alb_data=alb_data)
        except SignInRefused as refused:
            if refused.code is ErrorCode.UNAVAILABLE:
                raise BrokerUnavailable(refused.detail) from None
            return None
        return None if signed_in is None else signed_in.moderator

    @property
    def signin(self) -> SignIn:
        if self._signin is None:
            raise RuntimeError("the replica has not started")
        return self._signin

    async def start(self) -> None:
        # Made here, on the serving loop, never at import: an asyncio Redis client belongs to the loop that made it.
        self._broker = open_broker(self.settings)
        self._rooms = Rooms(self._broker, self.settings)
        self._allowances = Allowances(self._broker, self.settings.address_bytes_per_hour)
        self._signin = SignIn(self.settings)
        await self._signin.start()
        self._tasks = [
            asyncio.create_task(_forever("fan_out", self._rooms.fan_out)),
            asyncio.create_task(_forever("keep_presence", self._rooms.keep_presence)),
            asyncio.create_task(_forever("watch_bans", self._rooms.watch_bans)),
        ]
        try:
            # Before the first client: a room's old history must be where its first join reads.
            await asyncio.wait_for(self._broker.migrate(), 30)
        except (BrokerUnavailable, TimeoutError):
            log.warning("key migration postponed: Redis unavailable", extra={"event": "migrate_postponed"})
            self._tasks.append(asyncio.create_task(_until_done(self._broker.migrate)))
        with contextlib.suppress(BrokerUnavailable, TimeoutError):
            await asyncio.wait_for(self._broker.check_policy(), 5)
        metrics.watch_outboxes(self.outbox_total, self.outbox_largest, self.outbox_bytes, self.outbox_largest_bytes)
        # Everything alive now (modules, the app) lives as long as the process: keep it out of every GC pass.
        gc.freeze()
        log.info(
            "replica started",
            extra={"event": "started", "broker": type(self._broker).__name__, "replica": self.settings.replica_name},
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._rooms is not None:
            self._rooms.typists.stop()
        if self._broker is not None:
            await self._broker.close()
        if self._signin is not None:
            await self._signin.close()

    def opened(self, connection: Connection) -> None:
        self.connections.add(connection)
        self._idle.clear()
        metrics.CONNECTIONS.set(len(self.connections))

    def closed(self, connection: Connection) -> None:
        self.connections.discard(connection)
        metrics.CONNECTIONS.set(len(self.connections))
        if not self.connections:
            self._idle.set()

    async def drain(self) -> None:
        """On SIGTERM: /health turns 503 and new sockets are refused (nginx sends them to another replica); after
        a short drain every socket is closed with 1012 once its outbox is written, so clients resume elsewhere."""
        self.draining = True
        log.info("draining", extra={"event": "draining", "connections": len(self.connections)})
        await asyncio.sleep(self.settings.drain_seconds)
        for connection in list(self.connections):
            connection.close(CloseCode.RESTARTING, "replica restarting")
        if self.connections:
            try:
                await asyncio.wait_for(self._idle.wait(), 5.0)
            except TimeoutError:
                log.warning("connections still open after drain", extra={"event": "drain_timeout"})
        log.info("drained", extra={"event": "drained"})

    # What waits for clients: their outboxes, and what their rooms hold for them while they join.
    def outbox_total(self) -> int:
        held = self._rooms.held()[0] if self._rooms else 0
        return sum(len(c.pending) for c in list(self.connections)) + held

    def outbox_largest(self) -> int:
        return max((len(c.pending) for c in list(self.connections)), default=0)

    def outbox_bytes(self) -> int:
        held = self._rooms.held()[1] if self._rooms else 0
        return sum(c.pending_bytes for c in list(self.connections)) + held

    def outbox_largest_bytes(self) -> int:
        return max((c.pending_bytes for c in list(self.connections)), default=0)


async def _forever(name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Background loops must outlive a bug in one pass: log it and start again."""
    while True:
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task failed; restarting", extra={"event": "task_failed", "task": name})
            await asyncio.sleep(1.0)


async def _until_done(run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """A one-time task that needs Redis: retried every few seconds until it has run once."""
    while True:
        try:
            await run()
            return
        except BrokerUnavailable:
            await asyncio.sleep(5.0)
