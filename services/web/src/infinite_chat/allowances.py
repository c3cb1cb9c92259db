"""What each client address may still add to Redis, as this replica sees it: slices of the address's hourly
allowance, taken from Redis (the broker's `charge`, shared by every replica) and spent here message by message.

Charging Redis for every message cost a round trip per `say`, which measured about a tenth of a replica's CPU
at the benchmark's highest load. A slice of 1/64 of the hour's bytes (at most 64 KiB) covers hundreds of ordinary
messages, so one address costs Redis about one call per slice per replica. The price is precision: an address
talking through N replicas can hold N slices not yet spent, and a slice left unused for a minute is given up.
Creating a room is charged to Redis every time: it is rare, and its count is small.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .broker import Broker, QuotaRefusal

SLICE_MAX_BYTES = 64 * 1024
SLICE_SECONDS = 60.0
# Past this many addresses, slices that have expired are dropped: the table holds the addresses talking now.
TABLE_PRUNE_AT = 4096


@dataclass(slots=True)
class _Slice:
    left: int
    until: float


class Allowances:
    def __init__(self, broker: Broker, bytes_per_hour: int) -> None:
        self.broker = broker
        self.slice = max(1, min(SLICE_MAX_BYTES, bytes_per_hour // 64))
        self._slices: dict[str, _Slice] = {}

    async def take(self, address: str, size: int, *, new_room: bool) -> QuotaRefusal | None:
        """Takes `size` bytes (and a room) from the address's allowance; a refusal takes nothing."""
        if new_room:
            return await self.broker.charge(address, size, new_room=True)
        now = time.monotonic()
        held = self._slices.get(address)
        if held is not None and held.until > now and held.left >= size:
            held.left -= size
            return None
        amount = max(self.slice, size)
        if await self.broker.charge(address, amount, new_room=False) is None:
            self._keep(address, amount - size)
            return None
        # Not a whole slice left this hour: perhaps this one message still fits.
        return await self.broker.charge(address, size, new_room=False)

    def _keep(self, address: str, left: int) -> None:
        """Adds a new slice's rest to what is held: several messages of one address may have asked for a slice at
        once, and none of what they got may be lost."""
        slices = self._slices
        now = time.monotonic()
        held = slices.get(address)
        if held is not None and held.until > now:
            held.left += left
            held.until = now + SLICE_SECONDS
            return
        if len(slices) >= TABLE_PRUNE_AT:
            for stale in [key for key, kept in slices.items() if kept.until <= now]:
                del slices[stale]
        slices[address] = _Slice(left, now + SLICE_SECONDS)
