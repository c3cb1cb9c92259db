"""The Redis broker against a real Redis (the project's own image, started with testcontainers): the Lua scripts, the
log reads and the subscription's catching up, each checked on its own where the stack tests see only their sum.

(Named test_redis_broker.py: tests/unit/test_broker.py, of the in-memory twin, already has the shorter name, and
pytest cannot hold two test modules of one name.)"""

from __future__ import annotations

import asyncio
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
from infinite_chat.broker import BrokerUnavailable, Delivery, RedisBroker, log_key, presence_entry
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
def redis_server() -> Iterator[RedisServer]:
    """Redis from services/redis (password, AOF, renamed commands), published on this machine's loopback only."""
    require_docker()
    tag = f"infinite-chat-test/redis:broker-{secrets.token_hex(3)}"
    subprocess.run(["docker", "build", "-q", "-t", tag, str(ROOT / "services" / "redis")], check=True, timeout=600)
    password = secrets.token_hex(16)
    port = free_port()
    container = DockerContainer(tag).with_env("REDIS_PASSWORD", password)
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
        subprocess.run(["docker", "image", "rm", "--force", tag], check=False, capture_output=True, timeout=120)


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


def texts(deliveries: list[Delivery] | None) -> list[str]:
    assert deliveries is not None
    return [json.loads(delivery.frame)["text"] for delivery in deliveries]


async def test_appends_from_two_replicas_are_published_in_log_order(brokers: BrokerFactory, room: str) -> None:
    first, second, hearing = brokers(), brokers(), brokers()
    listener = await Listener(hearing).ready()
    sent = await asyncio.gather(
        *(say(first, room, f"a{n}") for n in range(40)), *(say(second, room, f"b{n}") for n in range(40))
    )
    stored = await first.gap(room, None)
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
    assert texts(await chat.after(room, ids[6])) == ["m7", "m8", "m9"]
    assert await chat.after(room, ids[9]) == []
    assert await chat.after(room, "1-0") is None
    assert await chat.after(f"{room}-other", ids[3]) is None
    assert texts(await chat.gap(room, parse_message_id(ids[4]))) == ["m5", "m6", "m7", "m8", "m9"]
    assert len(await chat.gap(room, None)) == 10
    assert len(await chat.gap(room, (0, 1))) == 10  # a position that is no entry's id
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
    assert await chat.after(room, ids[0]) is None
    assert texts(await chat.after(room, ids[-3])) == ["m398", "m399"]
    assert texts(await chat.recent(room, 2)) == ["m398", "m399"]


async def test_a_room_log_expires_after_its_idle_days(brokers: BrokerFactory, room: str) -> None:
    chat = brokers(room_idle_days=2)
    await say(chat, room, "hello")
    assert 2 * 86_400 - 60 < await chat.redis.ttl(log_key(room)) <= 2 * 86_400


async def test_presence_is_by_name_sorted_capped_and_announced_when_it_changes(
    brokers: BrokerFactory, room: str
) -> None:
    chat = brokers(presence_list_max=2)
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
    chat = brokers()
    listener = await Listener(brokers()).ready()
    await chat.join(room, presence_entry("c1", "alice"))
    await chat.leave(room, presence_entry("c1", "alice"))
    await eventually(lambda: len(listener.objects(room)) == 2, timeout=10, what="join and leave")
    assert listener.objects(room)[1]["online"] == []
    await listener.stop()


async def test_entries_not_renewed_expire_and_a_renewal_brings_them_back(brokers: BrokerFactory, room: str) -> None:
    chat = brokers(presence_ttl=1.0)
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
