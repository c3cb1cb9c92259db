"""The in-memory twin of the Redis broker: one replica and no Redis, for `python -m infinite_chat` and for fast
tests of logic. It does what the Lua scripts do, the same way (tests/system/test_broker_contract.py holds both to
one contract), and keeps nothing across a restart.
"""

from __future__ import annotations

import asyncio
import math
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from ..config import Settings
from ..protocol import ErrorCode, MessageId, parse_message_id, presence_frame
from .base import (
    QUOTA_WINDOW_MS,
    Broker,
    Delivery,
    LogRead,
    Online,
    OnSubscribed,
    QuotaRefusal,
    message_delivery,
)


@dataclass(slots=True)
class _PresenceEvents:
    """What presence.lua keeps in a room's presence hash: when its last event went out, and the change waiting."""

    at: float = float("-inf")
    due: bool = False
    event: str = ""
    name: str = ""


@dataclass(slots=True)
class _Allowance:
    """What quota.lua keeps per address: bytes and rooms left, as of `at` (seconds)."""

    size: float
    rooms: float
    at: float


class MemoryBroker(Broker):
    """The twin for one replica without Redis: the same behaviour, nothing shared, nothing kept on restart."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._logs: dict[str, list[tuple[MessageId, str, bytes]]] = {}
        self._online: dict[str, dict[str, float]] = {}
        self._events: dict[str, _PresenceEvents] = {}
        self._allowances: dict[str, _Allowance] = {}
        self._listeners: set[asyncio.Queue[Delivery]] = set()
        self._heard: set[str] = set()
        self._last: MessageId = (0, 0)

    async def close(self) -> None:
        self._stop_presence_flushes()

    async def ping(self) -> None:
        pass

    async def append(self, room: str, body: bytes) -> str:
        millis = max(int(time.time() * 1000), self._last[0])
        self._last = (millis, self._last[1] + 1 if millis == self._last[0] else 0)
        message_id = f"{self._last[0]}-{self._last[1]}"
        entries = self._logs.setdefault(room, [])
        entries.append((self._last, message_id, body))
        del entries[: -self.settings.retain]
        self._publish(message_delivery(room, message_id, body))
        return message_id

    async def recent(self, room: str, limit: int, before: str | None = None) -> list[Delivery]:
        entries = self._logs.get(room, [])
        if before is not None:
            bound = parse_message_id(before)
            entries = [entry for entry in entries if bound is not None and entry[0] < bound]
        return [message_delivery(room, message_id, body) for _, message_id, body in entries[-limit:]]

    async def read_after(self, room: str, position: MessageId | None, *, max_messages: int, max_bytes: int) -> LogRead:
        entries = self._logs.get(room, [])
        start = 0
        if position is not None:
            keys = [key for key, _, _ in entries]
            start = bisect_left(keys, position)
            if start == len(keys) or keys[start] != position:
                return LogRead([], found=False, complete=False)
            start += 1
        deliveries: list[Delivery] = []
        size = 0
        for _, message_id, body in entries[start:]:
            delivery = message_delivery(room, message_id, body)
            if len(deliveries) == max_messages or size + len(delivery.frame) > max_bytes:
                return LogRead(deliveries, found=True, complete=False)
            deliveries.append(delivery)
            size += len(delivery.frame)
        return LogRead(deliveries, found=True, complete=True)

    async def charge(self, address: str, size: int, *, new_room: bool) -> QuotaRefusal | None:
        # quota.lua, in Python: a bucket per address that refills over QUOTA_WINDOW_MS.
        settings = self.settings
        window = QUOTA_WINDOW_MS / 1000
        size_cap, rooms_cap = float(settings.address_bytes_per_hour), float(settings.address_rooms_per_hour)
        now = time.monotonic()
        left = self._allowances.get(address)
        if left is None or now - left.at >= window:
            left = _Allowance(size_cap, rooms_cap, now)
        else:
            elapsed = now - left.at
            left = _Allowance(
                min(size_cap, left.size + elapsed * size_cap / window),
                min(rooms_cap, left.rooms + elapsed * rooms_cap / window),
                now,
            )
        if new_room and left.rooms < 1:
            return QuotaRefusal(
                ErrorCode.TOO_MANY_ROOMS, max(1, math.ceil((1 - left.rooms) * window * 1000 / rooms_cap))
            )
        if left.size < size:
            return QuotaRefusal(
                ErrorCode.QUOTA_EXCEEDED, max(1, math.ceil((size - left.size) * window * 1000 / size_cap))
            )
        left.size -= size
        if new_room:
            left.rooms -= 1
        self._allowances[address] = left
        return None

    async def _presence_call(self, action: str, room: str, entries: Sequence[str]) -> tuple[Online, int]:
        # presence.lua, in Python: the same changes, the same events, the same coalescing.
        online = self._online.setdefault(room, {})
        now = time.monotonic()
        change: tuple[str, str] | None = None
        expired = [entry for entry, expiry in online.items() if expiry <= now]
        for entry in expired:
            del online[entry]
        for entry in expired:
            if self._count_name(room, entry) == 0:
                change = ("leave", _name_of(entry))
        for entry in entries:
            if action in ("join", "refresh"):
                was_new = entry not in online
                online[entry] = now + self.settings.presence_ttl
                if was_new and self._count_name(room, entry) == 1:
                    change = ("join", _name_of(entry))
            elif action == "leave" and online.pop(entry, None) is not None and self._count_name(room, entry) == 0:
                change = ("leave", _name_of(entry))
        events = self._events.setdefault(room, _PresenceEvents())
        if change is not None:
            events.due, (events.event, events.name) = True, change
        wait_ms = 0
        if events.due:
            interval = self.settings.presence_interval_ms / 1000
            if now - events.at >= interval:
                self._announce(room, events.event, events.name)
                events.at, events.due = now, False
            else:
                wait_ms = max(1, math.ceil((events.at + interval - now) * 1000))
        return self._names(room), wait_ms

    def _count_name(self, room: str, entry: str) -> int:
        name = _name_of(entry)
        return sum(1 for other in self._online.get(room, {}) if _name_of(other) == name)

    def _announce(self, room: str, event: str, name: str) -> None:
        online = self._names(room)
        self._publish(Delivery(room, None, presence_frame(event, name, online.names, online.count)))

    def _names(self, room: str) -> Online:
        names = sorted({_name_of(entry) for entry in self._online.get(room, {})})
        return Online(names[: self.settings.presence_list_max], len(names))

    def _publish(self, delivery: Delivery) -> None:
        if delivery.room not in self._heard:
            return
        for queue in self._listeners:
            queue.put_nowait(delivery)

    async def subscribe(self, room: str) -> None:
        self._heard.add(room)  # confirmed at once: publishing is a call in this process

    async def unsubscribe(self, room: str) -> None:
        self._heard.discard(room)

    def subscribed(self) -> set[str]:
        return set(self._heard)

    async def listen(self, on_subscribed: OnSubscribed) -> AsyncIterator[Delivery]:
        queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._listeners.add(queue)
        try:
            await on_subscribed(set(self._heard))
            while True:
                yield await queue.get()
        finally:
            self._listeners.discard(queue)


def _name_of(entry: str) -> str:
    return entry.partition("|")[2]
