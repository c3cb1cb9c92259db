"""The one module that talks to Redis: each room's log, who is online, and the fan-out channel every replica hears.

Design (docs/architecture.md): a message is appended to its room's stream and published on one channel in a
single Lua script, so it is stored before anyone sees it and every replica hears messages in log order. Every
replica subscribes once to that channel; after a lost subscription it reads the log from the last id it had, so
an outage loses nothing. `MemoryBroker` is the in-memory twin: one replica and no Redis, for `python -m
infinite_chat` and unit tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import orjson
import redis.asyncio as redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from . import metrics
from .config import Settings
from .protocol import MessageId, parse_message_id

CHANNEL = "chat:fanout"
log = logging.getLogger(__name__)


def log_key(room: str) -> str:
    return f"chat:room:{room}:log"


def online_key(room: str) -> str:
    return f"chat:room:{room}:online"


class BrokerUnavailable(Exception):
    """Redis could not be reached or did not answer in time: nothing was stored, the caller may retry."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One object for the clients of a room: a message (with its id) or a presence event (id None).

    It is built once per replica and the same instance sits in every recipient's outbox.
    """

    room: str
    id: MessageId | None
    frame: bytes  # UTF-8 JSON, encoded once


@dataclass(frozen=True, slots=True)
class Online:
    names: list[str]
    count: int


def message_frame(message_id: str, body: bytes) -> bytes:
    """A message object from its stream id and its stored body; its time is the id's, i.e. Redis's clock."""
    millis = int(message_id.partition("-")[0])
    seconds, millis = divmod(millis, 1000)
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f'{{"type":"message","id":"{message_id}","ts":"{ts}.{millis:03d}Z",'.encode() + body


def message_delivery(room: str, message_id: str | bytes, body: bytes) -> Delivery:
    if isinstance(message_id, bytes):
        message_id = message_id.decode()
    return Delivery(room, parse_message_id(message_id), message_frame(message_id, body))


def presence_entry(connection_id: str, name: str) -> str:
    return f"{connection_id}|{name}"


OnSubscribed = Callable[[], Awaitable[None]]


class Broker(ABC):
    """What a replica needs from the shared state; every method raises BrokerUnavailable when it cannot answer."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> None: ...

    @abstractmethod
    async def append(self, room: str, body: bytes) -> str:
        """Stores a message and publishes it; returns its id."""

    @abstractmethod
    async def recent(self, room: str, limit: int, before: str | None = None) -> list[Delivery]:
        """Up to `limit` messages older than `before` (or the newest), oldest first."""

    @abstractmethod
    async def after(self, room: str, since: str) -> list[Delivery] | None:
        """Every message after `since`, oldest first; None when `since` is not in the retained log."""

    @abstractmethod
    async def gap(self, room: str, since: MessageId | None) -> list[Delivery]:
        """Every retained message after `since` (all of them for None), oldest first."""

    @abstractmethod
    async def join(self, room: str, entry: str) -> Online: ...

    @abstractmethod
    async def leave(self, room: str, entry: str) -> None: ...

    @abstractmethod
    async def refresh(self, room: str, entries: Sequence[str]) -> None:
        """Renews these connections' presence, and lets names whose replica died leave."""

    @abstractmethod
    def listen(self, on_subscribed: OnSubscribed) -> AsyncIterator[Delivery]:
        """Everything published, in order, forever. After each (re)subscription and before the next delivery it
        awaits `on_subscribed`, which is where a replica fetches what it missed."""


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
        self.settings = settings
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
        self._append = self.redis.register_script(_script("append.lua"))
        self._presence = self.redis.register_script(_script("presence.lua"))
        self._idle_seconds = settings.room_idle_days * 86_400

    async def close(self) -> None:
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
                args=[body, self.settings.retain, CHANNEL, room, self._idle_seconds],
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

    async def after(self, room: str, since: str) -> list[Delivery] | None:
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xrange(log_key(room), since, since, count=1)
                pipe.xrange(log_key(room), f"({since}", "+")
                found, entries = await pipe.execute()
        except (RedisError, OSError) as error:
            raise _unavailable(error) from None
        if not found:
            return None
        return _deliveries(room, entries)

    async def gap(self, room: str, since: MessageId | None) -> list[Delivery]:
        start = "-" if since is None else f"({since[0]}-{since[1]}"
        try:
            entries = await self.redis.xrange(log_key(room), start, "+")
        except (RedisError, OSError) as error:
            raise _unavailable(error) from None
        return _deliveries(room, entries)

    async def join(self, room: str, entry: str) -> Online:
        names, count = await self._presence_call("join", room, [entry])
        return Online(names, count)

    async def leave(self, room: str, entry: str) -> None:
        await self._presence_call("leave", room, [entry])

    async def refresh(self, room: str, entries: Sequence[str]) -> None:
        await self._presence_call("refresh", room, entries)

    async def _presence_call(self, action: str, room: str, entries: Sequence[str]) -> tuple[list[str], int]:
        settings = self.settings
        try:
            names_json, count = await self._presence(
                keys=[online_key(room)],
                args=[
                    action,
                    int(settings.presence_ttl * 1000),
                    settings.presence_list_max,
                    CHANNEL,
                    room,
                    *entries,
                ],
            )
        except (RedisError, OSError) as error:
            raise _unavailable(error) from None
        names: list[str] = orjson.loads(names_json)
        return names, int(count)

    async def listen(self, on_subscribed: OnSubscribed) -> AsyncIterator[Delivery]:
        backoff = Backoff()
        while True:
            pubsub = self.listener.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                # Only once Redis confirms the subscription is nothing published lost: then catch up on the log.
                while (await pubsub.get_message(timeout=5.0)) is None:
                    pass
                # A command that finished on the old server just as it went away may have put its connection back.
                await self._drop_idle_connections()
                await on_subscribed()
                backoff.reset()
                log.info("fan-out subscribed", extra={"event": "redis_subscribed"})
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        yield _parse_published(message["data"])
            except (RedisError, OSError, BrokerUnavailable) as error:
                metrics.REDIS_ERRORS.labels("subscribe").inc()
                log.warning("fan-out subscription lost: %s", type(error).__name__, extra={"event": "redis_lost"})
                await self._drop_idle_connections()
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            metrics.REDIS_RECONNECTS.inc()
            await asyncio.sleep(backoff.next_delay())

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
    room, message_id, rest = data.split(b"\n", 2)
    if message_id:
        return message_delivery(room.decode(), message_id, rest)
    return Delivery(room.decode(), None, rest)


def _unavailable(error: BaseException) -> BrokerUnavailable:
    metrics.REDIS_ERRORS.labels("command").inc()
    # The error's text can hold a host name but never the password; its type is enough for a person.
    return BrokerUnavailable(f"Redis is unavailable ({type(error).__name__})")


class MemoryBroker(Broker):
    """The twin for one replica without Redis: the same behaviour, nothing shared, nothing kept on restart."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._logs: dict[str, list[tuple[MessageId, str, bytes]]] = {}
        self._online: dict[str, dict[str, float]] = {}
        self._listeners: set[asyncio.Queue[Delivery]] = set()
        self._last: MessageId = (0, 0)

    async def close(self) -> None:
        pass

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

    async def after(self, room: str, since: str) -> list[Delivery] | None:
        entries = self._logs.get(room, [])
        for index, (_, message_id, _) in enumerate(entries):
            if message_id == since:
                return [message_delivery(room, later_id, body) for _, later_id, body in entries[index + 1 :]]
        return None

    async def gap(self, room: str, since: MessageId | None) -> list[Delivery]:
        return [
            message_delivery(room, message_id, body)
            for key, message_id, body in self._logs.get(room, [])
            if since is None or key > since
        ]

    async def join(self, room: str, entry: str) -> Online:
        await self._change(room, [entry], add=True)
        return self._names(room)

    async def leave(self, room: str, entry: str) -> None:
        await self._change(room, [entry], add=False)

    async def refresh(self, room: str, entries: Sequence[str]) -> None:
        await self._change(room, entries, add=True)

    async def _change(self, room: str, entries: Sequence[str], *, add: bool) -> None:
        online = self._online.setdefault(room, {})
        now = time.monotonic()
        for entry, expiry in list(online.items()):
            if expiry <= now:
                del online[entry]
                self._announce_if_changed(room, "leave", entry)
        for entry in entries:
            if add:
                was_new = entry not in online
                online[entry] = now + self.settings.presence_ttl
                if was_new and self._count_name(room, entry) == 1:
                    self._announce(room, "join", entry)
            elif online.pop(entry, None) is not None:
                self._announce_if_changed(room, "leave", entry)

    def _count_name(self, room: str, entry: str) -> int:
        name = entry.partition("|")[2]
        return sum(1 for other in self._online.get(room, {}) if other.partition("|")[2] == name)

    def _announce_if_changed(self, room: str, event: str, entry: str) -> None:
        if self._count_name(room, entry) == 0:
            self._announce(room, event, entry)

    def _announce(self, room: str, event: str, entry: str) -> None:
        online = self._names(room)
        # The same object presence.lua writes.
        frame = orjson.dumps(
            {
                "type": "presence",
                "event": event,
                "name": entry.partition("|")[2],
                "online": online.names,
                "online_count": online.count,
            }
        )
        self._publish(Delivery(room, None, frame))

    def _names(self, room: str) -> Online:
        names = sorted({entry.partition("|")[2] for entry in self._online.get(room, {})})
        return Online(names[: self.settings.presence_list_max], len(names))

    def _publish(self, delivery: Delivery) -> None:
        for queue in self._listeners:
            queue.put_nowait(delivery)

    async def listen(self, on_subscribed: OnSubscribed) -> AsyncIterator[Delivery]:
        queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._listeners.add(queue)
        try:
            await on_subscribed()
            while True:
                yield await queue.get()
        finally:
            self._listeners.discard(queue)


def open_broker(settings: Settings) -> Broker:
    if settings.redis_url:
        return RedisBroker(settings)
    return MemoryBroker(settings)
