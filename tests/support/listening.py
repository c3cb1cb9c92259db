"""A broker's fan-out as a replica runs it, for the broker tests: runs `listen`, keeps what it yields, counts the
(re)subscriptions, and hears the rooms it is asked to."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Collection
from typing import Any

from infinite_chat.broker import Broker, Delivery, ModerationNotice, TypingNotice
from infinite_chat.protocol import MessageId

from .chat import eventually


class Listener:
    def __init__(self, chat: Broker) -> None:
        self.chat = chat
        self.got: list[Delivery] = []
        self.typing: list[TypingNotice] = []
        self.moderation: list[ModerationNotice] = []
        self.subscriptions = 0
        # Each room heard through `ready`: the newest message of its history then (None: it had none), where its
        # catch-ups start, as a member's welcome is where Rooms starts them.
        self._joined_at: dict[str, MessageId | None] = {}
        self._last: dict[str, MessageId] = {}
        self._task = asyncio.create_task(self._run())

    async def _on_subscribed(self, rooms: Collection[str]) -> None:
        """What Rooms.fill_gaps does: the rooms' messages after the last one kept, from the log. A broker that
        confirms messages (REDIS_CONFIRM_REPLICAS) also asks for this after a confirmation it cannot release from
        what it holds; that is a catch-up, not a subscription."""
        self.subscriptions += 1
        for room in rooms:
            if room not in self._joined_at:
                continue  # not heard through `ready` (a test's own subscription): nothing to catch up from
            last = self._last.get(room, self._joined_at[room])
            read = await self.chat.read_after(room, last, max_messages=10_000, max_bytes=1 << 30)
            for delivery in read.deliveries:
                self._keep(delivery)

    async def _run(self) -> None:
        async for item in self.chat.listen(self._on_subscribed):
            if isinstance(item, TypingNotice):
                self.typing.append(item)
            elif isinstance(item, ModerationNotice):
                self.moderation.append(item)
            else:
                self._keep(item)

    def _keep(self, delivery: Delivery) -> None:
        """As Rooms.deliver: a message not newer than the room's last is a repeat (a catch-up had it)."""
        if delivery.id is not None:
            last = self._last.get(delivery.room)
            if last is not None and delivery.id <= last:
                return
            self._last[delivery.room] = delivery.id
        self.got.append(delivery)

    async def ready(self, *rooms: str) -> Listener:
        """Once listening, hears these rooms (each subscription confirmed)."""
        await eventually(lambda: self.subscriptions > 0, timeout=10, what="the subscription")
        for room in rooms:
            await self.hear(room)
        return self

    async def hear(self, room: str) -> None:
        """Subscribes, and notes where the room's log stands, as a member's welcome does."""
        await self.chat.subscribe(room)
        history = await self.chat.recent(room, 1)
        self._joined_at[room] = history[-1].id if history else None

    def objects(self, room: str) -> list[dict[str, Any]]:
        return [json.loads(d.frame) for d in self.got if d.room == room]

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        assert self._task.cancelled(), "the fan-out ended by itself"
