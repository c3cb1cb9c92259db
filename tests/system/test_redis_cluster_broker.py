"""The Redis broker on a real Redis Cluster (the project's image, three primaries with a replica each): one
subscription connection per primary, rooms spread over all of them, and a primary's failover interrupting only its
own rooms. What every broker does is in test_broker_contract.py, which also runs on a cluster; the whole stack's
cluster profile is in test_cluster.py."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator

import pytest

from infinite_chat.broker import BrokerUnavailable, RedisBroker
from infinite_chat.broker.keys import channel_key, log_key, slot_of
from infinite_chat.protocol import message_body
from infinite_chat.rooms import Rooms
from support.chat import eventually
from support.peer import Peer, outbox
from support.redis_server import ClusterServer


@pytest.fixture
def cluster(redis_cluster: ClusterServer) -> ClusterServer:
    """The module's cluster (tests/conftest.py), under a shorter name."""
    return redis_cluster


@pytest.fixture
async def brokers(cluster: ClusterServer) -> AsyncIterator[list[RedisBroker]]:
    made = [cluster.broker(), cluster.broker()]
    yield made
    for broker in made:
        await broker.close()


def room_on(cluster: ClusterServer, primary: int) -> str:
    """A room of this test's own whose slot that primary serves."""
    while True:
        room = f"c-{secrets.token_hex(5)}"
        if cluster.owner(slot_of(log_key(room))) == primary:
            return room


async def test_rooms_on_every_primary_are_heard_on_one_connection_per_primary(
    cluster: ClusterServer, brokers: list[RedisBroker]
) -> None:
    replica, sender = brokers
    primaries = sorted(cluster.primaries())
    rooms = {primary: [room_on(cluster, primary) for _ in range(3)] for primary in primaries}
    hall = Rooms(replica, replica.settings)
    fan_out = asyncio.create_task(hall.fan_out())
    peers: dict[str, Peer] = {}
    for room in (room for on_one in rooms.values() for room in on_one):
        peer = peers[room] = Peer()
        member = hall.enter(room, outbox(peer), "bob")
        await hall.hear(member)
        hall.welcome(member, b"welcome", None)
    for room in peers:
        await sender.append(room, message_body(room, "alice", f"to {room}", None), name="alice", ref=None)
    await eventually(lambda: all(len(p.objects) == 2 for p in peers.values()), timeout=10, what="every room heard")
    for room, peer in peers.items():
        assert json.loads(peer.objects[1])["text"] == f"to {room}"
    # Each room's channel lives on its slot's primary, where this replica holds one subscription connection for
    # all its rooms there (the sender, which listens to nothing, holds none).
    for primary, on_one in rooms.items():
        with cluster.client(primary) as client:
            counts = dict(client.pubsub_shardnumsub(*(channel_key(room) for room in on_one)))
            assert counts == {channel_key(room).encode(): 1 for room in on_one}
            assert len(client.client_list(_type="pubsub")) == 1
    fan_out.cancel()


async def test_a_primary_failing_over_interrupts_only_its_own_rooms_and_they_resume_with_nothing_missed(
    cluster: ClusterServer, brokers: list[RedisBroker]
) -> None:
    replica, sender = brokers
    primaries = sorted(cluster.primaries())
    seed = min(cluster.containers)
    victim = next(port for port in primaries if port != seed)
    rooms = {primary: room_on(cluster, primary) for primary in primaries}
    hall = Rooms(replica, replica.settings)
    fan_out = asyncio.create_task(hall.fan_out())
    peers: dict[str, Peer] = {}
    for room in rooms.values():
        peer = peers[room] = Peer()
        member = hall.enter(room, outbox(peer), "bob")
        await hall.hear(member)
        hall.welcome(member, b"welcome", None)

    accepted: dict[str, list[str]] = {room: [] for room in peers}
    refused: dict[str, list[float]] = {room: [] for room in peers}
    stop = asyncio.Event()

    async def keep_saying(room: str) -> None:
        n = 0
        while not stop.is_set():
            try:
                accepted[room].append(
                    (await sender.append(room, message_body(room, "alice", f"m{n}", None), name="alice", ref=None)).id
                )
            except BrokerUnavailable:
                refused[room].append(time.monotonic())
            n += 1
            await asyncio.sleep(0.05)

    sayers = [asyncio.create_task(keep_saying(room)) for room in peers]
    await eventually(lambda: all(len(ids) >= 10 for ids in accepted.values()), timeout=10, what="chat going")
    killed_at = time.monotonic()
    cluster.kill(victim)
    struck = rooms[victim]
    await eventually(lambda: bool(refused[struck]), timeout=10, what="the struck room's sends refused")
    try:
        # Its replica takes over; with no replica of its own to confirm messages (REDIS_CONFIRM_REPLICAS=1), it
        # accepts them once the killed node is back as its replica, as Docker's restart or ElastiCache's node
        # replacement would bring it.
        slot = slot_of(log_key(struck))
        await eventually(lambda: cluster.owner(slot) != victim, timeout=30, what="the replica promoted")
        cluster.start(victim)
        before = len(accepted[struck])
        await eventually(lambda: len(accepted[struck]) > before + 10, timeout=40, what="the struck room back")
        back_at = time.monotonic()
        stop.set()
        await asyncio.gather(*sayers)

        # Every room's member got every message of its room's log, once and in order: the other rooms without a
        # single refusal, the struck one caught up from the log on the promoted replica.
        for room, peer in peers.items():
            log = [entry[0].decode() for entry in await sender.redis.xrange(log_key(room))]
            await eventually(
                lambda peer=peer, log=log: len(peer.objects) - 1 >= len(log), timeout=10, what=f"{room} delivered"
            )
            assert [json.loads(o)["id"] for o in peer.objects[1:]] == log
            if room != struck:
                assert refused[room] == [], f"{room} is on another shard and was interrupted"
                assert log == accepted[room]
        # Every message acknowledged (confirmed by the replica) is on the promoted replica.
        log = [entry[0].decode() for entry in await sender.redis.xrange(log_key(struck))]
        lost = [message_id for message_id in accepted[struck] if message_id not in log]
        print(
            f"FIGURES cluster_failover refused_s={refused[struck][-1] - refused[struck][0]:.1f} "
            f"back_after_s={back_at - killed_at:.1f} acknowledged_then_lost={len(lost)}"
        )
        assert lost == [], "acknowledged, then lost with the primary"
    finally:
        stop.set()
        fan_out.cancel()
        cluster.start(victim)
        cluster.wait_ok()


async def test_a_room_whose_slot_moves_to_another_primary_is_followed_there_with_nothing_missed(
    cluster: ClusterServer, brokers: list[RedisBroker]
) -> None:
    replica, sender = brokers
    primaries = sorted(cluster.primaries())
    room = room_on(cluster, primaries[0])
    slot = slot_of(log_key(room))
    hall = Rooms(replica, replica.settings)
    fan_out = asyncio.create_task(hall.fan_out())
    peer = Peer()
    member = hall.enter(room, outbox(peer), "bob")
    await hall.hear(member)
    hall.welcome(member, b"welcome", None)
    said = [
        (await sender.append(room, message_body(room, "alice", f"before {n}", None), name="alice", ref=None)).id
        for n in range(3)
    ]
    await eventually(lambda: len(peer.objects) == 4, timeout=10, what="the first three")
    # Redis ends the subscription by itself (sunsubscribe) when the slot leaves its node: the replica follows the
    # room to the new node and catches up from the log, which moved with the slot.
    cluster.move_slot(slot, primaries[1])
    for n in range(3):
        said.append(
            (await sender.append(room, message_body(room, "alice", f"after {n}", None), name="alice", ref=None)).id
        )
    await eventually(lambda: len(peer.objects) == 7, timeout=15, what="the three after the move")
    assert [json.loads(o)["id"] for o in peer.objects[1:]] == said
    with cluster.client(primaries[1]) as client:
        assert dict(client.pubsub_shardnumsub(channel_key(room))) == {channel_key(room).encode(): 1}
    fan_out.cancel()
