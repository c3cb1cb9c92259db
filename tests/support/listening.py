"""A broker's fan-out as a replica runs it, for the broker tests: runs `listen`, keeps what it yields, counts the
(re)subscriptions, and hears the rooms it is asked to."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Collection
from typing import Any

from infinite_chat.broker import Broker, Delivery

from .chat import eventually


class Listener:
    def __init__(self, chat: Broker) -> None:
        self.chat = chat
        self.got: list[Delivery] = []
        self.subscriptions = 0
        self._task = asyncio.create_task(self._run())

    async def _on_subscribed(self, rooms: Collection[str]) -> None:
        self.subscriptions += 1

    async def _run(self) -> None:
        async for delivery in self.chat.listen(self._on_subscribed):
            self.got.append(delivery)

    async def ready(self, *rooms: str) -> Listener:
        """Once listening, hears these rooms (each subscription confirmed)."""
        await eventually(lambda: self.subscriptions > 0, timeout=10, what="the subscription")
        for room in rooms:
            await self.chat.subscribe(room)
        return self

    def objects(self, room: str) -> list[dict[str, Any]]:
        return [json.loads(d.frame) for d in self.got if d.room == room]

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        assert self._task.cancelled(), "the fan-out ended by itself"
