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
import math
import random
import ssl
import time
from abc import ABC, abstractmethod
from bisect import bisect_left
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


def presence_key(room: str) -> str:
    """When the room's last presence event went out, and the change waiting for the next one (if any)."""
    return f"chat:room:{room}:presence"


def quota_key(address: str) -> str:
    return f"chat:address:{address}:quota"


# Entries read from a log per round trip: a bounded reply (at most about 900 KB of the largest messages) however
# far a reader is behind, so that no read makes Redis hold a large output buffer.
LOG_PAGE = 100
# The window over which an address's allowance of bytes and new rooms refills.
QUOTA_WINDOW_MS = 3_600_000


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


@dataclass(frozen=True, slots=True)
class LogRead:
    """Messages after a position in a room's log, read within a bound."""

    deliveries: list[Delivery]
    # The position is in the retained log (always, when reading from the start): else nothing was read.
    found: bool
    # Every retained message after the position is in `deliveries`; False when the bound was reached first.
    complete: bool


@dataclass(frozen=True, slots=True)
class QuotaRefusal:
    """Why an address may not add a message now, and when it may again."""

    code: str  # "quota_exceeded" (bytes) or "too_many_rooms"
    retry_after_ms: int


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

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._presence_timers: dict[str, asyncio.TimerHandle] = {}
        self._presence_flushes: set[asyncio.Task[None]] = set()

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
    async def read_after(self, room: str, position: MessageId | None, *, max_messages: int, max_bytes: int) -> LogRead:
        """The messages after the one with id `position` (from the start for None), oldest first, at most
        `max_messages` of them and `max_bytes` of frames. Read in pages of LOG_PAGE, each checking first that the
        position it continues from is still in the log, so nothing is read after an id that is not there."""

    @abstractmethod
    async def charge(self, address: str, size: int, *, new_room: bool) -> QuotaRefusal | None:
        """Takes `size` bytes (and a room, when the message creates one) from the address's hourly allowance,
        shared by every replica; a refusal takes nothing."""

    async def join(self, room: str, entry: str) -> Online:
        return await self._presence("join", room, [entry])

    async def leave(self, room: str, entry: str) -> None:
        await self._presence("leave", room, [entry])

    async def refresh(self, room: str, entries: Sequence[str]) -> None:
        """Renews these connections' presence, and lets names whose replica died leave."""
        await self._presence("refresh", room, entries)

    @abstractmethod
    async def _presence_call(self, action: str, room: str, entries: Sequence[str]) -> tuple[Online, int]:
        """One change of presence (or "flush"): the room's names after it, and the milliseconds until a change
        that had to wait for the room's presence interval is due to be published (0 when none waits)."""

    async def _presence(self, action: str, room: str, entries: Sequence[str]) -> Online:
        online, wait_ms = await self._presence_call(action, room, entries)
        if wait_ms > 0:
            self._flush_presence_later(room, wait_ms)
        return online

    def _flush_presence_later(self, room: str, wait_ms: int) -> None:
        """Coalesced changes are published by whichever replica asks first once they are due; this one asks when
        its own change is. If it dies first, the next renewal in the room (any replica's) publishes them."""
        timers = self._presence_timers
        if room in timers:
            return
        loop = asyncio.get_running_loop()
        timers[room] = loop.call_later(wait_ms / 1000, self._flush_presence_now, room)

    def _flush_presence_now(self, room: str) -> None:
        self._presence_timers.pop(room, None)
        task = asyncio.get_running_loop().create_task(self._flush_presence(room))
        self._presence_flushes.add(task)
        task.add_done_callback(self._presence_flushes.discard)

    async def _flush_presence(self, room: str) -> None:
        with contextlib.suppress(BrokerUnavailable):
            await self._presence("flush", room, [])

    def _stop_presence_flushes(self) -> None:
        for timer in self._presence_timers.values():
            timer.cancel()
        self._presence_timers.clear()
        for task in self._presence_flushes:
            task.cancel()

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
        self._append = self.redis.register_script(_script("append.lua"))
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
        return QuotaRefusal(verdict.decode(), max(1, int(wait)))

    async def _presence_call(self, action: str, room: str, entries: Sequence[str]) -> tuple[Online, int]:
        settings = self.settings
        try:
            names_json, count, wait = await self._presence_script(
                keys=[online_key(room), presence_key(room)],
                args=[
                    action,
                    int(settings.presence_ttl * 1000),
                    settings.presence_list_max,
                    CHANNEL,
                    room,
                    settings.presence_interval_ms,
                    *entries,
                ],
            )
        except (RedisError, OSError) as error:
            raise _unavailable(error) from None
        names: list[str] = orjson.loads(names_json)
        return Online(names, int(count)), int(wait)

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


@dataclass(slots=True)
class _PresenceEvents:
    """What presence.lua keeps in a room's presence hash: when its last event went out, and the change waiting."""

    at: float = float("-inf")
    due: bool = False
    event: str = ""
    name: str = ""


@dataclass(slots=True)
class _Allowance:
    """What quota.lua keeps per address: bytes and rooms left, as of `at` (seconds)."""

    size: float
    rooms: float
    at: float


class MemoryBroker(Broker):
    """The twin for one replica without Redis: the same behaviour, nothing shared, nothing kept on restart."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._logs: dict[str, list[tuple[MessageId, str, bytes]]] = {}
        self._online: dict[str, dict[str, float]] = {}
        self._events: dict[str, _PresenceEvents] = {}
        self._allowances: dict[str, _Allowance] = {}
        self._listeners: set[asyncio.Queue[Delivery]] = set()
        self._last: MessageId = (0, 0)

    async def close(self) -> None:
        self._stop_presence_flushes()

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

    async def read_after(self, room: str, position: MessageId | None, *, max_messages: int, max_bytes: int) -> LogRead:
        entries = self._logs.get(room, [])
        start = 0
        if position is not None:
            keys = [key for key, _, _ in entries]
            start = bisect_left(keys, position)
            if start == len(keys) or keys[start] != position:
                return LogRead([], found=False, complete=False)
            start += 1
        deliveries: list[Delivery] = []
        size = 0
        for _, message_id, body in entries[start:]:
            delivery = message_delivery(room, message_id, body)
            if len(deliveries) == max_messages or size + len(delivery.frame) > max_bytes:
                return LogRead(deliveries, found=True, complete=False)
            deliveries.append(delivery)
            size += len(delivery.frame)
        return LogRead(deliveries, found=True, complete=True)

    async def charge(self, address: str, size: int, *, new_room: bool) -> QuotaRefusal | None:
        # quota.lua, in Python: a bucket per address that refills over QUOTA_WINDOW_MS.
        settings = self.settings
        window = QUOTA_WINDOW_MS / 1000
        size_cap, rooms_cap = float(settings.address_bytes_per_hour), float(settings.address_rooms_per_hour)
        now = time.monotonic()
        left = self._allowances.get(address)
        if left is None or now - left.at >= window:
            left = _Allowance(size_cap, rooms_cap, now)
        else:
            elapsed = now - left.at
            left = _Allowance(
                min(size_cap, left.size + elapsed * size_cap / window),
                min(rooms_cap, left.rooms + elapsed * rooms_cap / window),
                now,
            )
        if new_room and left.rooms < 1:
            return QuotaRefusal("too_many_rooms", max(1, math.ceil((1 - left.rooms) * window * 1000 / rooms_cap)))
        if left.size < size:
            return QuotaRefusal("quota_exceeded", max(1, math.ceil((size - left.size) * window * 1000 / size_cap)))
        left.size -= size
        if new_room:
            left.rooms -= 1
        self._allowances[address] = left
        return None

    async def _presence_call(self, action: str, room: str, entries: Sequence[str]) -> tuple[Online, int]:
        # presence.lua, in Python: the same changes, the same events, the same coalescing.
        online = self._online.setdefault(room, {})
        now = time.monotonic()
        change: tuple[str, str] | None = None
        expired = [entry for entry, expiry in online.items() if expiry <= now]
        for entry in expired:
            del online[entry]
        for entry in expired:
            if self._count_name(room, entry) == 0:
                change = ("leave", _name_of(entry))
        for entry in entries:
            if action in ("join", "refresh"):
                was_new = entry not in online
                online[entry] = now + self.settings.presence_ttl
                if was_new and self._count_name(room, entry) == 1:
                    change = ("join", _name_of(entry))
            elif action == "leave" and online.pop(entry, None) is not None and self._count_name(room, entry) == 0:
                change = ("leave", _name_of(entry))
        events = self._events.setdefault(room, _PresenceEvents())
        if change is not None:
            events.due, (events.event, events.name) = True, change
        wait_ms = 0
        if events.due:
            interval = self.settings.presence_interval_ms / 1000
            if now - events.at >= interval:
                self._announce(room, events.event, events.name)
                events.at, events.due = now, False
            else:
                wait_ms = max(1, math.ceil((events.at + interval - now) * 1000))
        return self._names(room), wait_ms

    def _count_name(self, room: str, entry: str) -> int:
        name = _name_of(entry)
        return sum(1 for other in self._online.get(room, {}) if _name_of(other) == name)

    def _announce(self, room: str, event: str, name: str) -> None:
        online = self._names(room)
        # The same object presence.lua writes.
        frame = orjson.dumps(
            {"type": "presence", "event": event, "name": name, "online": online.names, "online_count": online.count}
        )
        self._publish(Delivery(room, None, frame))

    def _names(self, room: str) -> Online:
        names = sorted({_name_of(entry) for entry in self._online.get(room, {})})
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


def _name_of(entry: str) -> str:
    return entry.partition("|")[2]


def open_broker(settings: Settings) -> Broker:
    if settings.redis_url:
        return RedisBroker(settings)
    return MemoryBroker(settings)
