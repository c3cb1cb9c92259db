"""What a replica needs from the state the replicas share, as four small interfaces and the types they speak in:
the rooms' logs and the fan-out (`Log`), who is online (`Presence`), what each client address may still add
(`Quotas`), and who holds each claimed name (`Names`). `Broker` is all four; `RedisBroker` (redis.py) and
`MemoryBroker` (memory.py) are its two kinds, held to one contract (tests/system/test_broker_contract.py). Every
method raises BrokerUnavailable when it cannot answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

from ..config import Settings
from ..names import Claim
from ..protocol import Change, ErrorCode, MessageId, entry_frame, message_frame, parse_message_id

# Entries read from a log per round trip: a bounded reply (at most about 900 KB of the largest messages) however
# far a reader is behind, so that no read makes Redis hold a large output buffer.
LOG_PAGE = 100
# Entries a history read (`recent`) looks through for its messages, at most: changes (edits, reactions) are entries
# too, and a flood of them must not make one welcome read the whole log.
RECENT_SCAN = 1000
# The window over which an address's allowance of bytes and new rooms refills.
QUOTA_WINDOW_MS = 3_600_000
# Expired presence entries swept per presence call, at most: about 2 ms of Redis's time (measured: 1,000 took 9 ms). A
# replica that died with many members in a room leaves them behind, and the calls that follow sweep them a batch at a
# time, one right after another, so no single call holds Redis long.
PRESENCE_SWEEP_MAX = 200


class BrokerUnavailable(Exception):
    """Redis could not be reached or did not answer in time: nothing was stored, the caller may retry."""


class NotConfirmed(BrokerUnavailable):
    """A message was stored on its primary, but not enough replicas had it in time (REDIS_CONFIRM_REPLICAS): it is
    not shown yet, and a failover now would lose it. A retry with the same ref stores nothing more and confirms it;
    a later message's confirmation also shows it."""


class ChangeRefused(Exception):
    """A change to a message that its state or the rules do not allow (or that changes nothing): `code` says which."""

    def __init__(self, code: ErrorCode) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True, slots=True)
class Delivery:
    """One object for the clients of a room: a message (with its id) or a presence event (id None).

    It is built once per replica and the same instance sits in every recipient's outbox.
    """

    room: str
    id: MessageId | None
    frame: bytes  # UTF-8 JSON, encoded once


@dataclass(frozen=True, slots=True)
class TypingNotice:
    """Names of a room that a replica heard typing since its previous notice (typists.py); never stored."""

    room: str
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Online:
    """Names online in a room (sorted by code point, a bounded part of them) and how many are online in all."""

    names: list[str]
    count: int


@dataclass(frozen=True, slots=True)
class LogRead:
    """Messages after a position in a room's log, read within a bound."""

    deliveries: list[Delivery]
    # The position is in the retained log (always, when reading from the start): else nothing was read.
    found: bool
    # Every retained message after the position is in `deliveries`; False when the bound was reached first.
    complete: bool


@dataclass(frozen=True, slots=True)
class Appended:
    """A message in its room's log."""

    id: str
    # For a retry of a say stored before (same name and ref, within RETRY_WINDOW_SECONDS): the message as stored
    # then, or None once it has left the log. None for a message stored now.
    repeat: Delivery | None = None
    retried: bool = False


@dataclass(frozen=True, slots=True)
class QuotaRefusal:
    """Why an address may not add a message now, and when it may again."""

    code: ErrorCode  # QUOTA_EXCEEDED (bytes), TOO_MANY_ROOMS or TOO_MANY_NAMES
    retry_after_ms: int


def message_delivery(room: str, message_id: str | bytes, body: bytes) -> Delivery:
    if isinstance(message_id, bytes):
        message_id = message_id.decode()
    return Delivery(room, parse_message_id(message_id), message_frame(message_id, body))


def change_delivery(room: str, entry_id: str | bytes, kind: str | bytes, body: bytes) -> Delivery:
    """A change to a message (Change), as its log entry."""
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    if isinstance(kind, bytes):
        kind = kind.decode()
    return Delivery(room, parse_message_id(entry_id), entry_frame(kind, entry_id, body))


def presence_entry(connection_id: str, name: str) -> str:
    return f"{connection_id}|{name}"


# Called with the rooms whose subscription was just made again (after a lost connection, or on another node after a
# failover): the replica fetches what they missed from their logs.
OnSubscribed = Callable[[Collection[str]], Awaitable[None]]


class Log(ABC):
    """Each room's log, and the fan-out of what is appended to it."""

    @abstractmethod
    async def append(
        self, room: str, body: bytes, *, name: str, ref: str | None, folded: str = "", moderator: bool = False
    ) -> Appended:
        """Stores a message and publishes it, in one atomic step, unless a say with the same name and ref was stored
        within the retry window: then nothing is stored, and the answer is that message. Returns once the message is
        as safe as the policy asks (REDIS_CONFIRM_REPLICAS), else raises NotConfirmed. Raises Refused when the
        room's rules hold the sender (`folded`) back: muted, or slow mode (not a moderator)."""

    @abstractmethod
    async def change(
        self,
        room: str,
        kind: Change,
        target: str,
        body: bytes,
        *,
        name: str,
        emoji: str = "",
        on: bool = True,
        folded: str = "",
        moderator: bool = False,
    ) -> str:
        """Edits, deletes or reacts to message `target` (as `name`), checked against its state and the rules (one's
        own message; the edit window; REACTIONS_PER_MESSAGE), records it in the message's state and appends it to the
        log after the message, published like a message and confirmed as one. Returns the change's id; raises
        ChangeRefused with the reason, NO_CHANGE when the message is as asked already (confirmed like a change);
        Refused when `folded` is muted (an edit or reaction). A moderator is not held back, and may delete anyone's
        message: the deletion is marked "moderated"."""

    @abstractmethod
    async def recent(self, room: str, limit: int, before: str | None = None) -> list[Delivery]:
        """Up to `limit` messages older than `before` (or the newest), oldest first, each as it now is (its changes
        applied; the change entries themselves are left out), among at most RECENT_SCAN entries of the log."""

    @abstractmethod
    async def read_after(self, room: str, position: MessageId | None, *, max_messages: int, max_bytes: int) -> LogRead:
        """The entries after the one with id `position` (from the start for None), oldest first: messages as they now
        are and the changes to messages, at most `max_messages` of them and `max_bytes` of frames. Read in pages of
        LOG_PAGE, each checking first that the position it continues from is still in the log, so nothing is read
        after an id that is not there."""

    @abstractmethod
    async def subscribe(self, room: str) -> None:
        """From now on `listen` yields what is published in this room. Returns once the subscription is confirmed,
        so that a history read after it cannot miss a message published meanwhile; BrokerUnavailable when it cannot
        be confirmed within a few seconds (it stays asked for, and is made when the subscription is back)."""

    @abstractmethod
    async def unsubscribe(self, room: str) -> None:
        """No more of this room's messages and presence events."""

    @abstractmethod
    def subscribed(self) -> set[str]:
        """The rooms asked for (confirmed or not)."""

    @abstractmethod
    async def publish_typing(self, room: str, names: Sequence[str]) -> None:
        """Tells every replica hearing the room that these names are typing (a TypingNotice); not stored."""

    @abstractmethod
    def listen(self, on_subscribed: OnSubscribed) -> AsyncIterator[Delivery | TypingNotice | ModerationNotice]:
        """Everything published in the subscribed rooms (messages, changes, presence events, typing notices and
        moderators' rules), each room in its order, forever. After each (re)subscription, and before the next
        delivery of the rooms it made, it awaits
        `on_subscribed` with those rooms, which is where a replica fetches what they missed."""


class Presence(ABC):
    """Who is online in each room, by connection entry ("<connection id>|<name>"); a name is online while any of
    its entries is. Changes are published as presence events carrying the net change since the room's previous
    event (the names that came online and went, each list at most PRESENCE_LIST_MAX long) and the count, at most
    one per room per PRESENCE_INTERVAL_MS: the first at once, the rest coalesced into one. No call reads the whole
    room: each costs O(log N) per entry, name or expired entry it handles."""

    # At most this many expired entries are swept per call; an instance may be given less (the tests do).
    sweep_max = PRESENCE_SWEEP_MAX

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._presence_timers: dict[str, asyncio.TimerHandle] = {}
        self._presence_flushes: set[asyncio.Task[None]] = set()

    async def join(self, room: str, entry: str) -> Online:
        """Adds the connection; the room's first PRESENCE_LIST_MAX names after it, and the count (the welcome's)."""
        online = await self._presence("join", room, [entry])
        assert online is not None  # a join always answers with the names
        return online

    async def leave(self, room: str, entry: str) -> None:
        await self._presence("leave", room, [entry])

    async def refresh(self, room: str, entries: Sequence[str]) -> None:
        """Renews these connections' presence, and lets names whose replica died leave."""
        await self._presence("refresh", room, entries)

    async def online(self, room: str, limit: int, after: str | None = None) -> Online:
        """Up to `limit` names online in the room that sort after `after` (from the first without it), by code
        point, and how many names are online in all, in O(log N + limit). A read of the list like a welcome: a
        change it sees is announced by the next event even if it is undone before then."""
        online = await self._presence("page", room, [], after=after, limit=limit)
        assert online is not None  # a page always answers with the names
        return online

    @abstractmethod
    async def _presence_call(
        self, action: str, room: str, entries: Sequence[str], *, after: str | None, limit: int
    ) -> tuple[Online | None, int]:
        """One change of presence, a "flush", or a "page" of the names (`limit` of them after `after`): for a join,
        the room's first PRESENCE_LIST_MAX names after it and the count, for a page the page and the count (None
        for the other actions); and the milliseconds until the room wants another call, 0 when it does not: a change
        that had to wait for the room's presence interval is due, or expired entries are left to sweep."""

    async def _presence(
        self, action: str, room: str, entries: Sequence[str], *, after: str | None = None, limit: int = 0
    ) -> Online | None:
        online, wait_ms = await self._presence_call(action, room, entries, after=after, limit=limit)
        if wait_ms > 0:
            self._flush_presence_later(room, wait_ms)
        return online

    def _flush_presence_later(self, room: str, wait_ms: int) -> None:
        """Coalesced changes are published by whichever replica asks first once they are due; this one asks when
        its own change is (and at once while expired entries are left to sweep). If it dies first, the next renewal
        in the room (any replica's) publishes them."""
        timers = self._presence_timers
        if room in timers:
            return
        loop = asyncio.get_running_loop()
        timers[room] = loop.call_later(wait_ms / 1000, self._flush_presence_now, room)

    def _flush_presence_now(self, room: str) -> None:
        self._presence_timers.pop(room, None)
        task = asyncio.get_running_loop().create_task(self._flush_presence(room))
        self._presence_flushes.add(task)
        task.add_done_callback(self._presence_flushes.discard)

    async def _flush_presence(self, room: str) -> None:
        with contextlib.suppress(BrokerUnavailable):
            await self._presence("flush", room, [])

    def _stop_presence_flushes(self) -> None:
        for timer in self._presence_timers.values():
            timer.cancel()
        self._presence_timers.clear()
        for task in self._presence_flushes:
            task.cancel()


class Quotas(ABC):
    """Each client address's hourly allowance of bytes, new rooms and new names, shared by every replica."""

    @abstractmethod
    async def charge(self, address: str, size: int, *, new_room: bool, new_name: bool = False) -> QuotaRefusal | None:
        """Takes `size` bytes (and a room, when the message creates one; a name, when a join claims one) from the
        address's allowance; a refusal takes nothing."""

    @abstractmethod
    async def charge_room_of_name(self, folded: str) -> QuotaRefusal | None:
        """Takes a new room from the name's hourly allowance (NAME_ROOMS_PER_HOUR), over every replica."""


# A ban (or mute) until a moderator lifts it; also how the scripts write it.
FOREVER = -1
# Moderators' actions the audit log keeps, at least (the newest).
AUDIT_RETAIN = 10_000


@dataclass(frozen=True, slots=True)
class Rules:
    """What a room's moderators decided for one name, as of now (milliseconds since the epoch; FOREVER)."""

    banned_until: int | None = None
    muted_until: int | None = None
    slow_seconds: int = 0
    # Sockets one name may have in the room, as a moderator set it (0: NAME_SOCKETS); and how many it has now.
    sockets_per_name: int = 0
    sockets_open: int = 0


class Refused(Exception):
    """A message or change that the room's rules hold back: MUTED or SLOW_MODE, and when it may be sent (ms from
    now; FOREVER for a mute until lifted)."""

    def __init__(self, code: ErrorCode, retry_after_ms: int) -> None:
        super().__init__(code)
        self.code = code
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True, slots=True)
class ModerationNotice:
    """A moderator's rule, published to a room's members: `frame` for them, whom it is about, and whether that name's
    sockets in the room are closed (a ban)."""

    room: str
    folded: str
    closes: bool
    frame: bytes


class Moderation(ABC):
    """Moderators' rules, kept in Redis and enforced by every replica: per room (mutes, bans, slow mode; the scripts
    that store messages and changes check them), per chat (bans, on the name's claim), and the audit log."""

    @abstractmethod
    async def rules(self, room: str, folded: str, name: str) -> Rules:
        """The room's rules that hold for this name now (a join's check, and its welcome), and how many sockets the
        name (as claimed: presence's spelling) has in the room, on every replica."""

    @abstractmethod
    async def moderate(self, room: str, rule: str, folded: str, value: int, frame: bytes, *, closes: bool) -> None:
        """Sets one rule of the room ("mute" and "ban": until when, FOREVER; "slow": seconds; "sockets": sockets per
        name; 0 lifts it; "" sets nothing) and publishes `frame` to the room's members on every replica, in one
        step; with `closes`, every replica closes the name's sockets in the room."""

    @abstractmethod
    async def ban_everywhere(self, folded: str, until: int) -> None:
        """Bans the name from the whole chat until then (FOREVER; 0 lifts it), and lists it for every replica's
        look at new bans (`bans_since`)."""

    @abstractmethod
    async def bans_since(self, millis: int) -> list[tuple[str, int]]:
        """Names banned from the chat after `millis` (a replica's last look), and when, oldest first."""

    @abstractmethod
    async def audit(self, entry: bytes) -> str:
        """Keeps a moderator's action (JSON) in the audit log; its id."""

    @abstractmethod
    async def audit_log(self, limit: int, before: str | None) -> list[tuple[str, bytes]]:
        """Up to `limit` actions older than `before` (or the newest), newest first."""


class Names(ABC):
    """Who holds each claimed name (names.py), by its folded form and the SHA-256 of its token; a claim lasts
    NAME_IDLE_DAYS after the last join that used it."""

    @abstractmethod
    async def claim(self, folded: str, name: str, offered: str, new: str, *, take: bool) -> tuple[Claim, str, int]:
        """Whether the name is `offered`'s (OWNED, and its idle time starts again), someone else's (TAKEN), banned
        from the chat (BANNED), or free: then with `take` it becomes `new`'s under the spelling `name` (CLAIMED),
        without, it is only reported (FREE). Also returns the name as claimed (its first spelling), or `name` when it
        is free; and until when it is banned (ms; FOREVER), else 0."""

    @abstractmethod
    async def release(self, folded: str, offered: str) -> bool:
        """Gives the name up, if it is `offered`'s (or nobody's); False when it is someone else's."""


class Broker(Log, Presence, Quotas, Names, Moderation):
    """The shared state as one replica sees it."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> None: ...

    async def check_policy(self) -> None:
        """Logs a durability setting that does not fit the storage (nothing to check, by default)."""

    async def migrate(self) -> None:
        """Moves what an earlier release stored under other keys to where this one reads it (nothing, by default)."""
