"""Messages held back until their primary's replicas have them (REDIS_CONFIRM_REPLICAS > 0).

A message is published by the append script the moment its primary stores it, before any replica of that primary
has it. A failover then could lose it after clients were shown it. So with confirmation on, each replica holds every
published message until a confirmation (confirm.lua, published after WAIT said enough replicas have it) names it or a
later message of its room: replication keeps the primary's order, so a confirmed message confirms all before it.
What is held when the subscription to its node is lost is dropped; the catch-up after the resubscription reads the
log up to the room's confirmed position instead (RedisBroker reads no further), so nobody is shown a message that a
failover could take back.

A room's held messages are all it has only from its first message heard after the subscription on: one published
before it, after the confirmed position the catch-up read up to, is in neither. So after each subscription a room's
confirmations are caught up from the log (a read from the last message delivered), until one reaches the first
message heard; from then on the held messages follow on without a gap, and are released as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol import MessageId
from .base import Delivery

# Held per room, and in all, at most: past either, the room's held messages are dropped and its next confirmation
# reads them from the log instead, so that a long partition costs the replica bounded memory.
HELD_PER_ROOM = 1_000
HELD_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Confirmed:
    """Every message of the room up to `id` is on enough replicas."""

    room: str
    id: MessageId


class Unconfirmed:
    """The published messages of each room that no confirmation has passed yet, in log order."""

    def __init__(self) -> None:
        self._held: dict[str, list[Delivery]] = {}
        self._bytes = 0
        # Rooms whose held messages follow on from what was delivered: the others' confirmations are caught up from
        # the log (after a subscription, and after holding too much).
        self._gapless: set[str] = set()
        # For a room not gapless yet: the first message heard since its subscription.
        self._first_heard: dict[str, MessageId] = {}

    def hold(self, delivery: Delivery) -> None:
        assert delivery.id is not None  # only messages are held
        if delivery.room not in self._gapless:
            self._first_heard.setdefault(delivery.room, delivery.id)
        held = self._held.setdefault(delivery.room, [])
        if len(held) >= HELD_PER_ROOM or self._bytes + len(delivery.frame) > HELD_BYTES:
            self.drop([delivery.room])
            return
        held.append(delivery)
        self._bytes += len(delivery.frame)

    def release(self, confirmed: Confirmed) -> tuple[list[Delivery], bool]:
        """The room's messages up to the confirmed one, oldest first; or, when the held ones may not follow on from
        what was delivered, nothing and True: read them from the log instead."""
        held = self._held.get(confirmed.room, [])
        cut = 0
        for delivery in held:
            if delivery.id is None or delivery.id > confirmed.id:
                break
            cut += 1
        released, rest = held[:cut], held[cut:]
        self._bytes -= sum(len(delivery.frame) for delivery in released)
        if rest:
            self._held[confirmed.room] = rest
        else:
            self._held.pop(confirmed.room, None)
        if confirmed.room in self._gapless:
            return released, False
        first = self._first_heard.get(confirmed.room)
        if first is not None and first <= confirmed.id:
            # The catch-up that this confirmation calls for reaches the first message heard: what is held from now
            # on follows on from it.
            self._gapless.add(confirmed.room)
            del self._first_heard[confirmed.room]
        return [], True

    def drop(self, rooms: list[str] | set[str]) -> None:
        """These rooms' subscriptions are gone (or the rooms are no longer heard, or held too much): what they held
        is not shown; their next confirmations are caught up from the log, which is read up to the confirmed
        position."""
        for room in rooms:
            held = self._held.pop(room, [])
            self._bytes -= sum(len(delivery.frame) for delivery in held)
            self._gapless.discard(room)
            self._first_heard.pop(room, None)

    def counts(self) -> tuple[int, int]:
        """Messages held, and their bytes."""
        return sum(len(held) for held in self._held.values()), self._bytes
