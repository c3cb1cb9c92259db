"""Typing (typists.py), with the in-memory broker: a notice is published at once after a quiet spell and then at
most once per room per interval, however many members type; members get a `typing` list when it changes, a renewal
while it stands, and an empty one when it ends, by itself or at a message."""

from __future__ import annotations

import asyncio
import json

from infinite_chat.broker import Delivery, MemoryBroker, TypingNotice
from infinite_chat.config import Settings
from infinite_chat.protocol import message_body, message_frame
from infinite_chat.typists import TYPING_INTERVAL, TYPING_NAMES_SHOWN, Typists
from support.chat import eventually


class Room:
    """One room's typing as a replica runs it: its notices go through the broker and come back, as from Redis."""

    def __init__(self) -> None:
        self.broker = MemoryBroker(Settings(replica_name="unit"))
        self.sent: list[dict[str, object]] = []
        self.typists = Typists(self.broker, lambda delivery: self.sent.append(json.loads(delivery.frame)))
        self.published: list[TypingNotice] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Room:
        await self.broker.subscribe("lobby")
        self._task = asyncio.create_task(self._listen())
        return self

    async def _listen(self) -> None:
        async def nothing(rooms: object) -> None:
            return None

        async for item in self.broker.listen(nothing):
            if isinstance(item, TypingNotice):
                self.published.append(item)
                self.typists.heard(item)

    async def stop(self) -> None:
        self.typists.stop()
        assert self._task is not None
        self._task.cancel()


async def test_the_first_notice_goes_out_at_once_and_the_rest_of_the_interval_is_one_notice() -> None:
    room = await Room().start()
    room.typists.typed("lobby", "ann")
    await eventually(lambda: bool(room.sent), timeout=0.5, what="the first list, at once")
    assert room.sent[0] == {"type": "typing", "room": "lobby", "names": ["ann"], "count": 1}
    for n in range(30):
        room.typists.typed("lobby", f"fan{n}")
    await eventually(lambda: len(room.published) == 2, timeout=3 * TYPING_INTERVAL, what="the second notice")
    assert len(room.published[1].names) == 30
    await eventually(lambda: room.sent[-1]["count"] == 31, timeout=3 * TYPING_INTERVAL, what="the list of 31")
    assert len(room.sent[-1]["names"]) == TYPING_NAMES_SHOWN  # type: ignore[arg-type]
    assert len(room.published) == 2
    await room.stop()


async def test_a_message_ends_its_senders_typing_and_the_list_ends_empty() -> None:
    room = await Room().start()
    room.typists.typed("lobby", "ann")
    room.typists.typed("lobby", "bob")
    await eventually(lambda: bool(room.sent) and room.sent[-1]["count"] == 2, timeout=3, what="ann and bob")
    frame = message_frame("5-0", message_body("lobby", "ann", "hi", None))
    room.typists.message(Delivery("lobby", (5, 0), frame))
    await eventually(lambda: room.sent[-1]["names"] == ["bob"], timeout=3, what="ann gone at her message")
    # bob's notice lapses by itself: the last list is empty, and then nothing more is sent.
    await eventually(lambda: room.sent[-1]["count"] == 0, timeout=10, what="the empty list")
    assert room.sent[-1]["names"] == []
    count = len(room.sent)
    await asyncio.sleep(2 * TYPING_INTERVAL)  # nothing to wait for: checking that nothing more comes
    assert len(room.sent) == count
    await room.stop()
