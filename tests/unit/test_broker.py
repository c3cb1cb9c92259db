"""The in-memory twin's clock, moved by the test: what the contract suite (tests/system/test_broker_contract.py)
checks against Redis only as far as real time allows, here to the millisecond and over hours, in no time. And how
the Redis broker reads what its scripts publish, which needs no Redis."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from infinite_chat.broker import MemoryBroker, presence_entry
from infinite_chat.broker import memory as memory_module
from infinite_chat.broker.redis import _parse_published
from infinite_chat.config import Settings
from support.chat import eventually
from support.listening import Listener
from support.peer import settle


def broker(**settings: Any) -> MemoryBroker:
    return MemoryBroker(Settings(replica_name="unit", **settings))


class Clock:
    """The twin's monotonic clock, moved by the test: expiry and refill without waiting for them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(memory_module, "time", fake)
    return fake


async def test_an_entry_is_online_until_its_ttl_has_passed_to_the_millisecond(clock: Clock) -> None:
    chat = broker(presence_ttl=20.0)
    await chat.join("lobby", presence_entry("c1", "alice"))
    clock.now += 19.999
    assert (await chat.join("lobby", presence_entry("c2", "bob"))).names == ["alice", "bob"]
    clock.now += 0.001
    assert (await chat.join("lobby", presence_entry("c3", "carol"))).names == ["bob", "carol"]


async def test_renewed_entries_stay_for_as_long_as_they_are_renewed(clock: Clock) -> None:
    chat = broker(presence_ttl=20.0, presence_interval_ms=0)
    listener = await Listener(chat).ready("lobby")
    await chat.join("lobby", presence_entry("c1", "alice"))
    await chat.join("lobby", presence_entry("c2", "bob"))
    for _ in range(60):  # five minutes, bob renewed every 5 s
        clock.now += 5
        await chat.refresh("lobby", [presence_entry("c2", "bob")])
    await settle()
    events = [(o["event"], o["joined"], o["left"], o["online_count"]) for o in listener.objects("lobby")]
    assert events == [("join", ["alice"], [], 1), ("join", ["bob"], [], 2), ("leave", [], ["alice"], 1)]
    await listener.stop()


async def test_a_waiting_presence_change_goes_out_exactly_when_the_interval_ends(clock: Clock) -> None:
    chat = broker(presence_interval_ms=1000)
    listener = await Listener(chat).ready("lobby")
    await chat.join("lobby", presence_entry("c1", "alice"))
    await chat.join("lobby", presence_entry("c2", "bob"))
    clock.now += 0.999
    await chat._flush_presence("lobby")
    await settle()
    assert len(listener.objects("lobby")) == 1
    clock.now += 0.001
    await chat._flush_presence("lobby")
    await settle()
    assert [o["joined"] for o in listener.objects("lobby")] == [["alice"], ["bob"]]
    await chat.close()
    await listener.stop()


async def test_a_dead_replicas_many_entries_are_swept_in_bounded_batches_one_call_after_another(clock: Clock) -> None:
    chat = broker(presence_ttl=20.0, presence_interval_ms=0)
    chat.sweep_max = 4
    listener = await Listener(chat).ready("lobby")
    for n in range(10):
        await chat.join("lobby", presence_entry(f"d{n}", f"ghost-{n}"))
    await chat.join("lobby", presence_entry("c1", "alice"))
    clock.now += 19
    await chat.refresh("lobby", [presence_entry("c1", "alice")])
    clock.now += 1  # the ghosts' replica renewed nothing: all ten have expired
    await chat.refresh("lobby", [presence_entry("c1", "alice")])
    await settle()
    # One call swept four; it asked again at once, and so on until none was left.
    await eventually(lambda: listener.objects("lobby")[-1]["online_count"] == 1, timeout=2, what="the sweep")
    left = [o["left"] for o in listener.objects("lobby")[11:]]
    assert left == [[f"ghost-{n}" for n in range(4)], [f"ghost-{n}" for n in range(4, 8)], ["ghost-8", "ghost-9"]]
    await chat.close()
    await listener.stop()


async def test_an_address_allowance_refills_evenly_over_the_hour(clock: Clock) -> None:
    chat = broker(address_bytes_per_hour=100_000)
    assert await chat.charge("198.18.0.1", 100_000, new_room=False) is None
    refusal = await chat.charge("198.18.0.1", 50_000, new_room=False)
    assert refusal is not None
    assert refusal.retry_after_ms == 1_800_000
    clock.now += 1799
    assert await chat.charge("198.18.0.1", 50_000, new_room=False) is not None
    clock.now += 1
    assert await chat.charge("198.18.0.1", 50_000, new_room=False) is None
    clock.now += 7200  # long idle: full again, and never more than full
    assert await chat.charge("198.18.0.1", 100_000, new_room=False) is None
    assert await chat.charge("198.18.0.1", 1, new_room=False) is not None


def test_a_published_presence_event_becomes_the_frame_clients_get() -> None:
    published = b'lobby\n\nleave\nal\n3\n1\n["bob","carol"]\n["al"]'
    delivery = _parse_published(published)
    assert (delivery.room, delivery.id) == ("lobby", None)
    assert json.loads(delivery.frame) == {
        "type": "presence",
        "event": "leave",
        "name": "al",
        "joined": ["bob", "carol"],
        "left": ["al"],
        "online_count": 3,
        "truncated": True,
    }


def test_a_presence_event_of_the_release_before_reads_as_truncated() -> None:
    """Its list cannot say what changed; its last change and a truncated event (clients read the list) can."""
    delivery = _parse_published(b'lobby\n\njoin\nbob\n2\n["alice","bob"]')
    assert json.loads(delivery.frame) == {
        "type": "presence",
        "event": "join",
        "name": "bob",
        "joined": ["bob"],
        "left": [],
        "online_count": 2,
        "truncated": True,
    }
