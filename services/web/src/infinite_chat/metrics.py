"""Prometheus metrics of one replica (served at /metrics, which nginx does not expose).

What happens once per frame written (frames, deliveries, fan-out latency) is counted in plain integers and
turned into metrics only when scraped: prometheus_client's own counters take a lock on every increment, which
showed up in profiles of the send path.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .protocol import ErrorCode, HttpError

CONNECTIONS = Gauge("chat_connections", "Open WebSocket connections on this replica.")
JOINS = Counter("chat_joins", "Successful joins (welcome sent).")
RESUMES = Counter("chat_resumes", "Joins that resumed from a message id still in the log.")
MESSAGES_RECEIVED = Counter("chat_messages_received", "say frames received from clients.")
MESSAGES_ACCEPTED = Counter("chat_messages_accepted", "Messages stored and published.")
MESSAGES_UNCONFIRMED = Counter(
    "chat_messages_unconfirmed",
    "Messages stored on their primary that too few replicas confirmed in time (REDIS_CONFIRM_REPLICAS): the sender "
    "got unavailable.",
)
CHANGES_ACCEPTED = Counter("chat_changes_accepted", "Edits, deletions and reactions stored and published.", ["kind"])
TYPING_PUBLISHED = Counter("chat_typing_published", "Typing notices this replica published (one per room per second).")
MESSAGES_REFUSED = Counter("chat_messages_refused", "Client frames refused, by error code.", ["code"])
SLOW_CONSUMERS = Counter("chat_slow_consumers", "Connections closed because their outbox overflowed.")
SOCKETS_REFUSED = Counter("chat_sockets_refused", "Sockets refused before the upgrade, by reason.", ["reason"])
SEND_PATHS = Counter("chat_send_path", "Connections by the way their frames are written: direct or asgi.", ["path"])
FLOODS = Counter("chat_floods", "Connections closed (1008) for sending more frames than allowed.")
REDIS_ERRORS = Counter("chat_redis_errors", "Redis calls that failed, by kind.", ["kind"])
REDIS_RECONNECTS = Counter("chat_redis_reconnects", "Times the fan-out subscription was lost and retried.")
# Follows this replica's rooms, not the whole chat's traffic: each replica hears only the rooms it has members in.
FANOUT_RECEIVED = Counter("chat_fanout_received", "Messages and presence events this replica heard from Redis.")
# Labelled series exist only once used, and rate() cannot see a series' first increment: start the usual ones at 0
# so that a first error shows up in graphs and alerts. Codes not listed here (protocol.md) appear on first use.
for _kind in ("command", "subscribe"):
    REDIS_ERRORS.labels(_kind)
for _code in ErrorCode:
    MESSAGES_REFUSED.labels(_code)
SOCKETS_REFUSED.labels(HttpError.TOO_MANY_SOCKETS)
for _path in ("direct", "asgi"):
    SEND_PATHS.labels(_path)

OUTBOX_MESSAGES = Gauge("chat_outbox_messages", "Objects waiting in all outboxes of this replica.")
OUTBOX_MAX = Gauge("chat_outbox_max_messages", "Objects waiting in the fullest outbox of this replica.")
OUTBOX_BYTES = Gauge("chat_outbox_bytes", "Bytes of frames waiting in all outboxes of this replica.")
OUTBOX_MAX_BYTES = Gauge("chat_outbox_max_bytes", "Bytes of frames waiting in the fullest outbox of this replica.")

LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SendPath:
    """Counters of the send path, updated without locks (one event loop per replica)."""

    def __init__(self) -> None:
        self.frames = 0
        self.deliveries = 0
        self.latency_buckets = [0] * (len(LATENCY_BOUNDS) + 1)
        self.latency_sum = 0.0

    def wrote(self, objects: int, oldest_latency: float | None) -> None:
        self.frames += 1
        self.deliveries += objects
        if oldest_latency is not None:
            self.latency_buckets[bisect_left(LATENCY_BOUNDS, oldest_latency)] += 1
            self.latency_sum += oldest_latency


SEND_PATH = SendPath()


class _SendPathCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "chat_frames_sent", "WebSocket frames written (one frame may carry several objects).", SEND_PATH.frames
        )
        yield CounterMetricFamily(
            "chat_deliveries", "Objects (messages, presence, replies) written to client sockets.", SEND_PATH.deliveries
        )
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BOUNDS, float("inf")), SEND_PATH.latency_buckets, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            "chat_fanout_latency_seconds",
            "From a message's acceptance by Redis to the write of the frame carrying it (oldest message per frame).",
            buckets=buckets,
            sum_value=SEND_PATH.latency_sum,
        )


REGISTRY.register(_SendPathCollector())


def watch_outboxes(
    total: Callable[[], float],
    largest: Callable[[], float],
    total_bytes: Callable[[], float],
    largest_bytes: Callable[[], float],
) -> None:
    """Outbox depth is read when scraped rather than counted on every delivery (the hot path)."""
    OUTBOX_MESSAGES.set_function(total)
    OUTBOX_MAX.set_function(largest)
    OUTBOX_BYTES.set_function(total_bytes)
    OUTBOX_MAX_BYTES.set_function(largest_bytes)
