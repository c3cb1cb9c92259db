"""The state the replicas share: rooms' logs and the fan-out, presence, and per-address allowances. `open_broker`
picks Redis (REDIS_URL set) or the in-memory twin."""

from __future__ import annotations

from ..config import Settings
from .base import (
    Broker,
    BrokerUnavailable,
    Delivery,
    Log,
    LogRead,
    Online,
    Presence,
    QuotaRefusal,
    Quotas,
    message_delivery,
    presence_entry,
)
from .memory import MemoryBroker
from .redis import RedisBroker

__all__ = [
    "Broker",
    "BrokerUnavailable",
    "Delivery",
    "Log",
    "LogRead",
    "MemoryBroker",
    "Online",
    "Presence",
    "QuotaRefusal",
    "Quotas",
    "RedisBroker",
    "message_delivery",
    "open_broker",
    "presence_entry",
]


def open_broker(settings: Settings) -> Broker:
    if settings.redis_url:
        return RedisBroker(settings)
    return MemoryBroker(settings)
