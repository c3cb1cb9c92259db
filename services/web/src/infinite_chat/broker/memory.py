"""The in-memory twin of the Redis broker: one replica and no Redis, for `python -m infinite_chat` and for fast
tests of logic. It does what the Lua scripts do, the same way (tests/system/test_broker_contract.py holds both to
one contract), and keeps nothing across a restart.
"""

from __future__ import annotations

import asyncio
import math
import time
from bisect import bisect_left, bisect_right, insort
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from heapq import heappop, heappush

import orjson

from ..config import Settings
from ..names import Claim
from ..protocol import (
    REACTIONS_PER_MESSAGE,
    Change,
    Changes,
    ErrorCode,
    MessageId,
    message_as_now,
    parse_message_id,
    presence_frame,
)
from .base import (
    AUDIT_RETAIN,
    FOREVER,
    QUOTA_WINDOW_MS,
    RECENT_SCAN,
    Appended,
    Broker,
    ChangeRefused,
    Delivery,
    LogRead,
    ModerationNotice,
    Online,
    OnSubscribed,
    QuotaRefusal,
    Refused,
    Rules,
    TypingNotice,
    change_delivery,
    message_delivery,
)
from .keys import retry_field


@dataclass(slots=True)
class _RoomPresence:
    """What presence.lua keeps of a room, the same way: connection entries with their expiry, each name's count of
    them, the names online in order, the net change since the last event, and when that event went out."""

    connections: dict[str, float] = field(default_factory=dict)  # entry -> expiry (monotonic seconds)
    # (expiry, entry) in expiry order, for the sweep; an item whose entry has since been renewed or removed is stale
    # and skipped when it comes up (within one PRESENCE_TTL, so a few items per entry at most).
    expiries: list[tuple[float, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # sorted by code point, as Redis orders UTF-8 bytes
    changes: dict[str, str] = field(default_factory=dict)  # name -> "+" (came online) or "-" (went)
    # For each change: the list reads there had been when it was made, or None once a read has seen it.
    change_reads: dict[str, int | None] = field(default_factory=dict)
    reads: int = 0  # lists read (welcomes, API pages) since the last event while a change waited
    at: float = float("-inf")
    event: str = ""
    name: str = ""

    def gained(self, name: str) -> bool:
        """A connection of this name came; True when that recorded a new change (the name came online)."""
        self.counts[name] = self.counts.get(name, 0) + 1
        if self.counts[name] == 1:
            insort(self.names, name)
            return self.changed("+", name)
        return False

    def lost(self, name: str) -> None:
        self.counts[name] -= 1
        if self.counts[name] == 0:
            del self.counts[name]
            del self.names[bisect_left(self.names, name)]
            self.changed("-", name)

    def changed(self, sign: str, name: str) -> bool:
        # Against the state at the last event: the opposite change of the same name undoes it, if no list was read
        # since; else the reader saw it changed, and the next event says where it stands now.
        self.event, self.name = ("join" if sign == "+" else "leave"), name
        if name not in self.changes:
            self.changes[name], self.change_reads[name] = sign, self.reads
            return True
        if self.change_reads[name] == self.reads:
            del self.changes[name], self.change_reads[name]
        else:
            self.changes[name], self.change_reads[name] = sign, None
        return False

    def read(self) -> None:
        """A read of the list (a welcome, a page) while changes wait: they can no longer cancel out unannounced."""
        if self.changes:
            self.reads += 1

    def listed(self, after: str | None, limit: int) -> Online:
        start = 0 if after is None else bisect_right(self.names, after)
        return Online(self.names[start : start + limit], len(self.names))

    def sweep(self, now: float, limit: int) -> bool:
        """Removes up to `limit` expired entries; True when more are left."""
        expiries = self.expiries
        swept = 0
        while expiries and expiries[0][0] <= now:
            if swept == limit and self.connections.get(expiries[0][1]) == expiries[0][0]:
                return True
            expiry, entry = heappop(expiries)
            if self.connections.get(entry) == expiry:
                del self.connections[entry]
                self.lost(_name_of(entry))
                swept += 1
        return False


@dataclass(slots=True)
class _Refs:
    """What append.lua keeps of a room's refs, with the same expiries: this retry window's hash (gone 2 windows
    after its last ref) and the one before's (gone a window after it was turned)."""

    now: dict[str, str] = field(default_factory=dict)
    before: dict[str, str] = field(default_factory=dict)
    began: float = 0.0
    last: float = 0.0
    before_until: float = 0.0

    def find(self, key: str, at: float, window: float) -> str | None:
        if at >= self.last + 2 * window:
            self.now = {}
        if at >= self.before_until:
            self.before = {}
        return self.now.get(key) or self.before.get(key)

    def keep(self, key: str, message_id: str, at: float, window: float) -> None:
        self.find(key, at, window)
        if self.now and at - self.began >= window:
            self.before, self.before_until, self.now = self.now, at + window, {}
        if not self.now:
            self.began = at
        self.now[key] = message_id
        self.last = at


@dataclass(slots=True)
class _Entry:
    """An entry of a room's log: a message (kind None) or a change to one."""

    key: MessageId
    id: str
    body: bytes
    kind: str | None = None


@dataclass(slots=True)
class _State:
    """What change.lua keeps of a changed message, the same way."""

    edit_id: str | None = None
    edit_body: bytes | None = None
    deleted_id: str | None = None
    reactions: list[tuple[str, list[str]]] = field(default_factory=list)
    moderated: bool = False

    def changes(self) -> Changes:
        return Changes(
            self.edit_id, self.edit_body, self.deleted_id, [(e, list(n)) for e, n in self.reactions], self.moderated
        )


@dataclass(slots=True)
class _Room:
    """What moderation.lua keeps of a room: names muted and banned until when (ms; FOREVER), slow mode, and when
    each name last spoke while it is on."""

    muted: dict[str, int] = field(default_factory=dict)
    banned: dict[str, int] = field(default_factory=dict)
    slow: int = 0
    spoke: dict[str, float] = field(default_factory=dict)
    sockets: int = 0  # a moderator's sockets per name in the room (0: NAME_SOCKETS)


@dataclass(slots=True)
class _Allowance:
    """What quota.lua keeps per address: bytes, rooms and names left, as of `at` (seconds)."""

    size: float
    rooms: float
    at: float
    names: float


@dataclass(slots=True)
class _Claim:
    """What claim.lua keeps per name: its token's hash and first spelling, until `until` (seconds)."""

    token: str
    name: str
    until: float
    banned: int = 0  # from the whole chat, until when (ms; FOREVER)


class MemoryBroker(Broker):
    """The twin for one replica without Redis: the same behaviour, nothing shared, nothing kept on restart."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._logs: dict[str, list[_Entry]] = {}
        self._states: dict[str, dict[str, _State]] = {}
        self._room_presence: dict[str, _RoomPresence] = {}
        self._allowances: dict[str, _Allowance] = {}
        self._claims: dict[str, _Claim] = {}
        self._moderated: dict[str, _Room] = {}
        self._bans: list[tuple[str, int]] = []
        self._audit: list[tuple[str, bytes]] = []
        self._refs: dict[str, _Refs] = {}
        self._listeners: set[asyncio.Queue[Delivery | TypingNotice | ModerationNotice]] = set()
        self._heard: set[str] = set()
        self._last: MessageId = (0, 0)

    async def close(self) -> None:
        self._stop_presence_flushes()

    async def ping(self) -> None:
        pass

    async def append(
        self, room: str, body: bytes, *, name: str, ref: str | None, folded: str = "", moderator: bool = False
    ) -> Appended:
        # append.lua, in Python: the same retry windows, the same rules.
        refs = self._refs.setdefault(room, _Refs())
        key = retry_field(name, ref) if ref is not None else None
        if key is not None:
            known = refs.find(key, time.monotonic(), self.settings.retry_window)
            if known is not None:
                stored = [entry for entry in self._logs.get(room, []) if entry.id == known]
                repeat = message_delivery(room, known, stored[0].body) if stored else None
                return Appended(known, repeat, retried=True)
        rules = self._moderated.get(room)
        if rules is not None and not moderator:
            now = time.time() * 1000
            self._refuse_if_muted(rules, folded, now)
            if rules.slow:
                last = rules.spoke.get(folded)
                if last is not None and now - last < rules.slow * 1000:
                    raise Refused(ErrorCode.SLOW_MODE, math.ceil(rules.slow * 1000 - (now - last)))
                rules.spoke[folded] = now
        message_id = self._add(room, body, None)
        if key is not None:
            refs.keep(key, message_id, time.monotonic(), self.settings.retry_window)
        self._publish(message_delivery(room, message_id, body))
        return Appended(message_id)

    def _add(self, room: str, body: bytes, kind: str | None) -> str:
        millis = max(int(time.time() * 1000), self._last[0])
        self._last = (millis, self._last[1] + 1 if millis == self._last[0] else 0)
        entry_id = f"{self._last[0]}-{self._last[1]}"
        entries = self._logs.setdefault(room, [])
        entries.append(_Entry(self._last, entry_id, body, kind))
        del entries[: -self.settings.retain]
        states = self._states.get(room, {})
        oldest = entries[0].key
        for gone in [message_id for message_id in states if (parse_message_id(message_id) or oldest) < oldest]:
            del states[gone]
        return entry_id

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
        # change.lua, in Python: the same checks in the same order, the same state.
        rules = self._moderated.get(room)
        if rules is not None and kind is not Change.DELETE and not moderator:
            self._refuse_if_muted(rules, folded, time.time() * 1000)
        found = [entry for entry in self._logs.get(room, []) if entry.id == target and entry.kind is None]
        if not found:
            raise ChangeRefused(ErrorCode.UNKNOWN_MESSAGE)
        message = orjson.loads(b"{" + found[0].body)
        moderated = False
        if kind in (Change.EDIT, Change.DELETE) and message["name"] != name:
            if kind is Change.EDIT or not moderator:
                raise ChangeRefused(ErrorCode.NOT_YOURS)
            moderated = True
        states = self._states.setdefault(room, {})
        state = states.get(target, _State())
        if kind is Change.DELETE:
            if state.deleted_id is not None:
                raise ChangeRefused(ErrorCode.NO_CHANGE)
            if moderated:
                body = body[:-1] + b',"moderated":true}'
        elif state.deleted_id is not None:
            raise ChangeRefused(ErrorCode.MESSAGE_DELETED)
        elif kind is Change.EDIT:
            sent = int(target.partition("-")[0])
            if time.time() * 1000 - sent > self.settings.edit_window * 1000:
                raise ChangeRefused(ErrorCode.EDIT_WINDOW_CLOSED)
            current = orjson.loads(b"{" + state.edit_body)["text"] if state.edit_body else message["text"]
            if orjson.loads(b"{" + body)["text"] == current:
                raise ChangeRefused(ErrorCode.NO_CHANGE)
        else:
            names = next((names for reaction, names in state.reactions if reaction == emoji), None)
            if on == (names is not None and name in names):
                raise ChangeRefused(ErrorCode.NO_CHANGE)
            if on:
                if sum(len(names) for _, names in state.reactions) >= REACTIONS_PER_MESSAGE:
                    raise ChangeRefused(ErrorCode.TOO_MANY_REACTIONS)
                if names is None:
                    names = []
                    state.reactions.append((emoji, names))
                names.append(name)
            else:
                assert names is not None
                names.remove(name)
                if not names:
                    state.reactions = [(e, n) for e, n in state.reactions if e != emoji]
            body = body[:-1] + b',"count":%d}' % len(names)
        entry_id = self._add(room, body, kind.value)
        if kind is Change.EDIT:
            state.edit_id, state.edit_body = entry_id, body
        elif kind is Change.DELETE:
            state = _State(deleted_id=entry_id, moderated=moderated)
        if state == _State():
            states.pop(target, None)
        else:
            states[target] = state
        self._publish(change_delivery(room, entry_id, kind.value, body))
        return entry_id

    async def publish_typing(self, room: str, names: Sequence[str]) -> None:
        self._publish(TypingNotice(room, tuple(names)))

    def _delivery(self, room: str, entry: _Entry) -> Delivery:
        if entry.kind is not None:
            return change_delivery(room, entry.id, entry.kind, entry.body)
        state = self._states.get(room, {}).get(entry.id)
        if state is None:
            return message_delivery(room, entry.id, entry.body)
        return Delivery(room, entry.key, message_as_now(entry.id, entry.body, state.changes()))

    async def recent(self, room: str, limit: int, before: str | None = None) -> list[Delivery]:
        entries = self._logs.get(room, [])
        if before is not None:
            bound = parse_message_id(before)
            entries = [entry for entry in entries if bound is not None and entry.key < bound]
        messages = [entry for entry in entries[-RECENT_SCAN:] if entry.kind is None]
        return [self._delivery(room, entry) for entry in messages[-limit:]] if limit else []

    async def read_after(self, room: str, position: MessageId | None, *, max_messages: int, max_bytes: int) -> LogRead:
        entries = self._logs.get(room, [])
        start = 0
        if position is not None:
            keys = [entry.key for entry in entries]
            start = bisect_left(keys, position)
            if start == len(keys) or keys[start] != position:
                return LogRead([], found=False, complete=False)
            start += 1
        deliveries: list[Delivery] = []
        size = 0
        for entry in entries[start:]:
            delivery = self._delivery(room, entry)
            if len(deliveries) == max_messages or size + len(delivery.frame) > max_bytes:
                return LogRead(deliveries, found=True, complete=False)
            deliveries.append(delivery)
            size += len(delivery.frame)
        return LogRead(deliveries, found=True, complete=True)

    async def charge(self, address: str, size: int, *, new_room: bool, new_name: bool = False) -> QuotaRefusal | None:
        settings = self.settings
        caps = (settings.address_bytes_per_hour, settings.address_rooms_per_hour, settings.address_names_per_hour)
        return self._charge(address, size, new_room, new_name, caps)

    async def charge_room_of_name(self, folded: str) -> QuotaRefusal | None:
        return self._charge(f"\nname\n{folded}", 0, True, False, (1, self.settings.name_rooms_per_hour, 1))

    def _charge(
        self, key: str, size: int, new_room: bool, new_name: bool, caps: tuple[int, int, int]
    ) -> QuotaRefusal | None:
        # quota.lua, in Python: a bucket per address (or name) that refills over QUOTA_WINDOW_MS.
        window = QUOTA_WINDOW_MS / 1000
        size_cap, rooms_cap, names_cap = (float(cap) for cap in caps)
        now = time.monotonic()
        left = self._allowances.get(key)
        if left is None or now - left.at >= window:
            left = _Allowance(size_cap, rooms_cap, now, names_cap)
        else:
            elapsed = now - left.at
            left = _Allowance(
                min(size_cap, left.size + elapsed * size_cap / window),
                min(rooms_cap, left.rooms + elapsed * rooms_cap / window),
                now,
                min(names_cap, left.names + elapsed * names_cap / window),
            )
        if new_name and left.names < 1:
            return QuotaRefusal(
                ErrorCode.TOO_MANY_NAMES, max(1, math.ceil((1 - left.names) * window * 1000 / names_cap))
            )
        if new_room and left.rooms < 1:
            return QuotaRefusal(
                ErrorCode.TOO_MANY_ROOMS, max(1, math.ceil((1 - left.rooms) * window * 1000 / rooms_cap))
            )
        if left.size < size:
            return QuotaRefusal(
                ErrorCode.QUOTA_EXCEEDED, max(1, math.ceil((size - left.size) * window * 1000 / size_cap))
            )
        left.size -= size
        if new_room:
            left.rooms -= 1
        if new_name:
            left.names -= 1
        self._allowances[key] = left
        return None

    async def claim(self, folded: str, name: str, offered: str, new: str, *, take: bool) -> tuple[Claim, str, int]:
        # claim.lua, in Python (a claim that is only a ban has no token).
        now = time.monotonic()
        idle = self.settings.name_idle_days * 86_400
        held = self._claims.get(folded)
        if held is not None and _holds(held.banned, time.time() * 1000):
            return Claim.BANNED, held.name or name, held.banned
        if held is not None and held.token and held.until > now:
            if offered and held.token == offered:
                held.until = now + idle
                return Claim.OWNED, held.name, 0
            return Claim.TAKEN, held.name, 0
        if not take:
            return Claim.FREE, name, 0
        self._claims[folded] = _Claim(new, name, now + idle)
        return Claim.CLAIMED, name, 0

    async def release(self, folded: str, offered: str) -> bool:
        held = self._claims.get(folded)
        if held is None or not held.token or held.until <= time.monotonic():
            return True
        if held.token != offered:
            return False
        held.token, held.name = "", ""
        return True

    async def rules(self, room: str, folded: str, name: str) -> Rules:
        rules = self._moderated.get(room, _Room())
        now = time.time() * 1000
        banned, muted = rules.banned.get(folded, 0), rules.muted.get(folded, 0)
        presence = self._room_presence.get(room)
        return Rules(
            banned if _holds(banned, now) else None,
            muted if _holds(muted, now) else None,
            rules.slow,
            rules.sockets,
            presence.counts.get(name, 0) if presence is not None else 0,
        )

    async def moderate(self, room: str, rule: str, folded: str, value: int, frame: bytes, *, closes: bool) -> None:
        rules = self._moderated.setdefault(room, _Room())
        if rule in ("mute", "ban"):
            kept = rules.muted if rule == "mute" else rules.banned
            if value == 0:
                kept.pop(folded, None)
            else:
                kept[folded] = value
        elif rule == "slow":
            rules.slow = value
            rules.spoke.clear()
        elif rule == "sockets":
            rules.sockets = value
        self._publish(ModerationNotice(room, folded, closes, frame))

    async def ban_everywhere(self, folded: str, until: int) -> None:
        held = self._claims.setdefault(folded, _Claim("", "", 0.0))
        held.banned = until
        if until != 0:
            self._bans.append((folded, int(time.time() * 1000)))

    async def bans_since(self, millis: int) -> list[tuple[str, int]]:
        return [(folded, at) for folded, at in self._bans if at > millis]

    async def audit(self, entry: bytes) -> str:
        entry_id = f"{int(time.time() * 1000)}-{len(self._audit)}"
        self._audit.append((entry_id, entry))
        del self._audit[:-AUDIT_RETAIN]
        return entry_id

    async def audit_log(self, limit: int, before: str | None) -> list[tuple[str, bytes]]:
        older = [item for item in self._audit if before is None or _older(item[0], before)]
        return older[::-1][:limit]

    def _refuse_if_muted(self, rules: _Room, folded: str, now: float) -> None:
        muted = rules.muted.get(folded, 0)
        if _holds(muted, now):
            raise Refused(ErrorCode.MUTED, FOREVER if muted == FOREVER else math.ceil(muted - now))

    async def _presence_call(
        self, action: str, room: str, entries: Sequence[str], *, after: str | None, limit: int
    ) -> tuple[Online | None, int]:
        # presence.lua, in Python: the same changes, the same events, the same coalescing.
        settings = self.settings
        if action == "page" and room not in self._room_presence:
            return Online([], 0), 0  # as in Redis, reading a room nobody is in leaves nothing behind
        state = self._room_presence.setdefault(room, _RoomPresence())
        now = time.monotonic()
        unswept = state.sweep(now, self.sweep_max)
        if action == "join":
            [entry] = entries
            name = _name_of(entry)
            added = self._renew(state, entry, now)
            if added and state.gained(name):
                # As in presence.lua: the welcome's own read does not keep the joiner's change from cancelling out.
                state.read()
                state.change_reads[name] = state.reads
            else:
                state.read()
        elif action == "refresh":
            for entry in entries:
                if self._renew(state, entry, now):
                    state.gained(_name_of(entry))
        elif action == "leave":
            for entry in entries:
                if state.connections.pop(entry, None) is not None:
                    state.lost(_name_of(entry))
        wait_ms = 0
        if state.changes:
            interval = settings.presence_interval_ms / 1000
            if now - state.at >= interval:
                self._announce(room, state)
                state.at = now
            else:
                wait_ms = max(1, math.ceil((state.at + interval - now) * 1000))
        if unswept:
            wait_ms = 1
        online = None
        if action == "join":
            online = state.listed(None, settings.presence_list_max)
        elif action == "page":
            online = state.listed(after, limit)
            state.read()
        return online, wait_ms

    def _renew(self, state: _RoomPresence, entry: str, now: float) -> bool:
        """Renews (or adds) an entry; True when it was not there."""
        added = entry not in state.connections
        expiry = now + self.settings.presence_ttl
        state.connections[entry] = expiry
        heappush(state.expiries, (expiry, entry))
        return added

    def _announce(self, room: str, state: _RoomPresence) -> None:
        list_max = self.settings.presence_list_max
        joined = sorted(name for name, sign in state.changes.items() if sign == "+")
        left = sorted(name for name, sign in state.changes.items() if sign == "-")
        event, name = state.event, state.name
        if state.changes.get(name) != ("+" if event == "join" else "-"):
            # The last change undid an earlier one: another net change names the event.
            event, name = ("join", joined[0]) if joined else ("leave", left[0])
        truncated = len(joined) > list_max or len(left) > list_max
        frame = presence_frame(event, name, joined[:list_max], left[:list_max], len(state.names), truncated=truncated)
        state.changes.clear()
        state.change_reads.clear()
        state.reads = 0
        self._publish(Delivery(room, None, frame))

    def _publish(self, delivery: Delivery | TypingNotice | ModerationNotice) -> None:
        if delivery.room not in self._heard:
            return
        for queue in self._listeners:
            queue.put_nowait(delivery)

    async def subscribe(self, room: str) -> None:
        self._heard.add(room)  # confirmed at once: publishing is a call in this process

    async def unsubscribe(self, room: str) -> None:
        self._heard.discard(room)

    def subscribed(self) -> set[str]:
        return set(self._heard)

    async def listen(self, on_subscribed: OnSubscribed) -> AsyncIterator[Delivery | TypingNotice | ModerationNotice]:
        queue: asyncio.Queue[Delivery | TypingNotice | ModerationNotice] = asyncio.Queue()
        self._listeners.add(queue)
        try:
            await on_subscribed(set(self._heard))
            while True:
                yield await queue.get()
        finally:
            self._listeners.discard(queue)


def _name_of(entry: str) -> str:
    return entry.partition("|")[2]


def _holds(until: int, now: float) -> bool:
    """Whether a rule set until `until` (ms; FOREVER; 0: none) still holds."""
    return until == FOREVER or until > now


def _older(entry_id: str, than: str) -> bool:
    return (parse_message_id(entry_id) or (0, 0)) < (parse_message_id(than) or (0, 0))
