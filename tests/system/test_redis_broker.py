"""What only the Redis broker has, against a real Redis (the project's own image, started with testcontainers):
trimming by stream node, the idle expiry, losing and finding the subscription, a Redis restart, an unreachable
Redis, and the memory limit. What both brokers do is held to one contract in test_broker_contract.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Collection
from typing import Any

import pytest
import redis

from infinite_chat.broker import BrokerUnavailable, Delivery, LogRead, RedisBroker, presence_entry
from infinite_chat.broker.keys import log_key, old_log_key
from infinite_chat.broker.subscriptions import Backoff
from infinite_chat.config import Settings
from infinite_chat.protocol import message_body, parse_message_id
from infinite_chat.rooms import Rooms
from support.chat import eventually
from support.listening import Listener
from support.peer import Peer, outbox
from support.redis_server import RedisServer, started_redis
from support.stack import free_port


@pytest.fixture
async def brokers(redis_server: RedisServer) -> AsyncIterator[BrokerFactory]:
    factory = BrokerFactory(redis_server)
    yield factory
    for made in factory.made:
        await made.close()


class BrokerFactory:
    """A RedisBroker per call, as each replica has its own."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.made: list[RedisBroker] = []

    def __call__(self, **settings: Any) -> RedisBroker:
        made = self.server.broker(**settings)
        self.made.append(made)
        return made


async def say(chat: RedisBroker, room: str, text: str) -> str:
    return (await chat.append(room, message_body(room, "alice", text, None), name="alice", ref=None)).id


async def read(chat: RedisBroker, room: str, position: str | None, **bounds: int) -> LogRead:
    limits = {"max_messages": 1000, "max_bytes": 1 << 20} | bounds
    return await chat.read_after(room, None if position is None else parse_message_id(position), **limits)


def texts(deliveries: list[Delivery] | None) -> list[str]:
    assert deliveries is not None
    return [json.loads(delivery.frame)["text"] for delivery in deliveries]


async def test_the_log_keeps_about_retain_and_a_trimmed_since_is_unknown(brokers: BrokerFactory, room: str) -> None:
    chat = brokers(retain=100)
    ids = [await say(chat, room, f"m{n}") for n in range(400)]
    length = await chat.redis.xlen(log_key(room))
    assert 100 <= length < 400  # MAXLEN ~ trims whole stream nodes: at least RETAIN stay
    assert not (await read(chat, room, ids[0])).found
    assert texts((await read(chat, room, ids[-3])).deliveries) == ["m398", "m399"]
    assert texts(await chat.recent(room, 2)) == ["m398", "m399"]


async def test_a_room_log_expires_after_its_idle_days(brokers: BrokerFactory, room: str) -> None:
    chat = brokers(room_idle_days=2)
    await say(chat, room, "hello")
    assert 2 * 86_400 - 60 < await chat.redis.ttl(log_key(room)) <= 2 * 86_400


async def test_what_is_published_while_the_subscription_is_lost_is_caught_up_from_the_log(
    brokers: BrokerFactory, room: str, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Half a second before each new subscription: what is said in between cannot come by pub/sub.
    monkeypatch.setattr(Backoff, "next_delay", lambda self: 0.5)
    replica, other = brokers(), brokers()
    rooms = Rooms(replica, replica.settings)
    peer = Peer()
    subscriptions = 0
    fill_gaps = rooms.fill_gaps

    async def counting_fill_gaps(names: Collection[str] | None = None) -> None:
        nonlocal subscriptions
        await fill_gaps(names)
        subscriptions += 1

    rooms.fill_gaps = counting_fill_gaps  # type: ignore[method-assign]
    fan_out = asyncio.create_task(rooms.fan_out())
    await eventually(lambda: subscriptions == 1, timeout=10, what="the first subscription")
    member = rooms.enter(room, outbox(peer), "bob")
    await rooms.hear(member)
    rooms.welcome(member, b"welcome", None)
    await say(other, room, "m1")
    await eventually(lambda: len(peer.objects) == 2, timeout=10, what="m1 by pub/sub")

    admin = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port, password=redis_server.password)
    assert await admin.client_kill_filter(_type="pubsub") >= 1
    await admin.aclose()
    await say(other, room, "m2")
    await say(other, room, "m3")
    await eventually(lambda: subscriptions == 2, timeout=10, what="the subscription back")
    await say(other, room, "m4")
    await eventually(lambda: len(peer.objects) >= 5, timeout=10, what="all four messages")
    assert [json.loads(o)["text"] for o in peer.objects[1:]] == ["m1", "m2", "m3", "m4"]  # each once, in order
    fan_out.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fan_out


async def test_a_room_asked_for_while_the_subscription_is_down_is_heard_once_it_is_back(
    brokers: BrokerFactory, room: str, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Backoff, "next_delay", lambda self: 1.0)
    chat, other = brokers(), brokers()
    listener = await Listener(chat).ready(room)
    admin = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port, password=redis_server.password)
    assert await admin.client_kill_filter(_type="pubsub") >= 1
    await eventually(lambda: not chat.subscriptions.connected(), timeout=10, what="the loss noticed")
    # While the subscription is down: a join's subscribe waits for it, and returns once it is back.
    later = f"{room}-later"
    await chat.subscribe(later)
    await eventually(lambda: listener.subscriptions == 2, timeout=10, what="the catch-up after the subscription")
    await say(other, room, "in the first room")
    await say(other, later, "in the later room")
    await eventually(
        lambda: listener.objects(room) and listener.objects(later), timeout=10, what="both rooms heard again"
    )
    # One connection for every room of the replica.
    channels = await admin.pubsub_shardchannels(f"chat:{{{room}*")
    assert sorted(channels) == sorted([f"chat:{{{room}}}:channel".encode(), f"chat:{{{later}}}:channel".encode()])
    assert len(await admin.client_list(_type="pubsub")) == 1
    await admin.aclose()
    await listener.stop()


async def test_logs_under_the_old_key_layout_are_moved_once_and_kept_where_both_exist(
    brokers: BrokerFactory, room: str
) -> None:
    chat = brokers()
    old, both = f"{room}-old", f"{room}-both"
    for name in (old, both):
        await chat.redis.xadd(old_log_key(name), {"b": message_body(name, "alice", "from before", None)})
        await chat.redis.expire(old_log_key(name), 86_400)
    await say(chat, both, "written anew")  # a new replica wrote the room before the old log was moved
    await chat.migrate()
    assert texts(await chat.recent(old, 5)) == ["from before"]
    assert 86_000 < await chat.redis.ttl(log_key(old)) <= 86_400  # the time to live moves with it
    assert not await chat.redis.exists(old_log_key(old))
    assert texts(await chat.recent(both, 5)) == ["written anew"]
    assert await chat.redis.exists(old_log_key(both))  # nothing deleted
    await chat.migrate()  # again: nothing more to do
    assert texts(await chat.recent(old, 5)) == ["from before"]


async def test_after_a_redis_restart_no_command_fails_on_an_old_connection(
    brokers: BrokerFactory, room: str, redis_server: RedisServer
) -> None:
    chat = brokers()
    listener = await Listener(chat).ready(room)
    await say(chat, room, "before")
    # Several idle connections in the pool, all to the Redis about to go away.
    await asyncio.gather(*(chat.recent(room, 5) for _ in range(8)))
    await asyncio.to_thread(redis_server.restart)
    await eventually(lambda: listener.subscriptions == 2, timeout=30, what="the subscription back")
    for _ in range(3):
        results = await asyncio.gather(*(chat.recent(room, 5) for _ in range(8)), return_exceptions=True)
        assert [texts(r) if isinstance(r, list) else repr(r) for r in results] == [["before"]] * 8
    await listener.stop()


async def test_an_unreachable_redis_is_unavailable_not_a_crash() -> None:
    nowhere = RedisBroker(Settings(replica_name="t", redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    with pytest.raises(BrokerUnavailable):
        await nowhere.append("lobby", message_body("lobby", "a", "hi", None), name="a", ref=None)
    with pytest.raises(BrokerUnavailable):
        await nowhere.ping()
    with pytest.raises(BrokerUnavailable):
        await nowhere.join("lobby", presence_entry("c1", "a"))
    with pytest.raises(BrokerUnavailable):
        await nowhere.recent("lobby", 5)
    await nowhere.close()


async def test_at_its_memory_limit_redis_drops_the_longest_idle_rooms_and_chat_goes_on(redis_image: str) -> None:
    """A Redis of 16 MB: 12 rooms of 1 MB go idle, then a room in use and 8 new rooms add 8 MB more. No message is
    refused; the idle rooms lose their logs (whole rooms, least recently used first), and the rooms in use keep
    every message. (Redis tells idle times apart by the second, hence the pause.)"""
    big = "\U0001f600" * 2000  # the largest message, about 8 KB
    with started_redis(redis_image, REDIS_MAXMEMORY="16mb") as server:
        chat = server.broker()
        try:
            for n in range(12):
                await asyncio.gather(*(say(chat, f"idle-{n:02d}", big) for _ in range(120)))
            await asyncio.sleep(2.5)
            active: list[str] = []
            for n in range(8):
                for _ in range(6):
                    await asyncio.gather(*(say(chat, f"new-{n}", big) for _ in range(20)))
                    active.append(await say(chat, "active", f"still here {len(active)}"))
            idle = [await chat.redis.xlen(log_key(f"idle-{n:02d}")) for n in range(12)]
            new = [await chat.redis.xlen(log_key(f"new-{n}")) for n in range(8)]
            evicted = (await chat.redis.info("stats"))["evicted_keys"]
            log = (await read(chat, "active", None)).deliveries
        finally:
            await chat.close()
    assert evicted > 0
    assert [d.id for d in log] == [parse_message_id(i) for i in active], "the room in use lost messages"
    assert new == [120] * 8, "a room in use lost messages"
    assert set(idle) <= {0, 120}, "a log was cut, not dropped whole"
    assert idle.count(0) >= 3, idle
