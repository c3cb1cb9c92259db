"""Slices of an address's allowance (allowances.py): most messages cost Redis nothing, and the hour's total holds."""

from __future__ import annotations

import asyncio
from typing import Any

from infinite_chat.allowances import Allowances
from infinite_chat.broker import MemoryBroker, QuotaRefusal
from infinite_chat.config import Settings


class Counting(MemoryBroker):
    def __init__(self, **settings: Any) -> None:
        super().__init__(Settings(replica_name="unit", **settings))
        self.calls = 0

    async def charge(self, address: str, size: int, *, new_room: bool) -> QuotaRefusal | None:
        self.calls += 1
        await asyncio.sleep(0)  # a round trip: other messages go on meanwhile, as with Redis
        return await super().charge(address, size, new_room=new_room)


async def test_a_slice_covers_many_messages_with_one_call() -> None:
    broker = Counting(address_bytes_per_hour=16 * 1024 * 1024)
    allowances = Allowances(broker, 16 * 1024 * 1024)
    for _ in range(300):
        assert await allowances.take("198.18.0.1", 200, new_room=False) is None
    assert broker.calls == 1  # 300 × 200 bytes fit in one slice of 64 KiB


async def test_the_hour_total_still_holds_and_a_last_message_may_fit() -> None:
    broker = Counting(address_bytes_per_hour=64 * 1024)
    allowances = Allowances(broker, 64 * 1024)  # slices of 1 KiB
    accepted = 0
    while await allowances.take("198.18.0.1", 1000, new_room=False) is None:
        accepted += 1
        assert accepted < 1000
    assert accepted * 1000 <= 64 * 1024
    assert accepted >= 60  # little is lost to slices


async def test_creating_a_room_is_charged_to_redis_each_time() -> None:
    broker = Counting(address_rooms_per_hour=2)
    allowances = Allowances(broker, 16 * 1024 * 1024)
    assert await allowances.take("198.18.0.1", 100, new_room=True) is None
    assert await allowances.take("198.18.0.1", 100, new_room=True) is None
    refusal = await allowances.take("198.18.0.1", 100, new_room=True)
    assert refusal is not None
    assert refusal.code == "too_many_rooms"
    assert broker.calls == 3


async def test_slices_asked_for_at_once_are_all_kept() -> None:
    """Ten messages of one address arriving together each ask Redis for a slice: what they got adds up."""
    broker = Counting(address_bytes_per_hour=640 * 1024)
    allowances = Allowances(broker, 640 * 1024)  # slices of 10 KiB
    results = await asyncio.gather(*(allowances.take("198.18.0.1", 1000, new_room=False) for _ in range(10)))
    assert results == [None] * 10
    accepted = 10
    while await allowances.take("198.18.0.1", 1000, new_room=False) is None:
        accepted += 1
    assert accepted * 1000 >= 640 * 1024 * 0.95, accepted  # nothing given was thrown away
