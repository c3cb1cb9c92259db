"""The one module that talks to Redis: each room's log (a stream), who is online (sorted sets and hashes), each
address's allowance (a hash), and a channel per room.

A message is appended to its room's stream and published on the room's channel in a single Lua script
(lua/append.lua), so it is stored before anyone sees it and every replica hearing the room gets its messages in log
order. A replica subscribes to the channels of the rooms it has members in, one connection per node
(subscriptions.py); after a lost subscription it reads each room's log from the last id it had, so an outage loses
nothing. The same code runs on a standalone Redis and on a Redis Cluster (REDIS_CLUSTER): only the client differs,
and every key of a room carries the room in a hash tag, so that a room's keys and channel are in one slot (keys.py).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from importlib.resources import files
from typing import Any

import orjson
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import metrics
from ..config import Settings
from ..protocol import ErrorCode, MessageId, parse_message_id, presence_frame
from .base import (
    LOG_PAGE,
    QUOTA_WINDOW_MS,
    Broker,
    BrokerUnavailable,
    Delivery,
    LogRead,
    Online,
    OnSubscribed,
    QuotaRefusal,
    message_delivery,
)
from .keys import channel_key, log_key, old_log_key, presence_keys, quota_key
from .subscriptions import REDIS_FAILURES, ClusterTopology, OneServer, Subscriptions, Topology

log = logging.getLogger(__name__)


def _script(name: str) -> str:
    return files(__package__).joinpath("lua", name).read_text(encoding="utf-8")


class RedisBroker(Broker):
    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url is not None
        super().__init__(settings)
        options: dict[str, Any] = {
            "password": settings.redis_password.reveal() or None,
            # Frames stay bytes from Redis to the socket: nothing is decoded that is not looked at.
            "decode_responses": False,
            "socket_connect_timeout": 2.0,
            "socket_keepalive": True,
            # Never retry behind our back: a retried append whose first try did reach Redis would store it twice.
            # (A cluster's MOVED and ASK are followed all the same: a redirected command did not run.)
            "retry": Retry(NoBackoff(), 0),
        }
        if settings.redis_url.startswith("rediss://"):
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
            if settings.redis_ca_file:
                options["ssl_ca_certs"] = settings.redis_ca_file
        # The subscriptions wait for messages indefinitely: connections of their own, without a read timeout.
        listening = {**options, "socket_timeout": None, "health_check_interval": 15}
        topology: Topology
        if settings.redis_cluster:
            # Any node's URL will do: the client learns the others from it. A node that is down or has failed over
            # answers nothing for its slots, so no full coverage is required: the other nodes' rooms go on.
            cluster = RedisCluster.from_url(
                settings.redis_url,
                require_full_coverage=False,
                max_connections=64,
                socket_timeout=5.0,
                **options,
            )
            self.redis: redis.Redis | RedisCluster = cluster
            tls = settings.redis_url.startswith("rediss://")

            def connect(host: str, port: int) -> redis.Redis:
                return redis.Redis(host=host, port=port, ssl=tls, **listening)

            topology = ClusterTopology(cluster, connect)
            self._discovered = False
            self._discovering = asyncio.Lock()
        else:
            pool = redis.BlockingConnectionPool.from_url(
                settings.redis_url,
                max_connections=64,
                timeout=5,
                socket_timeout=5.0,
                health_check_interval=15,
                **options,
            )
            self.redis = redis.Redis.from_pool(pool)
            listener_pool = redis.ConnectionPool.from_url(settings.redis_url, max_connections=2, **listening)
            topology = OneServer(self.redis, redis.Redis.from_pool(listener_pool))
            self._discovered = True
        self.subscriptions = Subscriptions(topology, _parse_published)
        self._append = self.redis.register_script(_script("append.lua"))
        self._migrate = self.redis.register_script(_script("migrate.lua"))
        self._presence_script = self.redis.register_script(_script("presence.lua"))
        self._quota = self.redis.register_script(_script("quota.lua"))
        self._idle_seconds = settings.room_idle_days * 86_400

    async def close(self) -> None:
        self._stop_presence_flushes()
        await self.subscriptions.close()
        await self.redis.aclose()

    async def _discover(self) -> None:
        """redis-py's cluster client must learn the cluster's layout before its first commands: sent by many tasks at
        once to a client that has not, they race each other's discovery and fail (measured here: 16 to 29 of 40
        concurrent first appends refused with ConnectionError; its maintainers say to call `initialize` first,
        redis/redis-py#3032). Raises one of REDIS_FAILURES when no node answers."""
        if self._discovered:
            return
        async with self._discovering:
            if not self._discovered:
                assert isinstance(self.redis, RedisCluster)
                await self.redis.initialize()
                self._discovered = True

    async def ping(self) -> None:
        try:
            await self._discover()
            if isinstance(self.redis, RedisCluster):
                # Whether this replica reaches the cluster, not every node of it: one node failing over must not
                # make every replica unready.
                await asyncio.wait_for(self.redis.ping(target_nodes=RedisCluster.DEFAULT_NODE), 2.0)
            else:
                await asyncio.wait_for(self.redis.ping(), 2.0)
        except REDIS_FAILURES as error:  # TimeoutError is an OSError
            raise _unavailable(error) from None

    async def append(self, room: str, body: bytes) -> str:
        try:
            await self._discover()
            message_id = await self._append(
                keys=[log_key(room)],
                args=[body, self.settings.retain, channel_key(room), room, self._idle_seconds],
            )
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        return message_id.decode() if isinstance(message_id, bytes) else str(message_id)

    async def recent(self, room: str, limit: int, before: str | None = None) -> list[Delivery]:
        if before is not None and parse_message_id(before) == (0, 0):
            # Nothing is older than 0-0, and Redis answers the range "(0-0" with an error, not an empty list.
            return []
        try:
            await self._discover()
            entries = await self.redis.xrevrange(log_key(room), f"({before}" if before else "+", "-", count=limit)
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        return _deliveries(room, entries)[::-1]

    async def read_after(self, room: str, position: MessageId | None, *, max_messages: int, max_bytes: int) -> LogRead:
        key = log_key(room)
        deliveries: list[Delivery] = []
        size = 0
        cursor = None if position is None else f"{position[0]}-{position[1]}"
        first_page = True
        while True:
            count = min(LOG_PAGE, max_messages - len(deliveries) + 1)
            try:
                # One transaction: the position checked is the one the page continues from, so a trim between
                # the two cannot leave a hole.
                await self._discover()
                async with self.redis.pipeline(transaction=True) as pipe:
                    if cursor is not None:
                        pipe.xrange(key, cursor, cursor, count=1)
                    pipe.xrange(key, "-" if cursor is None else f"({cursor}", "+", count=count)
                    replies = await pipe.execute()
            except REDIS_FAILURES as error:
                raise _unavailable(error) from None
            if cursor is not None and not replies[0]:
                # Not in the log (made up, trimmed, or the room's log is gone): nothing after it can be trusted. On
                # a later page, the last message read was trimmed meanwhile: what was read stands.
                return LogRead(deliveries, found=not first_page, complete=False)
            page = _deliveries(room, replies[-1])
            for delivery in page:
                if len(deliveries) == max_messages or size + len(delivery.frame) > max_bytes:
                    return LogRead(deliveries, found=True, complete=False)
                deliveries.append(delivery)
                size += len(delivery.frame)
            if len(page) < count:
                return LogRead(deliveries, found=True, complete=True)
            last = deliveries[-1].id
            assert last is not None  # read from the log: every delivery has its id
            cursor = f"{last[0]}-{last[1]}"
            first_page = False

    async def charge(self, address: str, size: int, *, new_room: bool) -> QuotaRefusal | None:
        settings = self.settings
        try:
            await self._discover()
            verdict, wait = await self._quota(
                keys=[quota_key(address)],
                args=[
                    size,
                    1 if new_room else 0,
                    settings.address_bytes_per_hour,
                    settings.address_rooms_per_hour,
                    QUOTA_WINDOW_MS,
                ],
            )
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        if verdict == b"ok":
            return None
        return QuotaRefusal(ErrorCode(verdict.decode()), max(1, int(wait)))

    async def _presence_call(
        self, action: str, room: str, entries: Sequence[str], *, after: str | None, limit: int
    ) -> tuple[Online | None, int]:
        settings = self.settings
        page: list[str | int] = [after or "", limit] if action == "page" else []
        try:
            await self._discover()
            names, count, wait = await self._presence_script(
                keys=presence_keys(room),
                args=[
                    action,
                    int(settings.presence_ttl * 1000),
                    settings.presence_list_max,
                    channel_key(room),
                    room,
                    settings.presence_interval_ms,
                    self.sweep_max,
                    *entries,
                    *page,
                ],
            )
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        online = Online([name.decode() for name in names], int(count)) if action in ("join", "page") else None
        return online, int(wait)

    async def subscribe(self, room: str) -> None:
        await self.subscriptions.subscribe(room)

    async def unsubscribe(self, room: str) -> None:
        await self.subscriptions.unsubscribe(room)

    def subscribed(self) -> set[str]:
        return set(self.subscriptions.heard)

    def listen(self, on_subscribed: OnSubscribed) -> AsyncIterator[Delivery]:
        return self.subscriptions.listen(on_subscribed)

    async def migrate(self) -> None:
        """Moves the logs of the key layout before hash tags to the current one, once: each replica runs it at
        start, and a log that is already moved (or was written anew meanwhile) is left alone, with a warning when
        the two would have to be merged. Presence under the old layout expires by itself."""
        moved = kept = 0
        try:
            async for key in self.redis.scan_iter(match=old_log_key("*"), count=1000, _type="stream"):
                room = key.decode()[len("chat:room:") : -len(":log")]
                outcome = await self._migrate(keys=[key, log_key(room)])
                if outcome == 1:
                    moved += 1
                elif outcome == 0:
                    kept += 1
                    log.warning(
                        "room has a log under both key layouts: the old one is kept, not shown",
                        extra={"event": "migrate_conflict", "room": room},
                    )
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        if moved or kept:
            log.info("moved %d room logs to the new key layout", moved, extra={"event": "migrated", "kept": kept})


def _deliveries(room: str, entries: Any) -> list[Delivery]:
    """Stream entries, [(id, {b"b": body}), ...] as redis-py returns them (typed loosely there), as deliveries."""
    return [message_delivery(room, message_id, fields[b"b"]) for message_id, fields in entries]


def _parse_published(data: bytes) -> Delivery:
    """What append.lua and presence.lua publish: "<room>\n<id>\n<body>" for a message, and
    "<room>\n\n<event>\n<name>\n<count>\n<truncated>\n<joined>\n<left>" for a presence event (the lists as
    JSON)."""
    room, message_id, rest = data.split(b"\n", 2)
    if message_id:
        return message_delivery(room.decode(), message_id, rest)
    fields = rest.split(b"\n")
    if len(fields) != 6:
        # "<event>\n<name>\n<count>\n<names>" from a replica of the release before presence deltas: its last
        # change is all it says of the net change, so the event is marked truncated (clients refetch the list).
        last_event, last_name, online_count = (field.decode() for field in fields[:3])
        changed = [last_name]
        frame = (
            presence_frame(last_event, last_name, changed, [], int(online_count), truncated=True)
            if last_event == "join"
            else presence_frame(last_event, last_name, [], changed, int(online_count), truncated=True)
        )
        return Delivery(room.decode(), None, frame)
    event, name, count, truncated, joined, left = fields
    frame = presence_frame(
        event.decode(), name.decode(), orjson.loads(joined), orjson.loads(left), int(count), truncated=truncated == b"1"
    )
    return Delivery(room.decode(), None, frame)


def _unavailable(error: BaseException) -> BrokerUnavailable:
    metrics.REDIS_ERRORS.labels("command").inc()
    # The error's text can hold a host name but never the password; its type is enough for a person.
    return BrokerUnavailable(f"Redis is unavailable ({type(error).__name__})")
