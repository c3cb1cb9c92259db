"""The one module that talks to Redis: each room's log (a stream), who is online (a sorted set), each address's
allowance (a hash), and a channel per room.

A message is appended to its room's stream and published on the room's channel in a single Lua script
(lua/append.lua), so it is stored before anyone sees it and every replica hearing the room gets its messages in log
order. A replica subscribes to the channels of the rooms it has members in, all on one connection; after a lost
subscription it reads each room's log from the last id it had, so an outage loses nothing. Every key of a room
carries the room in a hash tag (`chat:{lobby}:log`), so that a room's keys and channel are in one slot.
Key layout: docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import AsyncIterator, Sequence
from importlib.resources import files
from typing import Any

import orjson
import redis.asyncio as redis
from redis.asyncio.client import PubSub
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
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

log = logging.getLogger(__name__)
# The subscription's own channel, on which nothing is published: it keeps the connection subscribed (and so
# watched) while this replica has no room.
LISTENING = "chat:listening"
# How long a join waits for Redis to confirm its room's subscription before it is told the chat is unavailable.
SUBSCRIBE_TIMEOUT = 5.0


def log_key(room: str) -> str:
    return f"chat:{{{room}}}:log"


# A room's presence keys, in the order presence.lua takes them (KEYS[1] to KEYS[6]; docs/architecture.md has the
# layout): its connection entries by expiry, each name's count of them, the names online in order, the change since
# the last event, when each of those changes was made as against the list's reads, and the room's last event.
PRESENCE_PARTS = ("connections", "counts", "names", "changes", "change-reads", "events")


def presence_keys(room: str) -> list[str]:
    return [f"chat:{{{room}}}:presence:{part}" for part in PRESENCE_PARTS]


def channel_key(room: str) -> str:
    return f"chat:{{{room}}}:channel"


def room_of_channel(channel: bytes) -> str:
    return channel.decode()[len("chat:{") : -len("}:channel")]


def old_log_key(room: str) -> str:
    """Where a room's log was before its keys had a hash tag (up to the release with issue 12)."""
    return f"chat:room:{room}:log"


def quota_key(address: str) -> str:
    return f"chat:address:{address}:quota"


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


def _script(name: str) -> str:
    return files(__package__).joinpath("lua", name).read_text(encoding="utf-8")


class RedisBroker(Broker):
    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url is not None
        super().__init__(settings)
        options: dict[str, object] = {
            "password": settings.redis_password.reveal() or None,
            # Frames stay bytes from Redis to the socket: nothing is decoded that is not looked at.
            "decode_responses": False,
            "socket_connect_timeout": 2.0,
            "socket_keepalive": True,
            "health_check_interval": 15,
        }
        if settings.redis_url.startswith("rediss://"):
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
            if settings.redis_ca_file:
                options["ssl_ca_certs"] = settings.redis_ca_file
        # Never retry behind our back: a retried append whose first try did reach Redis would store it twice.
        no_retry = Retry(NoBackoff(), 0)
        pool = redis.BlockingConnectionPool.from_url(
            settings.redis_url, max_connections=64, timeout=5, socket_timeout=5.0, retry=no_retry, **options
        )
        self.redis = redis.Redis.from_pool(pool)
        # The subscriber waits for messages indefinitely: a connection of its own, without a read timeout.
        listener_pool = redis.ConnectionPool.from_url(
            settings.redis_url, max_connections=2, socket_timeout=None, retry=no_retry, **options
        )
        self.listener = redis.Redis.from_pool(listener_pool)
        # Each room asked for, and whether Redis has confirmed its subscription (set) or not yet (a new future).
        self._heard: dict[str, asyncio.Future[None]] = {}
        # The subscription connection while it is up and subscribed; None while it is (re)connecting.
        self._pubsub: PubSub | None = None
        self._append = self.redis.register_script(_script("append.lua"))
        self._migrate = self.redis.register_script(_script("migrate.lua"))
        self._presence_script = self.redis.register_script(_script("presence.lua"))
        self._quota = self.redis.register_script(_script("quota.lua"))
        self._idle_seconds = settings.room_idle_days * 86_400

    async def close(self) -> None:
        self._stop_presence_flushes()
        await self.redis.aclose()
        await self.listener.aclose()

    async def ping(self) -> None:
        try:
            await asyncio.wait_for(self.redis.ping(), 2.0)
        except (RedisError, OSError, TimeoutError) as error:
            raise _unavailable(error) from None

    async def append(self, room: str, body: bytes) -> str:
        try:
            message_id = await self._append(
                keys=[log_key(room)],
                args=[body, self.settings.retain, channel_key(room), room, self._idle_seconds],
            )
        except (RedisError, OSError) as error:
            raise _unavailable(error) from None
        return message_id.decode() if isinstance(message_id, bytes) else str(message_id)

    async def recent(self, room: str, limit: int, before: str | None = None) -> list[Delivery]:
        if before is not None and parse_message_id(before) == (0, 0):
            # Nothing is older than 0-0, and Redis answers the range "(0-0" with an error, not an empty list.
            return []
        try:
            entries = await self.redis.xrevrange(log_key(room), f"({before}" if before else "+", "-", count=limit)
        except (RedisError, OSError) as error:
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
                async with self.redis.pipeline(transaction=True) as pipe:
                    if cursor is not None:
                        pipe.xrange(key, cursor, cursor, count=1)
                    pipe.xrange(key, "-" if cursor is None else f"({cursor}", "+", count=count)
                    replies = await pipe.execute()
            except (RedisError, OSError) as error:
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
        except (RedisError, OSError) as error:
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
        except (RedisError, OSError) as error:
            raise _unavailable(error) from None
        online = Online([name.decode() for name in names], int(count)) if action in ("join", "page") else None
        return online, int(wait)

    async def subscribe(self, room: str) -> None:
        heard = self._heard.get(room)
        if heard is None:
            heard = self._heard[room] = asyncio.get_running_loop().create_future()
            pubsub = self._pubsub
            if pubsub is not None:
                # Confirmed by `listen`, which reads the subscription's replies. If the connection has just gone,
                # `listen` asks again for every room once it is back.
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.subscribe(channel_key(room))
        try:
            await asyncio.wait_for(asyncio.shield(heard), SUBSCRIBE_TIMEOUT)
        except TimeoutError:
            raise BrokerUnavailable("the room's subscription was not confirmed in time") from None

    async def unsubscribe(self, room: str) -> None:
        heard = self._heard.pop(room, None)
        if heard is not None and not heard.done():
            heard.set_exception(BrokerUnavailable("unsubscribed"))
            heard.exception()  # nobody need look: whoever waited has left the room
        pubsub = self._pubsub
        if heard is not None and pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.unsubscribe(channel_key(room))

    def subscribed(self) -> set[str]:
        return set(self._heard)

    async def listen(self, on_subscribed: OnSubscribed) -> AsyncIterator[Delivery]:
        backoff = Backoff()
        while True:
            pubsub = self.listener.pubsub()
            try:
                rooms = list(self._heard)
                waiting = {LISTENING.encode(), *(channel_key(room).encode() for room in rooms)}
                await pubsub.subscribe(*waiting)
                # Read the confirmations, and only then catch up on the logs, so that nothing published is lost.
                # (Redis confirms every channel of one SUBSCRIBE before anything published on them; whatever
                # else comes first is kept for after the catch-up, where it is dropped if the catch-up had it.)
                early: list[Delivery] = []
                while waiting:
                    reply = await pubsub.get_message(timeout=5.0)
                    if reply is None:
                        continue
                    if reply["type"] == "message":
                        early.append(_parse_published(reply["data"]))
                    elif reply["type"] == "subscribe":
                        waiting.discard(reply["channel"])
                        self._confirmed(reply)
                self._pubsub = pubsub
                # Rooms asked for while this connection was being made: ask now (confirmed in the loop below).
                later = [room for room in self._heard if room not in rooms]
                if later:
                    await pubsub.subscribe(*(channel_key(room) for room in later))
                # A command that finished on the old server just as it went away may have put its connection back.
                await self._drop_idle_connections()
                await on_subscribed()
                backoff.reset()
                log.info("fan-out subscribed", extra={"event": "redis_subscribed", "rooms": len(self._heard)})
                for delivery in early:
                    metrics.FANOUT_RECEIVED.inc()
                    yield delivery
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        metrics.FANOUT_RECEIVED.inc()
                        yield _parse_published(message["data"])
                    else:
                        self._confirmed(message)
            except (RedisError, OSError, BrokerUnavailable) as error:
                metrics.REDIS_ERRORS.labels("subscribe").inc()
                log.warning("fan-out subscription lost: %s", type(error).__name__, extra={"event": "redis_lost"})
                await self._drop_idle_connections()
            finally:
                self._pubsub = None
                # Nothing is confirmed any more: joins from now on wait for the next subscription.
                loop = asyncio.get_running_loop()
                for room, heard in self._heard.items():
                    if heard.done():
                        self._heard[room] = loop.create_future()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            metrics.REDIS_RECONNECTS.inc()
            await asyncio.sleep(backoff.next_delay())

    def _confirmed(self, reply: dict[str, Any]) -> None:
        """A subscription reply: the room's joins may read its history now."""
        if reply["type"] != "subscribe" or reply["channel"] == LISTENING.encode():
            return
        heard = self._heard.get(room_of_channel(reply["channel"]))
        if heard is not None and not heard.done():
            heard.set_result(None)

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
        except (RedisError, OSError) as error:
            raise _unavailable(error) from None
        if moved or kept:
            log.info("moved %d room logs to the new key layout", moved, extra={"event": "migrated", "kept": kept})

    async def _drop_idle_connections(self) -> None:
        """Closes the command pool's idle connections: they may lead to a Redis that is gone.

        Redis closing a connection (a restart, a failover, a cut) is not noticed on an idle pooled one: redis-py hands
        it out and the next command on it fails, and with no retry (see __init__) that is one user's message or join
        refused per idle connection, long after Redis is back. The subscription notices at once, so when it is lost
        (and again once it is back) the idle connections go, and the next commands open fresh ones.
        """
        with contextlib.suppress(RedisError, OSError):
            await self.redis.connection_pool.disconnect(inuse_connections=False)


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
