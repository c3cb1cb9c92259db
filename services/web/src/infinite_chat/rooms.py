"""The rooms that have members on this replica: fan-out from the Redis channel to their outboxes, catching up
after a lost subscription, and keeping their members' presence alive."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from .broker import Broker, BrokerUnavailable, Delivery, presence_entry
from .config import Settings
from .connection import CLOSE_TRY_AGAIN, Connection, State
from .protocol import MessageId

log = logging.getLogger(__name__)


class Room:
    __slots__ = ("last_id", "members", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: set[Connection] = set()
        # The newest message fanned out here: anything not newer is a repeat (a catch-up got there first).
        self.last_id: MessageId | None = None

    def catch_up_from(self) -> MessageId | None:
        """Where this room's members' knowledge of the log ends, as far as the replica can be sure."""
        if self.last_id is not None:
            return self.last_id
        starts = [member.joined_at for member in self.members if member.joined_at is not None]
        return min(starts) if starts else None


class Rooms:
    def __init__(self, broker: Broker, settings: Settings) -> None:
        self.broker = broker
        self.settings = settings
        self._rooms: dict[str, Room] = {}

    def __iter__(self) -> Iterator[Room]:
        return iter(list(self._rooms.values()))

    def enter(self, room_name: str, connection: Connection, name: str) -> None:
        """From now on the room's deliveries reach this connection (held until its welcome is out)."""
        connection.start_joining(room_name, name)
        room = self._rooms.get(room_name)
        if room is None:
            room = self._rooms[room_name] = Room(room_name)
        room.members.add(connection)

    def remove(self, connection: Connection) -> bool:
        """Takes a connection out of its room; False when it was not in one."""
        room = self._rooms.get(connection.room or "")
        if room is None or connection not in room.members:
            return False
        room.members.discard(connection)
        if not room.members:
            del self._rooms[room.name]
        return True

    def deliver(self, delivery: Delivery) -> None:
        room = self._rooms.get(delivery.room)
        if room is None:
            return
        if delivery.id is not None:
            if room.last_id is not None and delivery.id <= room.last_id:
                return
            room.last_id = delivery.id
        for member in room.members:
            member.post(delivery)

    async def fill_gaps(self) -> None:
        """Run after every (re)subscription: what was published while this replica was not listening, within the
        same bound as a resume. Members of a room whose gap is larger (or whose position left the log) are closed
        with 1013 after what could be read: each then resumes on its own, from what it holds."""
        settings = self.settings
        for room in self:
            read = await self.broker.read_after(
                room.name,
                room.catch_up_from(),
                max_messages=settings.resume_max_messages,
                max_bytes=settings.resume_max_bytes,
            )
            if read.deliveries:
                log.info(
                    "caught up %d messages",
                    len(read.deliveries),
                    extra={"event": "gap_filled", "room": room.name},
                )
            for delivery in read.deliveries:
                self.deliver(delivery)
            if not (read.found and read.complete):
                log.warning("gap too large to fill", extra={"event": "gap_too_large", "room": room.name})
                for member in list(room.members):
                    member.close(CLOSE_TRY_AGAIN, "missed too much: reconnect with since")
                self._rooms.pop(room.name, None)

    async def fan_out(self) -> None:
        """Forever: every published message and presence event to the local members of its room."""
        async for delivery in self.broker.listen(self.fill_gaps):
            self.deliver(delivery)

    async def keep_presence(self) -> None:
        """Renews presence of this replica's members before it expires, which also lets names whose replica died
        without saying goodbye leave within about PRESENCE_TTL."""
        while True:
            await asyncio.sleep(self.settings.presence_refresh)
            for room in self:
                members = [m for m in room.members if m.state in (State.CATCHING_UP, State.LIVE)]
                entries = [presence_entry(m.id, m.name or "") for m in members]
                try:
                    await self.broker.refresh(room.name, entries)
                    # A member that left while the refresh was on its way may have been put back: take it out.
                    for member in members:
                        if member not in room.members:
                            await self.broker.leave(room.name, presence_entry(member.id, member.name or ""))
                except BrokerUnavailable:
                    log.warning("presence refresh failed", extra={"event": "presence_failed", "room": room.name})
                    break
