"""The in-memory twin of the Redis broker (MemoryBroker): the log, resuming, presence and the fan-out behave as the
Redis one does, so that a replica without REDIS_URL is the same chat, only alone."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from infinite_chat import broker as broker_module
from infinite_chat.broker import (
    Delivery,
    LogRead,
    MemoryBroker,
    QuotaRefusal,
    message_frame,
    open_broker,
    presence_entry,
)
from infinite_chat.config import Settings
from infinite_chat.protocol import message_body, parse_message_id


def broker(**settings: Any) -> MemoryBroker:
    return MemoryBroker(Settings(replica_name="unit", **settings))


async def say(chat: MemoryBroker, room: str, text: str) -> str:
    return await chat.append(room, message_body(room, "alice", text, None))


def texts(deliveries: list[Delivery] | None) -> list[str]:
    assert deliveries is not None
    return [json.loads(delivery.frame)["text"] for delivery in deliveries]


def test_without_a_redis_url_the_replica_gets_the_memory_broker() -> None:
    assert isinstance(open_broker(Settings(replica_name="unit")), MemoryBroker)


async def test_ids_grow_strictly_even_within_one_millisecond() -> None:
    chat = broker()
    ids = [await say(chat, "lobby", f"m{n}") for n in range(50)]
    parsed = [parse_message_id(message_id) for message_id in ids]
    assert None not in parsed
    assert parsed == sorted(set(parsed))  # type: ignore[type-var]


async def test_a_stored_message_reads_back_as_the_object_clients_get() -> None:
    chat = broker()
    message_id = await chat.append("lobby", message_body("lobby", "alice", "hi", "c-1"))
    [delivery] = await chat.recent("lobby", 25)
    assert delivery.frame == message_frame(message_id, message_body("lobby", "alice", "hi", "c-1"))
    assert delivery.id == parse_message_id(message_id)
    assert delivery.room == "lobby"


async def test_recent_is_the_newest_oldest_first_and_pages_back_with_before() -> None:
    chat = broker()
    ids = [await say(chat, "lobby", f"m{n}") for n in range(10)]
    assert texts(await chat.recent("lobby", 3)) == ["m7", "m8", "m9"]
    assert texts(await chat.recent("lobby", 3, before=ids[7])) == ["m4", "m5", "m6"]
    assert texts(await chat.recent("lobby", 3, before=ids[1])) == ["m0"]
    assert await chat.recent("lobby", 3, before=ids[0]) == []
    assert await chat.recent("lobby", 3, before="0-0") == []
    assert await chat.recent("elsewhere", 3) == []


async def read(chat: MemoryBroker, room: str, position: str | None, **bounds: int) -> LogRead:
    limits = {"max_messages": 1000, "max_bytes": 1 << 20} | bounds
    return await chat.read_after(room, None if position is None else parse_message_id(position), **limits)


async def test_read_after_gives_everything_after_a_retained_id_and_nothing_for_an_unknown_one() -> None:
    chat = broker()
    ids = [await say(chat, "lobby", f"m{n}") for n in range(5)]
    after = await read(chat, "lobby", ids[1])
    assert (texts(after.deliveries), after.found, after.complete) == (["m2", "m3", "m4"], True, True)
    assert await read(chat, "lobby", ids[4]) == LogRead([], found=True, complete=True)
    assert await read(chat, "lobby", "1-0") == LogRead([], found=False, complete=False)
    # An id of another room's log is unknown here.
    assert await read(chat, "other", ids[1]) == LogRead([], found=False, complete=False)
    start = await read(chat, "lobby", None)
    assert (texts(start.deliveries), start.found, start.complete) == (["m0", "m1", "m2", "m3", "m4"], True, True)


async def test_read_after_stops_at_its_bound_in_messages_and_in_bytes() -> None:
    chat = broker()
    ids = [await say(chat, "lobby", f"m{n}") for n in range(10)]
    by_count = await read(chat, "lobby", ids[0], max_messages=3)
    assert (texts(by_count.deliveries), by_count.found, by_count.complete) == (["m1", "m2", "m3"], True, False)
    exactly = await read(chat, "lobby", ids[6], max_messages=3)
    assert (texts(exactly.deliveries), exactly.complete) == (["m7", "m8", "m9"], True)
    size = len(exactly.deliveries[0].frame)
    by_bytes = await read(chat, "lobby", ids[0], max_bytes=size * 2 + 1)
    assert (texts(by_bytes.deliveries), by_bytes.complete) == (["m1", "m2"], False)


async def test_the_log_keeps_retain_messages_and_older_ids_become_unknown() -> None:
    chat = broker(retain=3)
    ids = [await say(chat, "lobby", f"m{n}") for n in range(5)]
    assert texts(await chat.recent("lobby", 25)) == ["m2", "m3", "m4"]
    assert not (await read(chat, "lobby", ids[0])).found
    assert texts((await read(chat, "lobby", ids[2])).deliveries) == ["m3", "m4"]


class Listener:
    """Runs `listen` and keeps what it yields, as the replica's fan-out does."""

    def __init__(self, chat: MemoryBroker) -> None:
        self.got: list[Delivery] = []
        self.subscribed = asyncio.Event()
        self._stream: AsyncIterator[Delivery] = chat.listen(self._on_subscribed)
        self._task = asyncio.create_task(self._run())

    async def _on_subscribed(self) -> None:
        self.subscribed.set()

    async def _run(self) -> None:
        async for delivery in self._stream:
            self.got.append(delivery)

    async def ready(self) -> Listener:
        await asyncio.wait_for(self.subscribed.wait(), 2)
        return self

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    def objects(self) -> list[dict[str, Any]]:
        return [json.loads(delivery.frame) for delivery in self.got]

    async def stop(self) -> None:
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


async def test_listeners_hear_every_append_in_log_order() -> None:
    chat = broker()
    listener = await Listener(chat).ready()
    ids = [await chat.append(room, message_body(room, "a", f"m{n}", None)) for n, room in enumerate("abab")]
    await listener.settle()
    expected = [(room, parse_message_id(message_id)) for room, message_id in zip("abab", ids, strict=True)]
    assert [(delivery.room, delivery.id) for delivery in listener.got] == expected
    await listener.stop()


async def test_presence_names_are_sorted_unique_and_capped_with_the_full_count() -> None:
    chat = broker(presence_list_max=2)
    await chat.join("lobby", presence_entry("c1", "carol"))
    await chat.join("lobby", presence_entry("c2", "alice"))
    await chat.join("lobby", presence_entry("c3", "alice"))
    online = await chat.join("lobby", presence_entry("c4", "bob"))
    assert online.names == ["alice", "bob"]
    assert online.count == 3


async def test_join_and_leave_are_announced_only_when_a_name_comes_or_goes() -> None:
    chat = broker(presence_interval_ms=0)
    listener = await Listener(chat).ready()
    await chat.join("lobby", presence_entry("c1", "alice"))
    await chat.join("lobby", presence_entry("c2", "alice"))  # a second tab: alice is already online
    await chat.join("lobby", presence_entry("c3", "bob"))
    await chat.leave("lobby", presence_entry("c1", "alice"))  # one tab left: still online
    await chat.leave("lobby", presence_entry("c2", "alice"))
    await chat.leave("lobby", presence_entry("c2", "alice"))  # twice: nothing more
    await listener.settle()
    assert listener.objects() == [
        {"type": "presence", "event": "join", "name": "alice", "online": ["alice"], "online_count": 1},
        {"type": "presence", "event": "join", "name": "bob", "online": ["alice", "bob"], "online_count": 2},
        {"type": "presence", "event": "leave", "name": "alice", "online": ["bob"], "online_count": 1},
    ]
    assert all(delivery.id is None and delivery.room == "lobby" for delivery in listener.got)
    await listener.stop()


class Clock:
    """The broker's monotonic clock, moved by the test: expiry without waiting for it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(broker_module, "time", fake)
    return fake


async def test_entries_not_refreshed_within_the_ttl_leave_and_refreshed_ones_stay(clock: Clock) -> None:
    chat = broker(presence_ttl=20.0, presence_interval_ms=0)
    listener = await Listener(chat).ready()
    await chat.join("lobby", presence_entry("c1", "alice"))
    await chat.join("lobby", presence_entry("c2", "bob"))
    for _ in range(6):  # 30 s, bob renewed every 5 s
        clock.now += 5
        await chat.refresh("lobby", [presence_entry("c2", "bob")])
    await listener.settle()
    events = [(obj["event"], obj["name"], obj["online"]) for obj in listener.objects()]
    assert events == [("join", "alice", ["alice"]), ("join", "bob", ["alice", "bob"]), ("leave", "alice", ["bob"])]
    online = await chat.join("lobby", presence_entry("c3", "carol"))
    assert online.names == ["bob", "carol"]
    await listener.stop()


async def test_an_entry_is_online_until_its_ttl_has_passed(clock: Clock) -> None:
    chat = broker(presence_ttl=20.0)
    await chat.join("lobby", presence_entry("c1", "alice"))
    clock.now += 19.9
    assert (await chat.join("lobby", presence_entry("c2", "bob"))).names == ["alice", "bob"]
    clock.now += 0.1
    assert (await chat.join("lobby", presence_entry("c3", "carol"))).names == ["bob", "carol"]


async def test_a_refresh_brings_back_an_entry_that_expired(clock: Clock) -> None:
    chat = broker(presence_ttl=20.0, presence_interval_ms=0)
    listener = await Listener(chat).ready()
    await chat.join("lobby", presence_entry("c1", "alice"))
    clock.now += 25
    await chat.refresh("lobby", [presence_entry("c1", "alice")])
    await listener.settle()
    # The sweep and the renewal are one call, so one event: the state after both (alice online again).
    assert [(obj["event"], obj["name"], obj["online"]) for obj in listener.objects()] == [
        ("join", "alice", ["alice"]),
        ("join", "alice", ["alice"]),
    ]
    await listener.stop()


async def test_rooms_have_their_own_logs_and_presence() -> None:
    chat = broker()
    await say(chat, "a", "in a")
    await chat.join("a", presence_entry("c1", "alice"))
    assert await chat.recent("b", 25) == []
    online = await chat.join("b", presence_entry("c2", "bob"))
    assert online.names == ["bob"]


async def test_a_burst_of_joins_and_leaves_becomes_one_event_per_interval(clock: Clock) -> None:
    chat = broker(presence_interval_ms=1000)
    listener = await Listener(chat).ready()
    await chat.join("lobby", presence_entry("c1", "alice"))  # the first change goes out at once
    for n in range(20):  # then churn, all within the interval
        await chat.join("lobby", presence_entry(f"x{n}", f"churn{n}"))
        await chat.leave("lobby", presence_entry(f"x{n}", f"churn{n}"))
    await chat.join("lobby", presence_entry("c2", "bob"))
    await listener.settle()
    assert [(o["event"], o["name"]) for o in listener.objects()] == [("join", "alice")]
    clock.now += 1.0
    await chat._flush_presence("lobby")  # what the timer set by the first waiting change runs
    await listener.settle()
    last = listener.objects()[-1]
    assert len(listener.got) == 2
    assert (last["event"], last["name"], last["online"], last["online_count"]) == ("join", "bob", ["alice", "bob"], 2)
    await chat.close()
    await listener.stop()


async def test_a_waiting_change_is_published_by_the_next_call_once_due(clock: Clock) -> None:
    """If the replica that was to flush dies, any later presence call in the room (a renewal) publishes it."""
    chat = broker(presence_interval_ms=1000)
    listener = await Listener(chat).ready()
    await chat.join("lobby", presence_entry("c1", "alice"))
    await chat.join("lobby", presence_entry("c2", "bob"))
    chat._stop_presence_flushes()  # as if this replica were gone
    clock.now += 1.5
    await chat.refresh("lobby", [presence_entry("c1", "alice")])
    await listener.settle()
    assert [(o["event"], o["name"], o["online"]) for o in listener.objects()] == [
        ("join", "alice", ["alice"]),
        ("join", "bob", ["alice", "bob"]),
    ]
    await listener.stop()


async def test_an_address_allowance_refuses_past_its_bytes_and_refills(clock: Clock) -> None:
    chat = broker(address_bytes_per_hour=100_000, address_rooms_per_hour=20)
    assert await chat.charge("10.0.0.1", 60_000, new_room=False) is None
    refusal = await chat.charge("10.0.0.1", 60_000, new_room=False)
    assert refusal is not None
    assert refusal.code == "quota_exceeded"
    # 20,000 bytes more are needed, at 100,000 an hour: 720 s.
    assert refusal.retry_after_ms == pytest.approx(720_000, rel=0.01)
    assert await chat.charge("10.0.0.2", 60_000, new_room=False) is None  # another address has its own
    clock.now += 720
    assert await chat.charge("10.0.0.1", 60_000, new_room=False) is None


async def test_an_address_may_create_only_so_many_rooms_an_hour(clock: Clock) -> None:
    chat = broker(address_rooms_per_hour=3)
    for _ in range(3):
        assert await chat.charge("10.0.0.1", 100, new_room=True) is None
    refusal = await chat.charge("10.0.0.1", 100, new_room=True)
    assert refusal == QuotaRefusal("too_many_rooms", 1_200_000)
    assert await chat.charge("10.0.0.1", 100, new_room=False) is None  # existing rooms are fine
    clock.now += 1200
    assert await chat.charge("10.0.0.1", 100, new_room=True) is None
