"""The state the replicas share: rooms' logs and the fan-out, presence, and per-address allowances. `open_broker`
picks Redis (REDIS_URL or REDIS_SENTINELS set) or the in-memory twin."""

from __future__ import annotations

from ..config import Settings
from .base import (
    FOREVER,
    Appended,
    Broker,
    BrokerUnavailable,
    ChangeRefused,
    Delivery,
    Log,
    LogRead,
    Moderation,
    ModerationNotice,
    NotConfirmed,
    Online,
    Presence,
    QuotaRefusal,
    Quotas,
    Refused,
    Rules,
    TypingNotice,
    change_delivery,
    message_delivery,
    presence_entry,
)
from .memory import MemoryBroker
from .redis import RedisBroker

__all__ = [
    "FOREVER",
    "Appended",
    "Broker",
    "BrokerUnavailable",
    "ChangeRefused",
    "Delivery",
    "Log",
    "LogRead",
    "MemoryBroker",
    "Moderation",
    "ModerationNotice",
    "NotConfirmed",
    "Online",
    "Presence",
    "QuotaRefusal",
    "Quotas",
    "RedisBroker",
    "Refused",
    "Rules",
    "TypingNotice",
    "change_delivery",
    "message_delivery",
    "open_broker",
    "presence_entry",
]


def open_broker(settings: Settings) -> Broker:
    if settings.uses_redis:
        return RedisBroker(settings)
    return MemoryBroker(settings)
