"""A replica's subscriptions to its rooms' channels: one connection per Redis node that serves any of them (a
standalone Redis is one node), each room confirmed before its history is read, each node's connection recovered on
its own, so that a node that fails over interrupts only the rooms whose slots it served.

Sharded Pub/Sub (SSUBSCRIBE; the scripts SPUBLISH; Redis 7.0+) on both kinds of Redis. On a cluster a room's channel
lives on the node that owns the room's slot (the room's keys share its hash tag), so its messages go through that
node alone; a standalone Redis treats shard channels like any other. The connections are our own, one per node,
rather than redis-py's ClusterPubSub: that one reads every node's connection in turn from a single loop, so a node
that stops answering holds up every room (redis/redis-py#4076), and its replay after a reconnect has sent one
SSUBSCRIBE for channels of several slots, which Redis refuses (CROSSSLOT, #4038). Here each node has a task of its
own, and every SSUBSCRIBE names channels of one slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import redis.asyncio as redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from .. import metrics
from .base import BrokerUnavailable, Delivery, ModerationNotice, OnSubscribed, TypingNotice
from .confirmations import Confirmed, Unconfirmed
from .keys import channel_key, is_listening_key, listening_key, room_of_channel, slot_of

log = logging.getLogger(__name__)
# What a Redis that is away, or a cluster that is failing over, raises: redis-py's cluster client raises some that
# are not RedisErrors (RedisClusterException when no node answers, SlotNotCoveredError for a slot with no primary).
REDIS_FAILURES = (RedisError, RedisClusterException, OSError)
# How long a join waits for Redis to confirm its room's subscription before it is told the chat is unavailable.
SUBSCRIBE_TIMEOUT = 5.0
# Deliveries read from the nodes and not yet handed to the rooms: past this, the nodes' readers wait (and Redis
# buffers for them, within client-output-buffer-limit pubsub).
QUEUE_LIMIT = 10_000


class Backoff:
    """Exponential backoff with full jitter, so that replicas do not reconnect in step."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.first = first
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.first * 2**self.attempt)
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


class SlotMoved(Exception):
    """Redis ended a room's subscription by itself: its slot now belongs to another node."""


# What ends a node's subscription connection: the node is away, or it no longer serves a room's slot.
SUBSCRIPTION_LOST = (RedisError, RedisClusterException, OSError, BrokerUnavailable, SlotMoved)


class Topology(ABC):
    """Which node serves which channel, and a connection to each."""

    @abstractmethod
    async def refresh(self) -> None:
        """Learns the current layout (after a node was lost or a slot moved)."""

    @abstractmethod
    def primaries(self) -> list[str]:
        """The nodes that serve slots now."""

    @abstractmethod
    def node_of(self, channel: str) -> str:
        """The node that serves this channel's slot. BrokerUnavailable when nobody does (yet)."""

    @abstractmethod
    def batches(self, channels: Iterable[str]) -> list[list[str]]:
        """The channels in groups that one SSUBSCRIBE may name."""

    @abstractmethod
    def listening(self, node: str) -> str:
        """A channel of no room that this node serves (see keys.listening_key)."""

    @abstractmethod
    def subscriber(self, node: str) -> redis.Redis:
        """A client for the node's subscription connection (no read timeout: it waits for messages)."""

    @abstractmethod
    async def drop_idle(self, node: str) -> None:
        """Closes the idle command connections to the node: they may lead to a server that is gone.

        Redis closing a connection (a restart, a failover, a cut) is not noticed on an idle pooled one: redis-py
        hands it out and the next command on it fails, and with no retry (see RedisBroker) that is one user's message
        or join refused per idle connection, long after Redis is back. The subscription notices at once, so when it
        is lost (and again once it is back) the idle connections go, and the next commands open fresh ones.
        """

    @abstractmethod
    async def close(self) -> None:
        """Closes the subscription clients."""


class OneServer(Topology):
    """A standalone Redis: one node serves every channel."""

    NODE = "redis"

    def __init__(self, commands: redis.Redis, subscriber: redis.Redis) -> None:
        self._commands = commands
        self._subscriber = subscriber

    async def refresh(self) -> None:
        return None

    def primaries(self) -> list[str]:
        return [self.NODE]

    def node_of(self, channel: str) -> str:
        return self.NODE

    def batches(self, channels: Iterable[str]) -> list[list[str]]:
        listed = list(channels)
        return [listed] if listed else []

    def listening(self, node: str) -> str:
        return listening_key(0)

    def subscriber(self, node: str) -> redis.Redis:
        return self._subscriber

    async def drop_idle(self, node: str) -> None:
        with contextlib.suppress(*REDIS_FAILURES):
            await self._commands.connection_pool.disconnect(inuse_connections=False)

    async def close(self) -> None:
        await self._subscriber.aclose()


class ClusterTopology(Topology):
    """A Redis Cluster, as the command client (redis-py's RedisCluster) last learnt it."""

    def __init__(
        self,
        cluster: RedisCluster,
        connect: Callable[[str, int], redis.Redis],
        command_client: Callable[[str, int], redis.Redis],
    ) -> None:
        self._cluster = cluster
        self._connect = connect
        self._command_client = command_client
        self._subscribers: dict[str, redis.Redis] = {}
        # Command clients of our own, one per primary, for what must run on one connection to the node that serves
        # a key (an append and its WAIT): redis-py's cluster client picks a connection per command.
        self._commands: dict[str, redis.Redis] = {}

    def commands(self, key: str) -> redis.Redis:
        """A client of the primary that serves this key now (as the cluster client last learnt it)."""
        node = self._cluster.get_node_from_key(key)
        if node is None:
            raise BrokerUnavailable("no primary serves the key now")
        client = self._commands.get(node.name)
        if client is None:
            client = self._commands[node.name] = self._command_client(node.host, int(node.port))
        return client

    async def refresh(self) -> None:
        # The first call is also the first contact: before it, redis-py's slot table is empty (and a lookup in it
        # raises KeyError, redis/redis-py#4296). Later calls ask the cluster again, whatever redis-py has cached.
        await self._cluster.initialize()
        await self._cluster.nodes_manager.initialize()

    def primaries(self) -> list[str]:
        return [node.name for node in self._cluster.get_primaries()]

    def node_of(self, channel: str) -> str:
        try:
            return str(self._cluster.nodes_manager.get_node_from_slot(slot_of(channel)).name)
        except REDIS_FAILURES as error:  # SlotNotCoveredError: no primary for the slot now
            raise BrokerUnavailable(f"no node serves the slot of {channel}") from error
        except KeyError as error:  # the same, before the first discovery (redis/redis-py#4296)
            raise BrokerUnavailable(f"no node serves the slot of {channel}") from error

    def batches(self, channels: Iterable[str]) -> list[list[str]]:
        by_slot: dict[int, list[str]] = defaultdict(list)
        for channel in channels:
            by_slot[slot_of(channel)].append(channel)
        return list(by_slot.values())

    def listening(self, node: str) -> str:
        # The first tag whose slot this node serves: a few tries, as a node of three serves a third of the slots.
        for tag in range(100_000):
            channel = listening_key(tag)
            with contextlib.suppress(BrokerUnavailable):
                if self.node_of(channel) == node:
                    return channel
        raise BrokerUnavailable(f"{node} serves no slot")

    def subscriber(self, node: str) -> redis.Redis:
        client = self._subscribers.get(node)
        if client is None:
            host, _, port = node.rpartition(":")
            client = self._subscribers[node] = self._connect(host, int(port))
        return client

    async def drop_idle(self, node: str) -> None:
        cluster_node = self._cluster.get_node(node_name=node)
        if cluster_node is not None:
            with contextlib.suppress(*REDIS_FAILURES):
                await cluster_node.disconnect_free_connections()
        commands = self._commands.get(node)
        if commands is not None:
            with contextlib.suppress(*REDIS_FAILURES):
                await commands.connection_pool.disconnect(inuse_connections=False)

    async def close(self) -> None:
        for client in [*self._subscribers.values(), *self._commands.values()]:
            with contextlib.suppress(*REDIS_FAILURES):
                await client.aclose()
        self._subscribers.clear()
        self._commands.clear()


class Subscriptions:
    """The rooms this replica hears, each on the connection of the node that serves its channel."""

    def __init__(
        self,
        topology: Topology,
        parse: Callable[[bytes], Delivery | Confirmed | TypingNotice | ModerationNotice],
        *,
        holding: bool = False,
    ) -> None:
        self.topology = topology
        self.parse = parse
        # Messages and changes are shown only once confirmed (confirmations.py); presence and typing are never held.
        self.holding = holding
        self.unconfirmed = Unconfirmed()
        # Each room asked for, and whether Redis has confirmed its subscription (set) or not yet (a new future).
        self.heard: dict[str, asyncio.Future[None]] = {}
        self._shards: dict[str, Shard] = {}
        self._queue: asyncio.Queue[Delivery | TypingNotice | ModerationNotice] = asyncio.Queue(QUEUE_LIMIT)
        self._on_subscribed: OnSubscribed | None = None

    async def subscribe(self, room: str) -> None:
        heard = self.heard.get(room)
        if heard is None:
            heard = self.heard[room] = asyncio.get_running_loop().create_future()
            with contextlib.suppress(BrokerUnavailable):
                # Else no node serves the room's slot now: the room stays asked for, and the join waits (below)
                # for the next layout, as for any other loss of its node.
                await self._shard(self.topology.node_of(channel_key(room))).add(room)
        try:
            await asyncio.wait_for(asyncio.shield(heard), SUBSCRIBE_TIMEOUT)
        except TimeoutError:
            raise BrokerUnavailable("the room's subscription was not confirmed in time") from None

    async def unsubscribe(self, room: str) -> None:
        heard = self.heard.pop(room, None)
        if heard is None:
            return
        self.unconfirmed.drop([room])
        if not heard.done():
            heard.set_exception(BrokerUnavailable("unsubscribed"))
            heard.exception()  # nobody need look: whoever waited has left the room
        for shard in self._shards.values():
            if room in shard.rooms:
                await shard.remove(room)

    async def listen(self, on_subscribed: OnSubscribed) -> AsyncIterator[Delivery | TypingNotice | ModerationNotice]:
        self._on_subscribed = on_subscribed
        backoff = Backoff()
        while True:
            try:
                await self.topology.refresh()
                for node in self.topology.primaries():
                    self._shard(node)
                break
            except REDIS_FAILURES as error:
                log.warning("Redis layout unknown: %s", type(error).__name__, extra={"event": "redis_lost"})
                await asyncio.sleep(backoff.next_delay())
        # Rooms asked for before this: on the nodes that serve them now.
        for room in self.heard:
            if not any(room in shard.rooms for shard in self._shards.values()):
                with contextlib.suppress(BrokerUnavailable):
                    await self._shard(self.topology.node_of(channel_key(room))).add(room)
        try:
            for shard in list(self._shards.values()):
                shard.start()
            while True:
                yield await self._queue.get()
        finally:
            for shard in self._shards.values():
                shard.stop()

    async def close(self) -> None:
        for shard in self._shards.values():
            shard.stop()
        await self.topology.close()

    def connected(self) -> bool:
        """Whether every node's subscription connection is up (and subscribed)."""
        return bool(self._shards) and all(shard.connected for shard in self._shards.values())

    def _shard(self, node: str) -> Shard:
        shard = self._shards.get(node)
        if shard is None:
            shard = self._shards[node] = Shard(self, node)
            if self._on_subscribed is not None:
                shard.start()
        return shard

    def confirmed(self, room: str) -> None:
        heard = self.heard.get(room)
        if heard is not None and not heard.done():
            heard.set_result(None)

    def unconfirm(self, rooms: Iterable[str]) -> None:
        """These rooms' subscriptions are gone: joins from now on wait for the next one."""
        loop = asyncio.get_running_loop()
        rooms = list(rooms)
        self.unconfirmed.drop(rooms)
        for room in rooms:
            heard = self.heard.get(room)
            if heard is not None and heard.done():
                self.heard[room] = loop.create_future()

    async def caught_up(self, rooms: list[str]) -> None:
        """What these rooms missed while they were not heard, fetched by the replica (Rooms.fill_gaps)."""
        if self._on_subscribed is not None:
            await self._on_subscribed(rooms)

    async def deliver(self, item: Delivery | Confirmed | TypingNotice | ModerationNotice) -> None:
        if isinstance(item, Confirmed):
            released, overflowed = self.unconfirmed.release(item)
            if overflowed:
                await self.caught_up([item.room])
            for delivery in released:
                await self._queue.put(delivery)
            return
        metrics.FANOUT_RECEIVED.inc()
        if self.holding and isinstance(item, Delivery) and item.id is not None:
            self.unconfirmed.hold(item)
        else:
            await self._queue.put(item)

    async def relocate(self, lost: Shard) -> None:
        """After `lost`'s connection went: each of its rooms to the node that serves it now, with a catch-up once
        it is heard there. A node that serves nothing any more (a primary that failed over) is let go."""
        with contextlib.suppress(*REDIS_FAILURES):
            await self.topology.refresh()
        for room in list(lost.rooms):
            try:
                node = self.topology.node_of(channel_key(room))
            except BrokerUnavailable:
                continue  # stays with the lost node until the layout says where it went
            if node != lost.node:
                lost.rooms.discard(room)
                await self._shard(node).add(room, moved=True)
        with contextlib.suppress(*REDIS_FAILURES):
            primaries = self.topology.primaries()
            for node in primaries:
                self._shard(node)
            if lost.node not in primaries and not lost.rooms:
                lost.stop()
                del self._shards[lost.node]
                log.info("node left the fan-out", extra={"event": "redis_node_gone", "node": lost.node})


class Shard:
    """One node's subscription connection, and the rooms it carries."""

    def __init__(self, subscriptions: Subscriptions, node: str) -> None:
        self.subscriptions = subscriptions
        self.node = node
        self.rooms: set[str] = set()
        # Rooms that came from another node (a failover, a slot move): caught up once heard here.
        self._moved: set[str] = set()
        # Unsubscriptions asked for and not yet confirmed, so that their confirmations are not taken for Redis
        # ending a subscription by itself.
        self._leaving: Counter[str] = Counter()
        self._pubsub: PubSub | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._pubsub is not None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"fan-out {self.node}")
            self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """`_run` ends only when stopped. Should an error it does not expect end it, the node's rooms would never
        be heard again: say so, and start over."""
        if task.cancelled() or self._task is not task:
            return
        log.error(
            "fan-out of a node failed: %r", task.exception(), extra={"event": "fan_out_failed", "node": self.node}
        )
        self._task = None
        asyncio.get_running_loop().call_later(1.0, self.start)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def add(self, room: str, *, moved: bool = False) -> None:
        self.rooms.add(room)
        if moved:
            self._moved.add(room)
        pubsub = self._pubsub
        if pubsub is not None:
            # Confirmed by `_run`, which reads the connection's replies. If the connection has just gone, `_run`
            # asks again for every room once it is back.
            with contextlib.suppress(*REDIS_FAILURES):
                await pubsub.ssubscribe(channel_key(room))

    async def remove(self, room: str) -> None:
        self.rooms.discard(room)
        self._moved.discard(room)
        pubsub = self._pubsub
        if pubsub is not None:
            self._leaving[channel_key(room)] += 1
            with contextlib.suppress(*REDIS_FAILURES):
                await pubsub.sunsubscribe(channel_key(room))

    async def _run(self) -> None:
        subscriptions = self.subscriptions
        topology = subscriptions.topology
        backoff = Backoff()
        while True:
            pubsub = topology.subscriber(self.node).pubsub()
            rooms = list(self.rooms)
            try:
                waiting = {topology.listening(self.node), *(channel_key(room) for room in rooms)}
                for batch in topology.batches(waiting):
                    await pubsub.ssubscribe(*batch)
                # Read the confirmations, and only then catch up on the logs, so that nothing published is lost.
                # (Redis confirms the channels of an SSUBSCRIBE before anything published on them; whatever else
                # comes first is kept for after the catch-up, where it is dropped if the catch-up had it.)
                early: list[Delivery | Confirmed | TypingNotice | ModerationNotice] = []
                deadline = asyncio.get_running_loop().time() + 2 * SUBSCRIBE_TIMEOUT
                while waiting:
                    reply = await pubsub.get_message(timeout=1.0)
                    if reply is None:
                        if asyncio.get_running_loop().time() > deadline:
                            raise BrokerUnavailable("the subscriptions were not confirmed")
                        continue
                    if reply["type"] == "smessage":
                        early.append(subscriptions.parse(reply["data"]))
                    elif reply["type"] == "ssubscribe":
                        waiting.discard(reply["channel"].decode())
                        if not is_listening_key(reply["channel"]):
                            subscriptions.confirmed(room_of_channel(reply["channel"]))
                self._pubsub = pubsub
                self._moved.difference_update(rooms)
                # Rooms asked for while this connection was being made: ask now (confirmed in the loop below).
                later = [room for room in self.rooms if room not in rooms]
                for batch in topology.batches(channel_key(room) for room in later):
                    await pubsub.ssubscribe(*batch)
                # A command that finished on the old server just as it went away may have put its connection back.
                await topology.drop_idle(self.node)
                await subscriptions.caught_up(rooms)
                backoff.reset()
                log.info(
                    "fan-out subscribed",
                    extra={"event": "redis_subscribed", "node": self.node, "rooms": len(self.rooms)},
                )
                for delivery in early:
                    await subscriptions.deliver(delivery)
                async for message in pubsub.listen():
                    if message["type"] == "smessage":
                        await subscriptions.deliver(subscriptions.parse(message["data"]))
                    else:
                        await self._on_reply(message)
            except SUBSCRIPTION_LOST as error:
                metrics.REDIS_ERRORS.labels("subscribe").inc()
                log.warning(
                    "fan-out subscription lost: %s",
                    type(error).__name__,
                    extra={"event": "redis_lost", "node": self.node},
                )
                await topology.drop_idle(self.node)
            finally:
                self._pubsub = None
                subscriptions.unconfirm(self.rooms)
                self._leaving.clear()
                with contextlib.suppress(*REDIS_FAILURES):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            metrics.REDIS_RECONNECTS.inc()
            await subscriptions.relocate(self)
            await asyncio.sleep(backoff.next_delay())

    async def _on_reply(self, reply: dict[str, Any]) -> None:
        """A subscription reply: a room's joins may read its history now, or Redis moved a room away."""
        channel: bytes = reply["channel"]
        if is_listening_key(channel):
            if reply["type"] == "sunsubscribe":
                raise SlotMoved(channel.decode())
            return
        name = channel.decode()
        room = room_of_channel(channel)
        if reply["type"] == "ssubscribe":
            self.subscriptions.confirmed(room)
            if room in self._moved:
                self._moved.discard(room)
                await self.subscriptions.caught_up([room])
        elif reply["type"] == "sunsubscribe":
            if self._leaving[name] > 0:
                self._leaving[name] -= 1
                if not self._leaving[name]:
                    del self._leaving[name]
            elif room in self.rooms:
                # Not asked for: the slot went to another node (resharding, or this node became a replica).
                raise SlotMoved(name)
