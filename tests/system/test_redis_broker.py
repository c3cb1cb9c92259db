"""The Redis broker against a real Redis (the project's own image, started with testcontainers): the Lua scripts, the
log reads and the subscription's catching up, each checked on its own where the stack tests see only their sum.

(Named test_redis_broker.py: tests/unit/test_broker.py, of the in-memory twin, already has the shorter name, and
pytest cannot hold two test modules of one name.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer

from infinite_chat import broker as broker_module
from infinite_chat.broker import (
    BrokerUnavailable,
    Delivery,
    LogRead,
    RedisBroker,
    log_key,
    presence_entry,
    quota_key,
)
from infinite_chat.config import Secret, Settings
from infinite_chat.protocol import MessageId, message_body, parse_message_id
from infinite_chat.rooms import Rooms
from support.chat import eventually, eventually_async
from support.stack import ROOT, free_port, require_docker


@dataclass
class RedisServer:
    container: DockerContainer
    port: int
    password: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def restart(self) -> None:
        subprocess.run(["docker", "restart", self.container.get_wrapped_container().id], check=True, timeout=120)
        wait_until_answering(self)


def wait_until_answering(server: RedisServer, timeout: float = 60) -> None:
    client = redis.Redis(host="127.0.0.1", port=server.port, password=server.password, socket_timeout=2)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)
    finally:
        client.close()


@pytest.fixture(scope="module")
def redis_image() -> Iterator[str]:
    """The image of services/redis (password, AOF, renamed commands, the memory policy), built for this module."""
    require_docker()
    tag = f"infinite-chat-test/redis:broker-{secrets.token_hex(3)}"
    subprocess.run(["docker", "build", "-q", "-t", tag, str(ROOT / "services" / "redis")], check=True, timeout=600)
    try:
        yield tag
    finally:
        subprocess.run(["docker", "image", "rm", "--force", tag], check=False, capture_output=True, timeout=120)


@contextlib.contextmanager
def started_redis(image: str, **environment: str) -> Iterator[RedisServer]:
    """A Redis of that image, published on this machine's loopback only."""
    password = secrets.token_hex(16)
    port = free_port()
    container = DockerContainer(image).with_env("REDIS_PASSWORD", password)
    for name, value in environment.items():
        container = container.with_env(name, value)
    container.ports["6379/tcp"] = ("127.0.0.1", port)  # type: ignore[assignment]
    # The reaper container (Ryuk) is an image from a registry this machine may not reach; the finally below cleans up.
    saved = testcontainers_config.ryuk_disabled
    testcontainers_config.ryuk_disabled = True
    try:
        container.start()
        server = RedisServer(container, port, password)
        wait_until_answering(server)
        yield server
    finally:
        testcontainers_config.ryuk_disabled = saved
        container.stop()


@pytest.fixture(scope="module")
def redis_server(redis_image: str) -> Iterator[RedisServer]:
    with started_redis(redis_image) as server:
        yield server


@pytest.fixture
def room() -> str:
    return f"b-{secrets.token_hex(6)}"


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
        made = RedisBroker(
            Settings(
                replica_name="broker-test",
                redis_url=self.server.url,
                redis_password=Secret(self.server.password),
                **settings,
            )
        )
        self.made.append(made)
        return made


class Listener:
    """Runs a broker's `listen`, keeping what it yields and counting (re)subscriptions."""

    def __init__(self, chat: RedisBroker) -> None:
        self.got: list[Delivery] = []
        self.subscriptions = 0
        self._task = asyncio.create_task(self._run(chat))

    async def _on_subscribed(self) -> None:
        self.subscriptions += 1

    async def _run(self, chat: RedisBroker) -> None:
        async for delivery in chat.listen(self._on_subscribed):
            self.got.append(delivery)

    async def ready(self) -> Listener:
        await eventually(lambda: self.subscriptions > 0, timeout=10, what="the subscription")
        return self

    def objects(self, room: str) -> list[dict[str, Any]]:
        return [json.loads(d.frame) for d in self.got if d.room == room]

    async def stop(self) -> None:
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


async def say(chat: RedisBroker, room: str, text: str) -> str:
    return await chat.append(room, message_body(room, "alice", text, None))


async def read(chat: RedisBroker, room: str, position: str | None, **bounds: int) -> LogRead:
    limits = {"max_messages": 1000, "max_bytes": 1 << 20} | bounds
    return await chat.read_after(room, None if position is None else parse_message_id(position), **limits)


def texts(deliveries: list[Delivery] | None) -> list[str]:
    assert deliveries is not None
    return [json.loads(delivery.frame)["text"] for delivery in deliveries]


async def test_appends_from_two_replicas_are_published_in_log_order(brokers: BrokerFactory, room: str) -> None:
    first, second, hearing = brokers(), brokers(), brokers()
    listener = await Listener(hearing).ready()
    sent = await asyncio.gather(
        *(say(first, room, f"a{n}") for n in range(40)), *(say(second, room, f"b{n}") for n in range(40))
    )
    stored = (await read(first, room, None)).deliveries
    assert len(stored) == 80
    assert {d.id for d in stored} == {parse_message_id(message_id) for message_id in sent}
    await eventually(lambda: len(listener.objects(room)) == 80, timeout=10, what="all 80 published")
    heard = [d for d in listener.got if d.room == room]
    # Published in the order of the log, and the same objects the log gives back.
    assert [d.frame for d in heard] == [d.frame for d in stored]
    assert [d.id for d in heard] == sorted(d.id for d in heard)  # type: ignore[type-var]
    await listener.stop()


async def test_the_log_reads_back_newest_older_after_and_gaps(brokers: BrokerFactory, room: str) -> None:
    chat = brokers()
    ids = [await say(chat, room, f"m{n}") for n in range(10)]
    assert texts(await chat.recent(room, 3)) == ["m7", "m8", "m9"]
    assert texts(await chat.recent(room, 3, before=ids[7])) == ["m4", "m5", "m6"]
    assert await chat.recent(room, 3, before=ids[0]) == []
    assert await chat.recent(room, 3, before="0-0") == []
    after = await read(chat, room, ids[6])
    assert (texts(after.deliveries), after.found, after.complete) == (["m7", "m8", "m9"], True, True)
    assert await read(chat, room, ids[9]) == LogRead([], found=True, complete=True)
    assert await read(chat, room, "1-0") == LogRead([], found=False, complete=False)
    assert await read(chat, room, f"{ids[4].split('-')[0]}-999") == LogRead([], found=False, complete=False)
    assert await read(chat, f"{room}-other", ids[3]) == LogRead([], found=False, complete=False)
    assert texts((await read(chat, room, None)).deliveries) == [f"m{n}" for n in range(10)]
    [newest] = await chat.recent(room, 1)
    body = json.loads(newest.frame)
    assert body == {
        "type": "message",
        "id": ids[9],
        "ts": body["ts"],
        "room": room,
        "name": "alice",
        "text": "m9",
    }


async def test_the_log_keeps_about_retain_and_a_trimmed_since_is_unknown(brokers: BrokerFactory, room: str) -> None:
    chat = brokers(retain=100)
    ids = [await say(chat, room, f"m{n}") for n in range(400)]
    length = await chat.redis.xlen(log_key(room))
    assert 100 <= length < 400  # MAXLEN ~ trims whole stream nodes: at least RETAIN stay
    assert not (await read(chat, room, ids[0])).found
    assert texts((await read(chat, room, ids[-3])).deliveries) == ["m398", "m399"]
    assert texts(await chat.recent(room, 2)) == ["m398", "m399"]


async def test_a_read_goes_page_by_page_and_stops_at_its_bounds(brokers: BrokerFactory, room: str) -> None:
    """More than one page (LOG_PAGE entries per round trip), and bounds in messages and bytes anywhere in it."""
    chat = brokers()
    ids = await asyncio.gather(*(say(chat, room, f"{n:03d}") for n in range(250)))
    ids = sorted(ids, key=parse_message_id)  # type: ignore[arg-type]
    everything = await read(chat, room, ids[0])
    assert (len(everything.deliveries), everything.complete) == (249, True)
    assert [d.id for d in everything.deliveries] == [parse_message_id(i) for i in ids[1:]]
    by_count = await read(chat, room, ids[0], max_messages=150)
    assert (len(by_count.deliveries), by_count.complete) == (150, False)
    exactly = await read(chat, room, ids[99], max_messages=150)
    assert (len(exactly.deliveries), exactly.complete) == (150, True)
    # Frames differ by a few bytes (ids have more or fewer digits): the bound falls inside the 121st.
    first_120 = sum(len(d.frame) for d in everything.deliveries[:120])
    by_bytes = await read(chat, room, ids[0], max_bytes=first_120 + 10)
    assert (len(by_bytes.deliveries), by_bytes.complete) == (120, False)


async def test_an_address_allowance_is_shared_by_replicas_and_refuses_past_it(brokers: BrokerFactory) -> None:
    first, second = brokers(address_bytes_per_hour=100_000), brokers(address_bytes_per_hour=100_000)
    address = f"198.18.{secrets.randbelow(255)}.{secrets.randbelow(255)}"
    assert await first.charge(address, 60_000, new_room=False) is None
    refusal = await second.charge(address, 60_000, new_room=False)
    assert refusal is not None
    assert refusal.code == "quota_exceeded"
    assert refusal.retry_after_ms == pytest.approx(720_000, rel=0.02)  # 20,000 bytes at 100,000 an hour
    assert await second.charge(address, 30_000, new_room=False) is None  # what is left is still there
    rooms = brokers(address_rooms_per_hour=2)
    other = f"198.19.{secrets.randbelow(255)}.{secrets.randbelow(255)}"
    assert await rooms.charge(other, 10, new_room=True) is None
    assert await rooms.charge(other, 10, new_room=True) is None
    refused = await rooms.charge(other, 10, new_room=True)
    assert refused is not None
    assert (refused.code, refused.retry_after_ms) == ("too_many_rooms", pytest.approx(1_800_000, rel=0.02))
    assert 0 < await rooms.redis.pttl(quota_key(other)) <= 3_600_000


async def test_a_burst_of_presence_changes_is_one_event_per_interval(brokers: BrokerFactory, room: str) -> None:
    chat = brokers(presence_interval_ms=500)
    listener = await Listener(brokers()).ready()
    await chat.join(room, presence_entry("c1", "alice"))
    started = time.monotonic()
    for n in range(30):
        await chat.join(room, presence_entry(f"x{n}", f"churn-{n}"))
        await chat.leave(room, presence_entry(f"x{n}", f"churn-{n}"))
    await chat.join(room, presence_entry("c2", "bob"))
    # The first change at once, then one event carrying the state after the rest, when the interval is over.
    await eventually(lambda: len(listener.objects(room)) >= 2, timeout=10, what="the coalesced event")
    assert time.monotonic() - started >= 0.4
    events = listener.objects(room)
    assert len(events) == 2
    assert (events[0]["event"], events[0]["name"]) == ("join", "alice")
    assert events[1] == {
        "type": "presence",
        "event": "join",
        "name": "bob",
        "online": ["alice", "bob"],
        "online_count": 2,
    }
    await listener.stop()


async def test_a_room_log_expires_after_its_idle_days(brokers: BrokerFactory, room: str) -> None:
    chat = brokers(room_idle_days=2)
    await say(chat, room, "hello")
    assert 2 * 86_400 - 60 < await chat.redis.ttl(log_key(room)) <= 2 * 86_400


async def test_presence_is_by_name_sorted_capped_and_announced_when_it_changes(
    brokers: BrokerFactory, room: str
) -> None:
    chat = brokers(presence_list_max=2, presence_interval_ms=0)
    listener = await Listener(brokers()).ready()
    assert (await chat.join(room, presence_entry("c1", "carol"))).names == ["carol"]
    await chat.join(room, presence_entry("c2", "alice"))
    await chat.join(room, presence_entry("c3", "alice"))  # a second tab
    online = await chat.join(room, presence_entry("c4", "Zoë 🚀"))
    assert (online.names, online.count) == (["Zoë 🚀", "alice"], 3)  # by code point: "Z" before "a"
    await chat.leave(room, presence_entry("c2", "alice"))  # alice is still online in her other tab
    await chat.leave(room, presence_entry("c3", "alice"))
    await chat.leave(room, presence_entry("c3", "alice"))
    await eventually(lambda: len(listener.objects(room)) >= 4, timeout=10, what="presence events")
    assert listener.objects(room) == [
        {"type": "presence", "event": "join", "name": "carol", "online": ["carol"], "online_count": 1},
        {"type": "presence", "event": "join", "name": "alice", "online": ["alice", "carol"], "online_count": 2},
        {"type": "presence", "event": "join", "name": "Zoë 🚀", "online": ["Zoë 🚀", "alice"], "online_count": 3},
        {"type": "presence", "event": "leave", "name": "alice", "online": ["Zoë 🚀", "carol"], "online_count": 2},
    ]
    assert all(d.id is None for d in listener.got)
    await listener.stop()


async def test_an_empty_room_has_an_empty_list_not_an_object(brokers: BrokerFactory, room: str) -> None:
    chat = brokers(presence_interval_ms=0)
    listener = await Listener(brokers()).ready()
    await chat.join(room, presence_entry("c1", "alice"))
    await chat.leave(room, presence_entry("c1", "alice"))
    await eventually(lambda: len(listener.objects(room)) == 2, timeout=10, what="join and leave")
    assert listener.objects(room)[1]["online"] == []
    await listener.stop()


async def test_entries_not_renewed_expire_and_a_renewal_brings_them_back(brokers: BrokerFactory, room: str) -> None:
    chat = brokers(presence_ttl=1.0, presence_interval_ms=0)
    listener = await Listener(brokers()).ready()
    await chat.join(room, presence_entry("c1", "alice"))
    await chat.join(room, presence_entry("c2", "bob"))
    joined_at = time.monotonic()

    def left() -> list[dict[str, Any]]:
        return [o for o in listener.objects(room) if o["event"] == "leave"]

    async def bob_renewed_and_alice_gone() -> bool:
        # What bob's replica does every PRESENCE_TTL / 4; alice's replica died and renews nothing.
        await chat.refresh(room, [presence_entry("c2", "bob")])
        await asyncio.sleep(0.05)  # the event, if any, travels through pub/sub
        return bool(left())

    await eventually_async(bob_renewed_and_alice_gone, timeout=10, what="alice's entry expiring", interval=0.2)
    assert time.monotonic() - joined_at >= 0.9  # not before her time to live
    assert left() == [{"type": "presence", "event": "leave", "name": "alice", "online": ["bob"], "online_count": 1}]

    # Her replica was only cut off from Redis: its next renewal brings her back.
    await chat.refresh(room, [presence_entry("c1", "alice"), presence_entry("c2", "bob")])
    await eventually(lambda: listener.objects(room)[-1]["event"] == "join", timeout=10, what="alice back")
    assert listener.objects(room)[-1] == {
        "type": "presence",
        "event": "join",
        "name": "alice",
        "online": ["alice", "bob"],
        "online_count": 2,
    }
    await listener.stop()


class Member:
    """What Rooms needs of a connection: a place in a room, and where its deliveries go."""

    def __init__(self) -> None:
        self.got: list[Delivery] = []
        self.joined_at: MessageId | None = None
        self.room: str | None = None
        self.name: str | None = None

    def start_joining(self, room: str, name: str) -> None:
        self.room, self.name = room, name

    def post(self, delivery: Delivery) -> None:
        self.got.append(delivery)


async def test_what_is_published_while_the_subscription_is_lost_is_caught_up_from_the_log(
    brokers: BrokerFactory, room: str, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Half a second before each new subscription: what is said in between cannot come by pub/sub.
    monkeypatch.setattr(broker_module.Backoff, "next_delay", lambda self: 0.5)
    replica, other = brokers(), brokers()
    rooms = Rooms(replica, replica.settings)
    member = Member()
    rooms.enter(room, member, "bob")  # type: ignore[arg-type]
    subscriptions = 0
    fill_gaps = rooms.fill_gaps

    async def counting_fill_gaps() -> None:
        nonlocal subscriptions
        await fill_gaps()
        subscriptions += 1

    rooms.fill_gaps = counting_fill_gaps  # type: ignore[method-assign]
    fan_out = asyncio.create_task(rooms.fan_out())
    await eventually(lambda: subscriptions == 1, timeout=10, what="the first subscription")
    await say(other, room, "m1")
    await eventually(lambda: len(member.got) == 1, timeout=10, what="m1 by pub/sub")

    admin = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port, password=redis_server.password)
    assert await admin.client_kill_filter(_type="pubsub") >= 1
    await admin.aclose()
    await say(other, room, "m2")
    await say(other, room, "m3")
    await eventually(lambda: subscriptions == 2, timeout=10, what="the subscription back")
    await say(other, room, "m4")
    await eventually(lambda: len(member.got) >= 4, timeout=10, what="all four messages")
    assert texts(member.got) == ["m1", "m2", "m3", "m4"]  # each once, in order
    fan_out.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fan_out


async def test_after_a_redis_restart_no_command_fails_on_an_old_connection(
    brokers: BrokerFactory, room: str, redis_server: RedisServer
) -> None:
    chat = brokers()
    listener = await Listener(chat).ready()
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
        await nowhere.append("lobby", message_body("lobby", "a", "hi", None))
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
        chat = RedisBroker(Settings(replica_name="t", redis_url=server.url, redis_password=Secret(server.password)))
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
