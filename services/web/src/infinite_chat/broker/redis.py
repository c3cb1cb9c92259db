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
import time
from collections.abc import AsyncIterator, Sequence
from importlib.resources import files
from typing import Any

import orjson
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import BlockingConnectionPool, Connection, SSLConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, NoScriptError
from redis.retry import Retry

from .. import metrics
from ..config import Settings
from ..names import Claim
from ..protocol import (
    REACTIONS_PER_MESSAGE,
    Change,
    Changes,
    ErrorCode,
    MessageId,
    message_as_now,
    parse_message_id,
    presence_frame,
)
from .base import (
    AUDIT_RETAIN,
    FOREVER,
    LOG_PAGE,
    QUOTA_WINDOW_MS,
    RECENT_SCAN,
    Appended,
    Broker,
    BrokerUnavailable,
    ChangeRefused,
    Delivery,
    LogRead,
    ModerationNotice,
    NotConfirmed,
    Online,
    OnSubscribed,
    QuotaRefusal,
    Refused,
    Rules,
    TypingNotice,
    change_delivery,
    message_delivery,
)
from .confirmations import Confirmed
from .keys import (
    AUDIT_KEY,
    BANS_KEY,
    changes_keys,
    channel_key,
    confirmed_key,
    log_key,
    name_key,
    name_quota_key,
    old_log_key,
    presence_keys,
    quota_key,
    retry_field,
    retry_keys,
    rules_keys,
)
from .subscriptions import REDIS_FAILURES, ClusterTopology, OneServer, Subscriptions, Topology

log = logging.getLogger(__name__)


def _script(name: str) -> str:
    return files(__package__).joinpath("lua", name).read_text(encoding="utf-8")


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (connections go to whichever node Sentinel names the primary) that waits for a free
    connection at its limit, as the standalone pool does, instead of failing the command."""


class RedisBroker(Broker):
    def __init__(self, settings: Settings) -> None:
        assert settings.uses_redis
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
        tls = bool(settings.redis_url and settings.redis_url.startswith("rediss://"))
        if tls:
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
            if settings.redis_ca_file:
                options["ssl_ca_certs"] = settings.redis_ca_file
        self._cluster_topology: ClusterTopology | None = None
        # The subscriptions wait for messages indefinitely: connections of their own, without a read timeout.
        listening = {**options, "socket_timeout": None, "health_check_interval": 15}
        topology: Topology
        self._sentinel: Sentinel | None = None
        self.redis: redis.Redis | RedisCluster
        if settings.redis_sentinels:
            # The primary is whichever node the Sentinels name now: each new connection asks them, and a command on a
            # demoted primary (READONLY) drops its connection, so the next one goes to the new primary.
            sentinel = self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(settings.redis_sentinels),
                sentinel_kwargs={
                    "password": settings.redis_password.reveal() or None,
                    "socket_connect_timeout": 2.0,
                    "socket_timeout": 2.0,
                },
                **options,
            )
            master = settings.redis_sentinel_master
            primary: redis.Redis = sentinel.master_for(
                master,
                connection_pool_class=_BlockingSentinelPool,
                max_connections=64,
                timeout=5,
                socket_timeout=5.0,
                health_check_interval=15,
            )
            self.redis = primary
            listener = sentinel.master_for(master, max_connections=2, **listening)
            topology = OneServer(primary, listener)
            self._discovered = True
        elif settings.redis_cluster:
            assert settings.redis_url is not None
            # Any node's URL will do: the client learns the others from it. A node that is down or has failed over
            # answers nothing for its slots, so no full coverage is required: the other nodes' rooms go on.
            cluster = RedisCluster.from_url(
                settings.redis_url,
                require_full_coverage=False,
                max_connections=64,
                socket_timeout=5.0,
                **options,
            )
            self.redis = cluster

            def connect(host: str, port: int) -> redis.Redis:
                return redis.Redis(host=host, port=port, ssl=tls, **listening)

            def command_client(host: str, port: int) -> redis.Redis:
                pool = BlockingConnectionPool(
                    max_connections=64,
                    timeout=5,
                    connection_class=SSLConnection if tls else Connection,
                    host=host,
                    port=port,
                    socket_timeout=5.0,
                    health_check_interval=15,
                    **options,
                )
                return redis.Redis.from_pool(pool)

            topology = ClusterTopology(cluster, connect, command_client)
            self._cluster_topology = topology
            self._discovered = False
            self._discovering = asyncio.Lock()
        else:
            assert settings.redis_url is not None
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
        self._topology = topology
        # Confirmation by replicas (REDIS_CONFIRM_REPLICAS): messages are shown only once confirmed
        # (confirmations.py), and reads of the logs stop at each room's confirmed position.
        self._confirming = settings.redis_confirm_replicas > 0
        self.subscriptions = Subscriptions(topology, _parse_published, holding=self._confirming)
        self._append = self.redis.register_script(_script("append.lua"))
        self._change = self.redis.register_script(_script("change.lua"))
        self._typing = self.redis.register_script(_script("typing.lua"))
        self._confirm = self.redis.register_script(_script("confirm.lua"))
        self._migrate = self.redis.register_script(_script("migrate.lua"))
        self._presence_script = self.redis.register_script(_script("presence.lua"))
        self._quota = self.redis.register_script(_script("quota.lua"))
        self._claim = self.redis.register_script(_script("claim.lua"))
        self._moderation = self.redis.register_script(_script("moderation.lua"))
        self._rules = self.redis.register_script(_script("rules.lua"))
        self._ban = self.redis.register_script(_script("ban.lua"))
        self._release = self.redis.register_script(_script("release.lua"))
        self._idle_seconds = settings.room_idle_days * 86_400

    async def close(self) -> None:
        self._stop_presence_flushes()
        await self.subscriptions.close()
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                await sentinel.aclose()
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

    async def append(
        self, room: str, body: bytes, *, name: str, ref: str | None, folded: str = "", moderator: bool = False
    ) -> Appended:
        settings = self.settings
        keys = [log_key(room), confirmed_key(room), *retry_keys(room), *rules_keys(room)]
        args: list[bytes | str | int] = [
            body,
            settings.retain,
            channel_key(room),
            room,
            self._idle_seconds,
            "" if ref is None else retry_field(name, ref),
            settings.retry_window * 1000,
            1 if self._confirming else 0,
            folded,
            1 if moderator else 0,
        ]
        try:
            await self._discover()
            if self._confirming:
                reply, replicas = await self._run_on_primary(room, self._append, keys, args)
                if reply[0] is not None:
                    await self._confirmed(room, reply[0], replicas)
            else:
                reply = await self._append(keys=keys, args=args)
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        message_id, retried, stored = reply
        if message_id is None:
            raise Refused(ErrorCode(retried.decode()), int(stored))
        message_id = message_id.decode()
        if not retried:
            return Appended(message_id)
        return Appended(message_id, None if stored is None else message_delivery(room, message_id, stored), True)

    async def change(
        self,
        room: str,
        kind: Change,
        target: str,
        body: bytes,
        *,
        name: str,
        emoji: str = "",
        on: bool = True,
        folded: str = "",
        moderator: bool = False,
    ) -> str:
        settings = self.settings
        keys = [log_key(room), confirmed_key(room), *changes_keys(room), rules_keys(room)[0]]
        args: list[bytes | str | int] = [
            kind.value,
            target,
            name,
            body,
            settings.retain,
            channel_key(room),
            room,
            self._idle_seconds,
            1 if self._confirming else 0,
            settings.edit_window * 1000,
            emoji,
            1 if on else 0,
            REACTIONS_PER_MESSAGE,
            folded,
            1 if moderator else 0,
        ]
        try:
            await self._discover()
            if self._confirming:
                reply, replicas = await self._run_on_primary(room, self._change, keys, args)
                if reply[0] is not None:  # made, or as asked already (then the log's newest entry is confirmed)
                    await self._confirmed(room, reply[0], replicas)
            else:
                reply = await self._change(keys=keys, args=args)
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        entry_id, verdict = reply[0], reply[1]
        if verdict == b"muted":
            raise Refused(ErrorCode.MUTED, int(reply[2]))
        if verdict != b"ok":
            raise ChangeRefused(ErrorCode(verdict.decode()))
        return str(entry_id.decode())

    async def publish_typing(self, room: str, names: Sequence[str]) -> None:
        try:
            await self._discover()
            await self._typing(keys=[log_key(room)], args=[channel_key(room), _typing_payload(room, names)])
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None

    async def _run_on_primary(
        self, room: str, script: AsyncScript, keys: list[str], args: list[bytes | str | int]
    ) -> tuple[Any, int]:
        """A script, then WAIT on the same connection (it counts the replicas that have every write that connection
        made): the script's reply and how many replicas have its writes."""
        settings = self.settings
        for attempt in range(3):
            primary = self._primary_for(log_key(room))
            async with primary.pipeline(transaction=False) as pipe:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                pipe.wait(settings.redis_confirm_replicas, settings.redis_confirm_timeout_ms)
                reply, replicas = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError):
                await primary.script_load(script.script)  # not run: a new primary, or Redis restarted
                continue
            if isinstance(reply, AskError) and attempt < 2:  # MovedError too
                await self._topology.refresh()  # not run: the room's slot is elsewhere now
                continue
            if isinstance(reply, BaseException):
                raise reply
            break
        else:
            raise BrokerUnavailable("the script could not be run on the room's primary")  # NOSCRIPT or MOVED again
        if isinstance(replicas, BaseException):
            raise replicas
        return reply, int(replicas)

    async def _confirmed(self, room: str, entry_id: bytes, replicas: int) -> None:
        """Shows the room's log up to this entry (confirm.lua), if enough replicas have it; else NotConfirmed: it
        stays in the log unshown."""
        wanted = self.settings.redis_confirm_replicas
        if replicas < wanted:
            metrics.MESSAGES_UNCONFIRMED.inc()
            raise NotConfirmed(f"{replicas} of {wanted} replicas confirmed the message in time")
        await self._confirm(keys=[confirmed_key(room)], args=[entry_id, channel_key(room), room, self._idle_seconds])

    def _primary_for(self, key: str) -> redis.Redis:
        """The client of the primary that serves this key: on a cluster, one per node (ClusterTopology.commands)."""
        if self._cluster_topology is None:
            assert isinstance(self.redis, redis.Redis)
            return self.redis
        return self._cluster_topology.commands(key)

    async def _visible_end(self, room: str) -> str:
        """Where reads of the room's log stop: its confirmed position when messages are confirmed, else its end."""
        if not self._confirming:
            return "+"
        position = await self.redis.get(confirmed_key(room))
        if position is None:
            return "+"
        return position.decode() if isinstance(position, bytes) else str(position)

    async def recent(self, room: str, limit: int, before: str | None = None) -> list[Delivery]:
        if before is not None and parse_message_id(before) == (0, 0):
            # Nothing is older than 0-0, and Redis answers the range "(0-0" with an error, not an empty list.
            return []
        key = log_key(room)
        messages: list[tuple[bytes, dict[bytes, bytes]]] = []
        try:
            await self._discover()
            end = await self._visible_end(room)
            start = f"({before}" if before else "+"
            if end != "+":
                # The older of the two bounds: the confirmed position (inclusive), or `before` (exclusive).
                confirmed, older_than = parse_message_id(end), parse_message_id(before) if before else None
                if older_than is None or (confirmed is not None and confirmed < older_than):
                    start = end
            # The first page asks for just the messages wanted: with no changes among them, one round trip.
            scanned, count = 0, min(limit, RECENT_SCAN)
            while True:
                entries: Any = await self.redis.xrevrange(key, start, "-", count=count)
                scanned += len(entries)
                messages.extend(entry for entry in entries if b"k" not in entry[1])
                if len(messages) >= limit or len(entries) < count or scanned >= RECENT_SCAN:
                    break
                start = f"({entries[-1][0].decode()}"
                count = min(LOG_PAGE, RECENT_SCAN - scanned)
            messages = messages[:limit][::-1]
            changes = await self._changes(room, messages)
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        return _deliveries(room, messages, changes)

    async def _changes(self, room: str, entries: Sequence[tuple[bytes, dict[bytes, bytes]]]) -> dict[bytes, Changes]:
        """What edits, deletions and reactions made of these entries' messages (change.lua keeps it)."""
        ids = [entry_id for entry_id, fields in entries if b"k" not in fields]
        if not ids:
            return {}
        states: list[Any] = await self.redis.hmget(changes_keys(room)[0], ids)
        return {entry_id: _parse_changes(state) for entry_id, state in zip(ids, states, strict=True) if state}

    async def read_after(self, room: str, position: MessageId | None, *, max_messages: int, max_bytes: int) -> LogRead:
        key = log_key(room)
        deliveries: list[Delivery] = []
        size = 0
        cursor = None if position is None else f"{position[0]}-{position[1]}"
        first_page = True
        try:
            await self._discover()
            end = await self._visible_end(room)
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        while True:
            count = min(LOG_PAGE, max_messages - len(deliveries) + 1)
            try:
                # One transaction: the position checked is the one the page continues from, so a trim between
                # the two cannot leave a hole.
                await self._discover()
                async with self.redis.pipeline(transaction=True) as pipe:
                    if cursor is not None:
                        pipe.xrange(key, cursor, cursor, count=1)
                    pipe.xrange(key, "-" if cursor is None else f"({cursor}", end, count=count)
                    replies = await pipe.execute()
            except REDIS_FAILURES as error:
                raise _unavailable(error) from None
            if cursor is not None and not replies[0]:
                # Not in the log (made up, trimmed, or the room's log is gone): nothing after it can be trusted. On
                # a later page, the last message read was trimmed meanwhile: what was read stands.
                return LogRead(deliveries, found=not first_page, complete=False)
            try:
                page = _deliveries(room, replies[-1], await self._changes(room, replies[-1]))
            except REDIS_FAILURES as error:
                raise _unavailable(error) from None
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

    async def charge(self, address: str, size: int, *, new_room: bool, new_name: bool = False) -> QuotaRefusal | None:
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
                    1 if new_name else 0,
                    settings.address_names_per_hour,
                ],
            )
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        if verdict == b"ok":
            return None
        return QuotaRefusal(ErrorCode(verdict.decode()), max(1, int(wait)))

    async def charge_room_of_name(self, folded: str) -> QuotaRefusal | None:
        try:
            await self._discover()
            verdict, wait = await self._quota(
                keys=[name_quota_key(folded)],
                args=[0, 1, 1, self.settings.name_rooms_per_hour, QUOTA_WINDOW_MS, 0, 1],
            )
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        if verdict == b"ok":
            return None
        return QuotaRefusal(ErrorCode(verdict.decode()), max(1, int(wait)))

    async def claim(self, folded: str, name: str, offered: str, new: str, *, take: bool) -> tuple[Claim, str, int]:
        try:
            await self._discover()
            verdict, held, banned = await self._claim(
                keys=[name_key(folded)],
                args=[offered, new, name, self.settings.name_idle_days * 86_400, 1 if take else 0],
            )
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        return Claim(verdict.decode()), held.decode(), int(banned)

    async def rules(self, room: str, folded: str, name: str) -> Rules:
        try:
            await self._discover()
            found: Any = await self._rules(
                keys=[rules_keys(room)[0], presence_keys(room)[1]], args=[f"b:{folded}", f"m:{folded}", name]
            )
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        banned, muted, slow, sockets, sockets_open = found
        rules = _rules_now(banned, muted, slow)
        return Rules(
            rules.banned_until,
            rules.muted_until,
            rules.slow_seconds,
            int(sockets) if sockets else 0,
            int(sockets_open) if sockets_open else 0,
        )

    async def moderate(self, room: str, rule: str, folded: str, value: int, frame: bytes, *, closes: bool) -> None:
        field = {"mute": f"m:{folded}", "ban": f"b:{folded}", "slow": "slow", "sockets": "sockets"}.get(rule, "")
        payload = f"{room}\n\nmoderation\n{1 if closes else 0}\n{folded}\n".encode() + frame
        try:
            await self._discover()
            await self._moderation(keys=rules_keys(room), args=[field, value, channel_key(room), payload])
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None

    async def ban_everywhere(self, folded: str, until: int) -> None:
        try:
            await self._discover()
            await self._ban(keys=[name_key(folded)], args=[until, self.settings.name_idle_days * 86_400])
            if until != 0:
                now = int(time.time() * 1000)
                await self.redis.zadd(BANS_KEY, {folded: now})
                # Only the last hour's: a replica looks twice a second, and one that was away catches up on joins.
                await self.redis.zremrangebyscore(BANS_KEY, "-inf", now - 3_600_000)
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None

    async def bans_since(self, millis: int) -> list[tuple[str, int]]:
        try:
            await self._discover()
            found: Any = await self.redis.zrangebyscore(BANS_KEY, f"({millis}", "+inf", withscores=True)
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        return [(folded.decode(), int(at)) for folded, at in found]

    async def audit(self, entry: bytes) -> str:
        try:
            await self._discover()
            entry_id: Any = await self.redis.xadd(AUDIT_KEY, {"b": entry}, maxlen=AUDIT_RETAIN, approximate=True)
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        return str(entry_id.decode())

    async def audit_log(self, limit: int, before: str | None) -> list[tuple[str, bytes]]:
        try:
            await self._discover()
            found: Any = await self.redis.xrevrange(AUDIT_KEY, f"({before}" if before else "+", "-", count=limit)
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        return [(entry_id.decode(), fields[b"b"]) for entry_id, fields in found]

    async def release(self, folded: str, offered: str) -> bool:
        try:
            await self._discover()
            released = await self._release(keys=[name_key(folded)], args=[offered])
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        return bool(released)

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

    def listen(self, on_subscribed: OnSubscribed) -> AsyncIterator[Delivery | TypingNotice | ModerationNotice]:
        return self.subscriptions.listen(on_subscribed)

    async def check_policy(self) -> None:
        """Says at start when the confirmation policy does not fit the Redis: waiting for replicas it does not have
        refuses every message; not waiting for the ones it has can lose acknowledged messages in a failover."""
        if isinstance(self.redis, RedisCluster):
            return  # each shard's replicas are the cluster's business; a shard without one refuses its rooms' says
        try:
            info = await self.redis.info("replication")
        except REDIS_FAILURES as error:
            raise _unavailable(error) from None
        replicas, wanted = int(info.get("connected_slaves", 0)), self.settings.redis_confirm_replicas
        if replicas < wanted:
            log.error(
                "REDIS_CONFIRM_REPLICAS=%d but the primary has %d replicas connected: messages are refused until it "
                "has; for a Redis without replicas, set REDIS_CONFIRM_REPLICAS=0 (and appendfsync always)",
                wanted,
                replicas,
                extra={"event": "confirm_impossible"},
            )
        elif wanted == 0 and replicas > 0:
            log.warning(
                "the primary has %d replicas but REDIS_CONFIRM_REPLICAS=0: a failover can lose echoed messages",
                replicas,
                extra={"event": "confirm_off"},
            )

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


def _deliveries(room: str, entries: Any, changes: dict[bytes, Changes]) -> list[Delivery]:
    """Stream entries, [(id, {b"b": body, b"k": change}), ...] as redis-py returns them (typed loosely there), as
    deliveries: messages as their changes left them, and the changes (which have a kind)."""
    deliveries = []
    for entry_id, fields in entries:
        kind = fields.get(b"k")
        if kind is not None:
            deliveries.append(change_delivery(room, entry_id, kind, fields[b"b"]))
            continue
        state = changes.get(entry_id)
        if state is None:
            deliveries.append(message_delivery(room, entry_id, fields[b"b"]))
        else:
            message_id = entry_id.decode()
            deliveries.append(
                Delivery(room, parse_message_id(message_id), message_as_now(message_id, fields[b"b"], state))
            )
    return deliveries


def _parse_changes(state: bytes) -> Changes:
    """A message's state as change.lua keeps it: {"e": edit id, "x": its body, "d": deletion id, "m": moderated,
    "r": reactions}."""
    fields = orjson.loads(state)
    edit_body = fields.get("x")
    return Changes(
        edit_id=fields.get("e"),
        edit_body=None if edit_body is None else edit_body.encode(),
        deleted_id=fields.get("d"),
        reactions=[(emoji, names) for emoji, names in fields.get("r", [])],
        moderated=bool(fields.get("m")),
    )


def _rules_now(banned: bytes | None, muted: bytes | None, slow: bytes | None) -> Rules:
    """A room's rules for a name as stored (until when, in ms; FOREVER), without those that have run out."""
    now = time.time() * 1000

    def holding(until: bytes | None) -> int | None:
        if until is None:
            return None
        value = int(until)
        return value if value == FOREVER or value > now else None

    return Rules(holding(banned), holding(muted), int(slow) if slow else 0)


def _typing_payload(room: str, names: Sequence[str]) -> bytes:
    return f"{room}\n\ntyping\n".encode() + orjson.dumps(list(names))


def _parse_published(data: bytes) -> Delivery | Confirmed | TypingNotice | ModerationNotice:
    """What the scripts publish: "<room>\n<id>\n<body>" for a message (append.lua; a body starts with a quote),
    "<room>\n<id>\n<change>\n<body>" for a change to one (change.lua), "<room>\n\nconfirmed\n<id>" for a
    confirmation, "<room>\n\ntyping\n<names>" for a typing notice, "<room>\n\nmoderation\n<closes: 0 or 1>\n
    <folded name>\n<frame>" for a moderator's rule (moderation.lua), and
    "<room>\n\n<event>\n<name>\n<count>\n<truncated>\n<joined>\n<left>" for a presence event (the lists as
    JSON)."""
    room, message_id, rest = data.split(b"\n", 2)
    if message_id:
        if rest.startswith(b'"'):
            return message_delivery(room.decode(), message_id, rest)
        kind, body = rest.split(b"\n", 1)
        return change_delivery(room.decode(), message_id, kind, body)
    if rest.startswith(b"moderation\n"):
        _, closes, folded, frame = rest.split(b"\n", 3)
        return ModerationNotice(room.decode(), folded.decode(), closes == b"1", frame)
    if rest.startswith(b"typing\n"):
        return TypingNotice(room.decode(), tuple(orjson.loads(rest[len(b"typing\n") :])))
    if rest.startswith(b"confirmed\n"):
        confirmed = parse_message_id(rest[len(b"confirmed\n") :].decode())
        assert confirmed is not None  # confirm.lua publishes a message id
        return Confirmed(room.decode(), confirmed)
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
