"""The rooms that have members on this replica: who is in each and where each stands in it (joining, catching up,
live), hearing each room's channel while it has members here (and for UNSUBSCRIBE_GRACE_SECONDS after the last
leaves), the fan-out from those channels to their outboxes, catching up after a lost subscription, and keeping
their members' presence alive.

Joining without gaps or repeats: a member is in its room, and the replica hears the room (Redis has confirmed the
subscription), *before* its history is read, so nothing published during the read is missed; what arrives
meanwhile is held. When the history is in, the welcome goes out first, then what was held; until the first delivery
newer than the history's last message, the member skips anything not newer (it was in the welcome). From then on
it is live, and the fan-out writes to its outbox directly.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Collection, Iterator

from .broker import Broker, BrokerUnavailable, Delivery, ModerationNotice, TypingNotice, presence_entry
from .config import Settings
from .connection import Connection
from .names import fold
from .protocol import CloseCode, MessageId
from .typists import Typists

log = logging.getLogger(__name__)


# How often a replica looks for names banned from the whole chat: a ban closes their sockets within about this.
BANS_LOOK_EVERY = 0.5


class Stage(enum.Enum):
    JOINING = "joining"  # history not read yet: the room's deliveries are held
    CATCHING_UP = "catching_up"  # welcomed; deliveries up to `joined_at` were in its history: skipped
    LIVE = "live"


class Member:
    """One connection in one room, under one name."""

    __slots__ = ("connection", "folded", "held", "held_bytes", "joined_at", "name", "room", "stage")

    def __init__(self, connection: Connection, room: str, name: str) -> None:
        self.connection = connection
        self.room = room
        self.name = name
        # The name as claims and moderators' rules know it (names.fold).
        self.folded = fold(name)
        self.stage = Stage.JOINING
        self.held: list[Delivery] = []
        self.held_bytes = 0
        # The newest message id this member had when it was welcomed; None if the room's log was empty.
        self.joined_at: MessageId | None = None

    @property
    def entry(self) -> str:
        """This member in the room's presence."""
        return presence_entry(self.connection.id, self.name)

    @property
    def welcomed(self) -> bool:
        return self.stage is not Stage.JOINING

    def post(self, delivery: Delivery) -> bool:
        """A delivery for a member that is not live yet; True once it is live (the room then writes to its outbox
        directly)."""
        if self.connection.closing:
            return False  # cut off (too slow, or restarting): it leaves the room on the next pass of the loop
        if self.stage is Stage.JOINING:
            size = len(delivery.frame)
            if not self.connection.fits(len(self.held) + 1, self.held_bytes + size):
                self.held, self.held_bytes = [], 0
                self.connection.overflow()
                return False
            self.held.append(delivery)
            self.held_bytes += size
            return False
        if delivery.id is not None:
            if self.joined_at is not None and delivery.id <= self.joined_at:
                return False  # already in the welcome's history
            # Ids only grow from here: no more checks needed.
            self.stage = Stage.LIVE
        self.connection.push(delivery)
        return self.stage is Stage.LIVE

    def welcome(self, frame: bytes, joined_at: MessageId | None) -> bool:
        """The welcome first, then whatever the room said meanwhile that its history did not have; True once live."""
        self.joined_at = joined_at
        self.stage = Stage.CATCHING_UP
        self.connection.reply(frame)
        held, self.held, self.held_bytes = self.held, [], 0
        live = False
        for delivery in held:
            live = self.post(delivery)
        return live


class Room:
    __slots__ = ("forget", "joining", "last_id", "live", "members", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: dict[Connection, Member] = {}
        # Live members' connections, which the fan-out writes to directly (the hot path), and the others.
        self.live: set[Connection] = set()
        self.joining: set[Member] = set()
        # The newest message fanned out here: anything not newer is a repeat (a catch-up got there first).
        self.last_id: MessageId | None = None
        # Set while the room has no member: when it fires, the replica stops hearing the room.
        self.forget: asyncio.TimerHandle | None = None

    def catch_up_from(self) -> MessageId | None:
        """Where this room's members' knowledge of the log ends, as far as the replica can be sure."""
        if self.last_id is not None:
            return self.last_id
        starts = [member.joined_at for member in self.members.values() if member.joined_at is not None]
        return min(starts) if starts else None


class Rooms:
    def __init__(self, broker: Broker, settings: Settings) -> None:
        self.broker = broker
        self.settings = settings
        self._rooms: dict[str, Room] = {}
        self._members: dict[Connection, Member] = {}
        self._unsubscribing: set[asyncio.Task[None]] = set()
        self.typists = Typists(broker, self.deliver)

    def __iter__(self) -> Iterator[Room]:
        return iter(list(self._rooms.values()))

    def held(self) -> tuple[int, int]:
        """Deliveries held for joining members, and their bytes (part of what waits for clients)."""
        joining = [member for room in self._rooms.values() for member in room.joining]
        return sum(len(m.held) for m in joining), sum(m.held_bytes for m in joining)

    def enter(self, room_name: str, connection: Connection, name: str) -> Member:
        """From now on the room's deliveries reach this connection (held until its welcome is out)."""
        member = Member(connection, room_name, name)
        room = self._rooms.get(room_name)
        if room is None:
            room = self._rooms[room_name] = Room(room_name)
        elif room.forget is not None:
            room.forget.cancel()  # someone is back within the grace: the room stays subscribed
            room.forget = None
        room.members[connection] = member
        room.joining.add(member)
        self._members[connection] = member
        return member

    async def hear(self, member: Member) -> None:
        """Returns once this replica hears the member's room, so that its history can be read without a gap:
        at once when the room is subscribed already, else when Redis confirms the subscription."""
        await self.broker.subscribe(member.room)

    def welcome(self, member: Member, frame: bytes, joined_at: MessageId | None) -> None:
        room = self._rooms.get(member.room)
        if room is None or member not in room.joining:
            return  # it left (or was closed) while its history was read
        if member.welcome(frame, joined_at):
            room.joining.discard(member)
            room.live.add(member.connection)

    def has_passed(self, member: Member, delivery: Delivery) -> bool:
        """Whether this member's stream is past the message: it was in its welcome's history, or was fanned out to
        it, or is older than both. A message it has not passed reaches it through the fan-out."""
        room = self._rooms.get(member.room)
        if delivery.id is None or room is None:
            return False
        return (member.joined_at is not None and delivery.id <= member.joined_at) or (
            room.last_id is not None and delivery.id <= room.last_id
        )

    def remove(self, connection: Connection) -> Member | None:
        """Takes a connection out of its room; the member it was, or None when it was in none."""
        member = self._members.pop(connection, None)
        if member is None:
            return None
        room = self._rooms.get(member.room)
        if room is not None:
            room.members.pop(connection, None)
            room.live.discard(connection)
            room.joining.discard(member)
            if not room.members and room.forget is None:
                # Not at once: a member who reconnects (a reload, a replica restart) should not cost a subscription.
                grace = self.settings.unsubscribe_grace
                room.forget = asyncio.get_running_loop().call_later(grace, self._forget, room.name)
        return member

    def _forget(self, name: str) -> None:
        room = self._rooms.get(name)
        if room is None or room.members:
            return
        del self._rooms[name]
        self.typists.forget(name)
        task = asyncio.create_task(self._unsubscribe(name))
        self._unsubscribing.add(task)
        task.add_done_callback(self._unsubscribing.discard)

    async def _unsubscribe(self, name: str) -> None:
        # Someone may have joined between the timer and this task: their join found the room still subscribed and
        # did not wait, so it must stay so. (The check and the broker's own bookkeeping run with no await between.)
        if name not in self._rooms:
            await self.broker.unsubscribe(name)

    def deliver(self, delivery: Delivery) -> None:
        room = self._rooms.get(delivery.room)
        if room is None:
            return
        if delivery.id is not None:
            if room.last_id is not None and delivery.id <= room.last_id:
                return
            room.last_id = delivery.id
            if delivery.frame.startswith(b'{"type":"message"'):
                self.typists.message(delivery)
        for connection in room.live:
            connection.push(delivery)
        if room.joining:
            for member in list(room.joining):
                if member.post(delivery):
                    room.joining.discard(member)
                    room.live.add(member.connection)

    async def fill_gaps(self, names: Collection[str] | None = None) -> None:
        """Run after every (re)subscription of these rooms (None: all): what was published while this replica was
        not listening, within the same bound as a resume. Members of a room whose gap is larger (or whose position
        left the log) are closed with 1013 after what could be read: each then resumes on its own, from what it
        holds."""
        settings = self.settings
        chosen = list(self) if names is None else [self._rooms[name] for name in names if name in self._rooms]
        for room in chosen:
            if not room.members:
                continue  # unsubscribing soon; whoever joins it reads its own history
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
                for member in list(room.members.values()):
                    member.connection.close(CloseCode.TRY_AGAIN, "missed too much: reconnect with since")
                    self.remove(member.connection)

    async def fan_out(self) -> None:
        """Forever: every published message, change and presence event to the local members of its room, and typing
        notices to the rooms' typing state."""
        async for item in self.broker.listen(self.fill_gaps):
            if isinstance(item, TypingNotice):
                if item.room in self._rooms:
                    self.typists.heard(item)
            elif isinstance(item, ModerationNotice):
                self.moderated(item)
            else:
                self.deliver(item)

    def moderated(self, notice: ModerationNotice) -> None:
        """A moderator's rule: the room's members here are told, and a banned name's sockets here are closed (after
        the notice, so that they learn why)."""
        self.deliver(Delivery(notice.room, None, notice.frame))
        room = self._rooms.get(notice.room)
        if notice.closes and room is not None:
            for member in [member for member in room.members.values() if member.folded == notice.folded]:
                self._ban(member)

    def close_named(self, folded: str) -> None:
        """A name banned from the chat: its sockets here, in every room, are closed."""
        for member in [member for member in self._members.values() if member.folded == folded]:
            self._ban(member)

    def _ban(self, member: Member) -> None:
        member.connection.close(CloseCode.BANNED, "banned by a moderator")
        self.remove(member.connection)

    async def watch_bans(self) -> None:
        """Forever: names banned from the whole chat (on any replica) have their sockets here closed within about
        BANS_LOOK_EVERY. A look is one small read; the clocks of the replicas may differ by a little, so the first
        look reaches a few seconds back, and a name closed twice is closed once."""
        since = int(time.time() * 1000) - 5_000
        while True:
            await asyncio.sleep(BANS_LOOK_EVERY)
            try:
                found = await self.broker.bans_since(since)
            except BrokerUnavailable:
                continue
            for folded, at in found:
                self.close_named(folded)
                since = max(since, at)

    async def keep_presence(self) -> None:
        """Renews presence of this replica's members before it expires, which also lets names whose replica died
        without saying goodbye leave within about PRESENCE_TTL."""
        while True:
            await asyncio.sleep(self.settings.presence_refresh)
            for room in self:
                members = [member for member in room.members.values() if member.welcomed]
                try:
                    await self.broker.refresh(room.name, [member.entry for member in members])
                    # A member that left while the refresh was on its way may have been put back: take it out.
                    for member in members:
                        if member.connection not in self._members:
                            await self.broker.leave(room.name, member.entry)
                except BrokerUnavailable:
                    log.warning("presence refresh failed", extra={"event": "presence_failed", "room": room.name})
                    break
