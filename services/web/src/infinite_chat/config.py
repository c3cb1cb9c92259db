"""Settings of one replica, read once from the environment into a typed object.

This is the only place that reads the environment; everything else receives a `Settings`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .protocol import MESSAGE_MAX_BYTES, NAME_MAX_BYTES


class ConfigError(ValueError):
    """An environment variable has a value this replica cannot run with."""


class Secret:
    """A string that never shows itself in logs, reprs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__


@dataclass(frozen=True)
class Settings:
    replica_name: str = field(default_factory=socket.gethostname)
    port: int = 8000
    # No URL: a single replica with an in-memory broker, for local hacking and unit tests.
    redis_url: str | None = None
    # REDIS_URL names one node of a Redis Cluster (any: the client learns the rest), not a standalone Redis.
    redis_cluster: bool = False
    redis_password: Secret = field(default_factory=lambda: Secret(""))
    # Extra CA for rediss:// (a private CA in tests; ElastiCache certificates chain to public CAs).
    redis_ca_file: str | None = None
    # Sentinels (host, port) that name the primary, instead of REDIS_URL: a primary with replicas that Sentinel fails
    # over (the Compose `ha` profile). REDIS_SENTINEL_MASTER is the name they monitor it under.
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str = "infinite-chat"
    # A message is echoed only once this many replicas of its primary have it (WAIT), so that a failover cannot lose
    # it; past REDIS_CONFIRM_TIMEOUT_MS its sender gets `unavailable` instead. 1 wherever Redis has a replica (the
    # safe default); 0 for a Redis without one, whose durability is its own fsync (appendfsync always).
    redis_confirm_replicas: int = 1
    redis_confirm_timeout_ms: int = 1_000
    # A say retried with the same name and ref within this many seconds is stored once (idempotent retries).
    retry_window: int = 600
    # Seconds after a message during which its sender may edit it (0: no edits).
    edit_window: int = 900
    history_size: int = 25
    retain: int = 10_000
    room_idle_days: int = 30
    rate_limit: float = 5.0
    rate_burst: int = 10
    outbox_limit: int = 1_000
    # The same bound in bytes: what one client that does not read can make its replica hold (the welcome included).
    outbox_limit_bytes: int = 1024 * 1024
    # A resume brings at most this many missed messages, and bytes of them; past either, a fresh history instead
    # (`resumed: false`), so one join costs Redis and the replica a bounded read however long the client was away.
    resume_max_messages: int = 1_000
    resume_max_bytes: int = 512 * 1024
    # Under load, at most one frame per connection per this many milliseconds; when quiet, no wait at all.
    # 10 ms: in interleaved `max` runs it held about 1.4x the deliveries/s of 0 (docs/performance.md), because a
    # frame that carries several messages costs the replica, nginx and the client about what one message does;
    # a lone message after a quiet spell is still written at once.
    coalesce_ms: float = 10.0
    presence_ttl: float = 20.0
    presence_list_max: int = 100
    # At most one presence event per room per this many milliseconds: a burst of joins and leaves becomes one
    # event carrying the state after all of them, so churn cannot multiply the room's traffic.
    presence_interval_ms: int = 1_000
    # Every frame a client sends (say, join, anything else, pings and pongs, fragments) takes one of these tokens;
    # a client that runs out is closed with 1008. Far above what the page sends, far below a flood.
    frame_rate: float = 20.0
    frame_burst: int = 60
    # Per client address (the one nginx or the ALB forwarded): open sockets on one replica, and what the address
    # may add to Redis in an hour: bytes of messages, and rooms it creates (a first message in an empty room).
    sockets_per_address: int = 64
    address_bytes_per_hour: int = 16 * 1024 * 1024
    address_rooms_per_hour: int = 20
    # New names an address may claim in an hour (a join with a name nobody holds), and how long a claim lasts
    # without a join that uses it: what one address can make Redis keep for names is bounded.
    address_names_per_hour: int = 30
    name_idle_days: int = 30
    allowed_origins: frozenset[str] = frozenset()
    ping_interval: float = 20.0
    drain_seconds: float = 1.0
    # A replica stops hearing a room this long after its last member there left: one who reconnects (a reload, a
    # restart of another replica) finds it still subscribed.
    unsubscribe_grace: float = 5.0
    max_frame_bytes: int = 16 * 1024
    log_level: str = "info"

    @property
    def presence_refresh(self) -> float:
        """How often a replica renews its members' presence: a few times per TTL, so one slow beat is harmless."""
        return self.presence_ttl / 4

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        defaults = cls()
        settings = cls(
            replica_name=env.get("REPLICA_NAME") or defaults.replica_name,
            port=_int(env, "PORT", defaults.port, low=1, high=65535),
            redis_url=env.get("REDIS_URL") or None,
            redis_cluster=_choice(env, "REDIS_CLUSTER", "false", {"true", "false"}) == "true",
            redis_password=Secret(_password(env)),
            redis_ca_file=env.get("REDIS_CA_FILE") or None,
            redis_sentinels=_addresses(env, "REDIS_SENTINELS"),
            redis_sentinel_master=env.get("REDIS_SENTINEL_MASTER", "").strip() or defaults.redis_sentinel_master,
            redis_confirm_replicas=_int(env, "REDIS_CONFIRM_REPLICAS", defaults.redis_confirm_replicas, low=0, high=5),
            redis_confirm_timeout_ms=_int(
                env, "REDIS_CONFIRM_TIMEOUT_MS", defaults.redis_confirm_timeout_ms, low=50, high=4_000
            ),
            retry_window=_int(env, "RETRY_WINDOW_SECONDS", defaults.retry_window, low=10, high=86_400),
            edit_window=_int(env, "EDIT_WINDOW_SECONDS", defaults.edit_window, low=0, high=31_536_000),
            history_size=_int(env, "HISTORY_SIZE", defaults.history_size, low=1, high=100),
            retain=_int(env, "RETAIN", defaults.retain, low=100, high=10_000_000),
            room_idle_days=_int(env, "ROOM_IDLE_DAYS", defaults.room_idle_days, low=1, high=3650),
            rate_limit=_float(env, "RATE_LIMIT", defaults.rate_limit, low=0.1, high=10_000),
            rate_burst=_int(env, "RATE_BURST", defaults.rate_burst, low=1, high=100_000),
            outbox_limit=_int(env, "OUTBOX_LIMIT", defaults.outbox_limit, low=10, high=1_000_000),
            outbox_limit_bytes=_int(
                env, "OUTBOX_LIMIT_BYTES", defaults.outbox_limit_bytes, low=64 * 1024, high=1024 * 1024 * 1024
            ),
            resume_max_messages=_int(env, "RESUME_MAX_MESSAGES", defaults.resume_max_messages, low=1, high=1_000_000),
            resume_max_bytes=_int(env, "RESUME_MAX_BYTES", defaults.resume_max_bytes, low=16 * 1024, high=1 << 30),
            coalesce_ms=_float(env, "COALESCE_MS", defaults.coalesce_ms, low=0, high=1000),
            presence_ttl=_float(env, "PRESENCE_TTL", defaults.presence_ttl, low=2, high=3600),
            presence_list_max=_int(env, "PRESENCE_LIST_MAX", defaults.presence_list_max, low=1, high=10_000),
            presence_interval_ms=_int(env, "PRESENCE_INTERVAL_MS", defaults.presence_interval_ms, low=0, high=60_000),
            frame_rate=_float(env, "FRAME_RATE_LIMIT", defaults.frame_rate, low=1, high=100_000),
            frame_burst=_int(env, "FRAME_RATE_BURST", defaults.frame_burst, low=1, high=1_000_000),
            sockets_per_address=_int(env, "SOCKETS_PER_ADDRESS", defaults.sockets_per_address, low=1, high=1_000_000),
            address_bytes_per_hour=_int(
                env, "ADDRESS_BYTES_PER_HOUR", defaults.address_bytes_per_hour, low=1024, high=1 << 40
            ),
            address_rooms_per_hour=_int(
                env, "ADDRESS_ROOMS_PER_HOUR", defaults.address_rooms_per_hour, low=1, high=1_000_000
            ),
            address_names_per_hour=_int(
                env, "ADDRESS_NAMES_PER_HOUR", defaults.address_names_per_hour, low=1, high=1_000_000
            ),
            name_idle_days=_int(env, "NAME_IDLE_DAYS", defaults.name_idle_days, low=1, high=3650),
            allowed_origins=frozenset(
                origin.strip().rstrip("/").lower()
                for origin in env.get("ALLOWED_ORIGINS", "").split(",")
                if origin.strip()
            ),
            ping_interval=_float(env, "PING_INTERVAL", defaults.ping_interval, low=1, high=3600),
            drain_seconds=_float(env, "DRAIN_SECONDS", defaults.drain_seconds, low=0, high=60),
            unsubscribe_grace=_float(env, "UNSUBSCRIBE_GRACE_SECONDS", defaults.unsubscribe_grace, low=0, high=3600),
            max_frame_bytes=_int(env, "MAX_FRAME_BYTES", defaults.max_frame_bytes, low=1024, high=1 << 20),
            log_level=_choice(env, "LOG_LEVEL", defaults.log_level, {"debug", "info", "warning", "error"}),
        )
        settings.check_outbox_holds_a_welcome()
        if settings.redis_url and settings.redis_sentinels:
            raise ConfigError("set REDIS_URL or REDIS_SENTINELS, not both (with Sentinel, it names the primary)")
        if settings.redis_cluster and settings.redis_sentinels:
            raise ConfigError("REDIS_CLUSTER=true takes REDIS_URL; a Redis Cluster fails over without Sentinel")
        return settings

    @property
    def uses_redis(self) -> bool:
        return bool(self.redis_url or self.redis_sentinels)

    def check_outbox_holds_a_welcome(self) -> None:
        """A welcome is written through the outbox like everything else: a bound it could not fit in would cut
        every client off at its join."""
        largest = self.welcome_history_bytes + self.presence_list_max * NAME_MAX_BYTES + 1024
        if self.outbox_limit_bytes < largest:
            raise ConfigError(
                f"OUTBOX_LIMIT_BYTES={self.outbox_limit_bytes} cannot hold a welcome of up to {largest} bytes "
                "(RESUME_MAX_BYTES, or one message of the largest size, plus the online list)"
            )

    @property
    def welcome_history_bytes(self) -> int:
        """The most bytes of messages a welcome's history holds, resumed or not (the newest that fit): a message with
        its reactions can be large, and HISTORY_SIZE of the largest would not fit a sensible outbox."""
        return max(self.resume_max_bytes, MESSAGE_MAX_BYTES)


def _password(env: Mapping[str, str]) -> str:
    # A file (a Compose or Docker secret) wins over the variable, which ECS fills from Secrets Manager or SSM.
    path = env.get("REDIS_PASSWORD_FILE")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ConfigError(f"REDIS_PASSWORD_FILE={path} cannot be read: {error.strerror}") from None
    return env.get("REDIS_PASSWORD", "")


def _addresses(env: Mapping[str, str], name: str) -> tuple[tuple[str, int], ...]:
    """The "host:port,host:port" of a variable, as pairs."""
    addresses = []
    for item in env.get(name, "").split(","):
        host, _, port = item.strip().rpartition(":")
        if not item.strip():
            continue
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{name}: {item.strip()!r} is not host:port")
        addresses.append((host, int(port)))
    return tuple(addresses)


def _int(env: Mapping[str, str], name: str, default: int, *, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is outside {low}..{high}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, low: float, high: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is outside {low}..{high}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: set[str]) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(sorted(choices))}")
    return value
