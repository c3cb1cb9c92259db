"""Settings of one replica, read once from the environment into a typed object.

This is the only place that reads the environment; everything else receives a `Settings`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


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
    redis_password: Secret = field(default_factory=lambda: Secret(""))
    # Extra CA for rediss:// (a private CA in tests; ElastiCache certificates chain to public CAs).
    redis_ca_file: str | None = None
    history_size: int = 25
    retain: int = 10_000
    room_idle_days: int = 30
    rate_limit: float = 5.0
    rate_burst: int = 10
    outbox_limit: int = 1_000
    # Under load, at most one frame per connection per this many milliseconds; when quiet, no wait at all.
    # 10 ms: in interleaved `max` runs it held about 1.4x the deliveries/s of 0 (docs/performance.md), because a
    # frame that carries several messages costs the replica, nginx and the client about what one message does;
    # a lone message after a quiet spell is still written at once.
    coalesce_ms: float = 10.0
    presence_ttl: float = 20.0
    presence_list_max: int = 100
    allowed_origins: frozenset[str] = frozenset()
    ping_interval: float = 20.0
    drain_seconds: float = 1.0
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
        return cls(
            replica_name=env.get("REPLICA_NAME") or defaults.replica_name,
            port=_int(env, "PORT", defaults.port, low=1, high=65535),
            redis_url=env.get("REDIS_URL") or None,
            redis_password=Secret(_password(env)),
            redis_ca_file=env.get("REDIS_CA_FILE") or None,
            history_size=_int(env, "HISTORY_SIZE", defaults.history_size, low=1, high=100),
            retain=_int(env, "RETAIN", defaults.retain, low=100, high=10_000_000),
            room_idle_days=_int(env, "ROOM_IDLE_DAYS", defaults.room_idle_days, low=1, high=3650),
            rate_limit=_float(env, "RATE_LIMIT", defaults.rate_limit, low=0.1, high=10_000),
            rate_burst=_int(env, "RATE_BURST", defaults.rate_burst, low=1, high=100_000),
            outbox_limit=_int(env, "OUTBOX_LIMIT", defaults.outbox_limit, low=10, high=1_000_000),
            coalesce_ms=_float(env, "COALESCE_MS", defaults.coalesce_ms, low=0, high=1000),
            presence_ttl=_float(env, "PRESENCE_TTL", defaults.presence_ttl, low=2, high=3600),
            presence_list_max=_int(env, "PRESENCE_LIST_MAX", defaults.presence_list_max, low=1, high=10_000),
            allowed_origins=frozenset(
                origin.strip().rstrip("/").lower()
                for origin in env.get("ALLOWED_ORIGINS", "").split(",")
                if origin.strip()
            ),
            ping_interval=_float(env, "PING_INTERVAL", defaults.ping_interval, low=1, high=3600),
            drain_seconds=_float(env, "DRAIN_SECONDS", defaults.drain_seconds, low=0, high=60),
            max_frame_bytes=_int(env, "MAX_FRAME_BYTES", defaults.max_frame_bytes, low=1024, high=1 << 20),
            log_level=_choice(env, "LOG_LEVEL", defaults.log_level, {"debug", "info", "warning", "error"}),
        )


def _password(env: Mapping[str, str]) -> str:
    # A file (a Compose or Docker secret) wins over the variable, which ECS fills from Secrets Manager or SSM.
    path = env.get("REDIS_PASSWORD_FILE")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ConfigError(f"REDIS_PASSWORD_FILE={path} cannot be read: {error.strerror}") from None
    return env.get("REDIS_PASSWORD", "")


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
