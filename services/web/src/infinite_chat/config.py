"""Settings of one replica, read once from the environment into a typed object.

This is the only place that reads the environment; everything else receives a `Settings`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .protocol import MESSAGE_MAX_BYTES, NAME_MAX_BYTES

# Where the ALB publishes the public key of each `kid` it signs x-amzn-oidc-data with (AWS's documentation); another
# partition (GovCloud, China) or a test sets AUTH_ALB_KEYS_URL instead.
ALB_KEYS_URL = "https://public-keys.auth.elb.{region}.amazonaws.com/{kid}"
# arn:<partition>:elasticloadbalancing:<region>:<account>:loadbalancer/app/<name>/<id>: the region is the key URL's.
ALB_ARN_PATTERN = re.compile(
    r"arn:aws[a-z-]*:elasticloadbalancing:([a-z0-9-]+):[0-9]{12}:loadbalancer/app/[A-Za-z0-9-]{1,32}/[0-9a-f]{1,32}"
)
REGION_PATTERN = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]")


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
    # Per claimed name, on top of the per-address limits: sockets it may have open in one room (over every replica;
    # a room's moderators may allow more), and rooms it may create in an hour.
    name_sockets: int = 8
    name_rooms_per_hour: int = 10
    allowed_origins: frozenset[str] = frozenset()
    ping_interval: float = 20.0
    drain_seconds: float = 1.0
    # A replica stops hearing a room this long after its last member there left: one who reconnects (a reload, a
    # restart of another replica) finds it still subscribed.
    unsubscribe_grace: float = 5.0
    max_frame_bytes: int = 16 * 1024
    log_level: str = "info"
    # Who may join as whom (docs/sign-in.md): `names` (owned names, nobody signs in), `jwt` (a token from the
    # deployment's identity provider) or `alb` (the ALB signed the person in and says so in x-amzn-oidc-data).
    auth_mode: str = "names"
    # jwt: HS256 with this secret, and/or RS256 and ES256 with the keys of one JWKS, from a file or an https URL.
    auth_jwt_secret: Secret = field(default_factory=lambda: Secret(""))
    auth_jwks_file: str | None = None
    auth_jwks_url: str | None = None
    # jwt: a token must be from this issuer and for this audience, when they are set (they should be).
    auth_issuer: str | None = None
    auth_audience: str | None = None
    # Clock skew allowed between the identity provider (or the ALB) and this replica, for exp, nbf and iat.
    auth_leeway_seconds: int = 30
    # The claim whose value is the person's name in the chat (jwt and alb).
    auth_name_claim: str = "name"
    # A person is a moderator when this claim is this value, or a list holding it; unset, nobody is by claim.
    auth_moderator_claim: str | None = None
    auth_moderator_value: str | None = None
    # alb: the load balancer whose signature counts (its ARN), the region of its keys, and where they are fetched.
    auth_alb_arn: str | None = None
    auth_alb_region: str | None = None
    auth_alb_keys_url: str = ALB_KEYS_URL
    # The SHA-256 (hex) of each moderator token (scripts/moderator-token makes one): a join carrying a token whose
    # hash is here is a moderator's. Hashes, so that the configuration never holds what a moderator shows.
    moderator_tokens: frozenset[str] = frozenset()

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
            name_sockets=_int(env, "NAME_SOCKETS", defaults.name_sockets, low=1, high=10_000),
            name_rooms_per_hour=_int(env, "NAME_ROOMS_PER_HOUR", defaults.name_rooms_per_hour, low=1, high=1_000_000),
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
            auth_mode=_choice(env, "AUTH_MODE", defaults.auth_mode, {"names", "jwt", "alb"}),
            auth_jwt_secret=Secret(_secret(env, "AUTH_JWT_SECRET")),
            auth_jwks_file=env.get("AUTH_JWKS_FILE", "").strip() or None,
            auth_jwks_url=env.get("AUTH_JWKS_URL", "").strip() or None,
            auth_issuer=env.get("AUTH_ISSUER", "").strip() or None,
            auth_audience=env.get("AUTH_AUDIENCE", "").strip() or None,
            auth_leeway_seconds=_int(env, "AUTH_LEEWAY_SECONDS", defaults.auth_leeway_seconds, low=0, high=300),
            auth_name_claim=env.get("AUTH_NAME_CLAIM", "").strip() or defaults.auth_name_claim,
            auth_moderator_claim=env.get("AUTH_MODERATOR_CLAIM", "").strip() or None,
            auth_moderator_value=env.get("AUTH_MODERATOR_VALUE", "").strip() or None,
            auth_alb_arn=env.get("AUTH_ALB_ARN", "").strip() or None,
            auth_alb_region=env.get("AUTH_ALB_REGION", "").strip().lower() or None,
            auth_alb_keys_url=env.get("AUTH_ALB_KEYS_URL", "").strip() or defaults.auth_alb_keys_url,
            moderator_tokens=_token_hashes(_secret(env, "MODERATOR_TOKENS")),
        )
        settings.check_outbox_holds_a_welcome()
        settings.check_sign_in()
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

    def check_sign_in(self) -> None:
        """A signing-in mode without what it needs would refuse every join (or, worse, accept forged ones): the
        replica does not start instead."""
        if (self.auth_moderator_claim is None) != (self.auth_moderator_value is None):
            raise ConfigError("set AUTH_MODERATOR_CLAIM and AUTH_MODERATOR_VALUE together, or neither")
        if self.auth_mode == "jwt":
            if not self.auth_jwt_secret and not (self.auth_jwks_file or self.auth_jwks_url):
                raise ConfigError("AUTH_MODE=jwt needs AUTH_JWT_SECRET (HS256) or AUTH_JWKS_FILE or AUTH_JWKS_URL")
            if self.auth_jwks_file and self.auth_jwks_url:
                raise ConfigError("set AUTH_JWKS_FILE or AUTH_JWKS_URL, not both")
            if self.auth_jwt_secret and len(self.auth_jwt_secret.reveal().encode()) < 32:
                # RFC 7518: an HS256 key at least as long as the hash; a short one can be guessed offline from
                # any token it signed.
                raise ConfigError("AUTH_JWT_SECRET must be at least 32 bytes")
            if self.auth_jwks_url:
                _check_fetch_url("AUTH_JWKS_URL", self.auth_jwks_url)
        if self.auth_mode == "alb":
            if self.auth_alb_arn is None:
                raise ConfigError("AUTH_MODE=alb needs AUTH_ALB_ARN, the ARN of the load balancer that signs people in")
            arn = ALB_ARN_PATTERN.fullmatch(self.auth_alb_arn)
            if arn is None:
                raise ConfigError(f"AUTH_ALB_ARN={self.auth_alb_arn!r} is not the ARN of an application load balancer")
            if self.auth_alb_region is not None and not REGION_PATTERN.fullmatch(self.auth_alb_region):
                raise ConfigError(f"AUTH_ALB_REGION={self.auth_alb_region!r} is not an AWS region")
            if self.auth_alb_region is not None and self.auth_alb_region != arn.group(1):
                raise ConfigError(f"AUTH_ALB_REGION={self.auth_alb_region} is not AUTH_ALB_ARN's region")
            if "{kid}" not in self.auth_alb_keys_url:
                raise ConfigError("AUTH_ALB_KEYS_URL must hold {kid}, where the key's id goes")
            _check_fetch_url("AUTH_ALB_KEYS_URL", self.alb_keys_url_for("00000000-0000-0000-0000-000000000000"))

    @property
    def alb_region(self) -> str:
        """The region of the ALB's keys: AUTH_ALB_REGION, else AUTH_ALB_ARN's."""
        if self.auth_alb_region is not None:
            return self.auth_alb_region
        arn = ALB_ARN_PATTERN.fullmatch(self.auth_alb_arn or "")
        return arn.group(1) if arn is not None else ""

    def alb_keys_url_for(self, kid: str) -> str:
        """Where the ALB's key `kid` is; the caller has checked that `kid` is only letters, digits and dashes."""
        return self.auth_alb_keys_url.replace("{region}", self.alb_region).replace("{kid}", kid)

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


def _token_hashes(raw: str) -> frozenset[str]:
    """Hex SHA-256 digests, separated by commas or whitespace (a file may hold one a line, with # comments)."""
    lines = [line.split("#", 1)[0] for line in raw.splitlines()]
    hashes = frozenset(item.lower() for item in " ".join(lines).replace(",", " ").split())
    for item in hashes:
        if len(item) != 64 or any(char not in "0123456789abcdef" for char in item):
            raise ConfigError(
                "MODERATOR_TOKENS holds SHA-256 digests (64 hex digits each): see scripts/moderator-token"
            )
    return hashes


def _secret(env: Mapping[str, str], name: str) -> str:
    """A secret from NAME, or from the file NAME_FILE (a Docker secret), which wins, as with REDIS_PASSWORD."""
    path = env.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ConfigError(f"{name}_FILE={path} cannot be read: {error.strerror}") from None
    return env.get(name, "").strip()


def _check_fetch_url(name: str, url: str) -> None:
    """Keys are fetched over https only: over plain http anyone on the path could hand the replica their own key.
    The one exception is a server on this host's loopback (the tests'), which nobody on a network can stand in for."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname is not None and _is_loopback(parts.hostname):
        return
    raise ConfigError(f"{name}={url!r} must be an https:// URL (http:// only to 127.0.0.1, ::1 or localhost)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
