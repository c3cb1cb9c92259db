"""Who is typing in each room that has members on this replica: what they are told, and what this replica tells the
others.

A typing notice is never stored: it goes through Redis only so that every replica hears it (typing.lua). Its cost
does not follow how often people type: each replica publishes at most one notice per room per TYPING_INTERVAL,
naming its members who typed since the last, and sends its members at most one `typing` object per room per
TYPING_INTERVAL: the room's typists now, when that changed, and again every TYPING_RENEW while anyone types, so that a
client can let the indicator lapse when the objects stop (a replica that died). A name stops typing TYPING_TTL after
its last notice, or at once when its message arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from . import metrics
from .broker import Broker, BrokerUnavailable, Delivery, TypingNotice
from .protocol import typing_frame

# A connection's notices closer together than this are ignored (clients send one every 3 s while typing).
TYPING_NOTICE_GAP = 2.0
# A name is typing until this long after its last notice: longer than a client's gap between notices.
TYPING_TTL = 5.0
TYPING_INTERVAL = 1.0
TYPING_RENEW = 2.0
# Names a `typing` object lists (its count says how many there are), and a room's typists followed, at most.
TYPING_NAMES_SHOWN = 5
TYPING_FOLLOWED = 50


@dataclass(slots=True)
class _RoomTyping:
    # Names typing, with when they were last heard (monotonic seconds), the least recent first.
    heard: dict[str, float] = field(default_factory=dict)
    # This replica's members who typed since its last notice.
    outgoing: set[str] = field(default_factory=set)
    published_at: float = float("-inf")
    publishing: bool = False
    sent: tuple[tuple[str, ...], int] = ((), 0)
    sent_at: float = float("-inf")
    timer: asyncio.TimerHandle | None = None


class Typists:
    """Typing state of the rooms heard here; `send` reaches a room's local members (Rooms.deliver)."""

    def __init__(self, broker: Broker, send: Callable[[Delivery], None]) -> None:
        self.broker = broker
        self.send = send
        self._rooms: dict[str, _RoomTyping] = {}
        self._publishing: set[asyncio.Task[None]] = set()

    def typed(self, room: str, name: str) -> None:
        """A member of this replica is typing (its notice passed TYPING_NOTICE_GAP)."""
        state = self._rooms.setdefault(room, _RoomTyping())
        state.outgoing.add(name)
        self._wake(room, state)

    def said(self, room: str, name: str) -> None:
        """A member of this replica sent a message: it is no longer typing, whatever its last notice said."""
        state = self._rooms.get(room)
        if state is not None:
            state.outgoing.discard(name)

    def heard(self, notice: TypingNotice) -> None:
        """A notice from any replica (this one's too: its own notices come back through Redis like the others)."""
        state = self._rooms.get(notice.room)
        if state is None:
            state = self._rooms[notice.room] = _RoomTyping()
        now = time.monotonic()
        for name in notice.names[:TYPING_FOLLOWED]:
            state.heard.pop(name, None)
            state.heard[name] = now
        while len(state.heard) > TYPING_FOLLOWED:
            del state.heard[next(iter(state.heard))]
        self._wake(notice.room, state)

    def message(self, delivery: Delivery) -> None:
        """A message reached this replica: its sender's typing ends with it."""
        state = self._rooms.get(delivery.room)
        if state is None or not state.heard:
            return  # the usual case: nobody types, and the frame need not be read
        name = orjson.loads(delivery.frame).get("name")
        if name in state.heard:
            del state.heard[name]
            self._wake(delivery.room, state)

    def forget(self, room: str) -> None:
        """No members here any more."""
        state = self._rooms.pop(room, None)
        if state is not None and state.timer is not None:
            state.timer.cancel()

    def _wake(self, room: str, state: _RoomTyping) -> None:
        if state.timer is None:
            # At once after a quiet spell; the ticks that follow coalesce what comes meanwhile.
            state.timer = asyncio.get_running_loop().call_later(0, self._tick, room)

    def _tick(self, room: str) -> None:
        state = self._rooms.get(room)
        if state is None:
            return
        state.timer = None
        now = time.monotonic()
        if state.outgoing and not state.publishing and now - state.published_at >= TYPING_INTERVAL:
            published, state.outgoing = sorted(state.outgoing), set()
            state.published_at, state.publishing = now, True
            task = asyncio.get_running_loop().create_task(self._publish(room, state, published))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)
        for name in [name for name, at in state.heard.items() if now - at > TYPING_TTL]:
            del state.heard[name]
        names = tuple(reversed(state.heard))[:TYPING_NAMES_SHOWN]
        current = (tuple(sorted(names)), len(state.heard))
        if now - state.sent_at >= TYPING_INTERVAL and (
            current != state.sent or (state.heard and now - state.sent_at >= TYPING_RENEW)
        ):
            self.send(Delivery(room, None, typing_frame(room, names, len(state.heard))))
            state.sent, state.sent_at = current, now
        if state.heard or state.outgoing or current != state.sent:
            state.timer = asyncio.get_running_loop().call_later(TYPING_INTERVAL, self._tick, room)

    async def _publish(self, room: str, state: _RoomTyping, names: list[str]) -> None:
        try:
            with contextlib.suppress(BrokerUnavailable):  # typing is best effort: the next notice will do
                await self.broker.publish_typing(room, names)
                metrics.TYPING_PUBLISHED.inc()
        finally:
            state.publishing = False

    def stop(self) -> None:
        for room in list(self._rooms):
            self.forget(room)
        for task in self._publishing:
            task.cancel()
