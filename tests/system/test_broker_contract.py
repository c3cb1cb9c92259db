"""One contract for both brokers: every test here runs against the in-memory twin (MemoryBroker), against a real
Redis (RedisBroker, the project's own image through testcontainers) and against a real Redis Cluster of that image
(RedisBroker in cluster mode: three primaries with a replica each), so that the twin the unit tests use cannot drift
from what the Lua scripts do, and a cluster behaves as one Redis does. What only Redis has (subscriptions lost and
found, restarts, trimming by stream node, eviction) is in test_redis_broker.py, and a cluster's failover in
test_redis_cluster_broker.py.

For Redis, each call of `brokers()` is a broker of its own, as each replica has; the twin has no Redis to share, so
there it is one broker for the test, which is what one replica alone sees."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest

from infinite_chat.broker import (
    FOREVER,
    Broker,
    ChangeRefused,
    Delivery,
    LogRead,
    MemoryBroker,
    Online,
    RedisBroker,
    Refused,
    open_broker,
    presence_entry,
)
from infinite_chat.config import Settings
from infinite_chat.names import Claim, new_token, token_hash
from infinite_chat.protocol import (
    REACTION_NAMES_SHOWN,
    REACTIONS,
    REACTIONS_PER_MESSAGE,
    Change,
    Delete,
    Edit,
    ErrorCode,
    React,
    change_body,
    message_body,
    message_frame,
    parse_message_id,
)
from support.chat import eventually, eventually_async
from support.listening import Listener
from support.redis_server import ClusterServer, RedisServer


class Brokers:
    """Makes the brokers of one test, of one kind."""

    def __init__(self, kind: str, server: RedisServer | ClusterServer | None) -> None:
        self.kind = kind
        self.server = server
        self.made: list[Broker] = []

    def __call__(self, **settings: Any) -> Broker:
        if self.kind == "memory":
            if not self.made:
                self.made.append(MemoryBroker(Settings(replica_name="contract", **settings)))
            wanted = Settings(replica_name="contract", **settings)
            assert repr(self.made[0].settings) == repr(wanted), (
                "the twin is one broker: give each call the same settings"
            )
            return self.made[0]
        assert self.server is not None
        made = self.server.broker(**settings)
        self.made.append(made)
        return made


@pytest.fixture(params=["memory", "redis", "cluster"])
async def brokers(request: pytest.FixtureRequest) -> AsyncIterator[Brokers]:
    fixture = {"memory": None, "redis": "redis_server", "cluster": "redis_cluster"}[request.param]
    server = request.getfixturevalue(fixture) if fixture else None
    factory = Brokers(request.param, server)
    yield factory
    for made in factory.made:
        await made.close()


async def say(chat: Broker, room: str, text: str) -> str:
    return (await chat.append(room, message_body(room, "alice", text, None), name="alice", ref=None)).id


async def read(chat: Broker, room: str, position: str | None, **bounds: int) -> LogRead:
    limits = {"max_messages": 1000, "max_bytes": 1 << 20} | bounds
    return await chat.read_after(room, None if position is None else parse_message_id(position), **limits)


def texts(deliveries: list[Delivery]) -> list[str]:
    return [json.loads(delivery.frame)["text"] for delivery in deliveries]


def address() -> str:
    return f"198.18.{secrets.randbelow(255)}.{secrets.randbelow(255)}"


# ---- the log ---------------------------------------------------------------------------------------------------------


def test_the_replica_gets_redis_with_a_url_and_the_twin_without() -> None:
    assert isinstance(open_broker(Settings(replica_name="t")), MemoryBroker)
    assert isinstance(open_broker(Settings(replica_name="t", redis_url="redis://127.0.0.1:1/0")), RedisBroker)


async def test_ids_grow_strictly_even_within_one_millisecond(brokers: Brokers, room: str) -> None:
    chat = brokers()
    ids = [await say(chat, room, f"m{n}") for n in range(50)]
    parsed = [parse_message_id(message_id) for message_id in ids]
    assert None not in parsed
    assert parsed == sorted(set(parsed))  # type: ignore[type-var]


async def test_a_stored_message_reads_back_as_the_object_clients_get(brokers: Brokers, room: str) -> None:
    chat = brokers()
    body = message_body(room, "alice", "hi", "c-1")
    message_id = (await chat.append(room, body, name="alice", ref="c-1")).id
    [delivery] = await chat.recent(room, 25)
    assert delivery.frame == message_frame(message_id, body)
    assert delivery.id == parse_message_id(message_id)
    assert delivery.room == room
    obj = json.loads(delivery.frame)
    assert obj == {
        "type": "message",
        "id": message_id,
        "ts": obj["ts"],
        "room": room,
        "name": "alice",
        "text": "hi",
        "ref": "c-1",
    }


async def test_recent_is_the_newest_oldest_first_and_pages_back_with_before(brokers: Brokers, room: str) -> None:
    chat = brokers()
    ids = [await say(chat, room, f"m{n}") for n in range(10)]
    assert texts(await chat.recent(room, 3)) == ["m7", "m8", "m9"]
    assert texts(await chat.recent(room, 3, before=ids[7])) == ["m4", "m5", "m6"]
    assert texts(await chat.recent(room, 3, before=ids[1])) == ["m0"]
    assert await chat.recent(room, 3, before=ids[0]) == []
    assert await chat.recent(room, 3, before="0-0") == []
    assert await chat.recent(f"{room}-elsewhere", 3) == []


async def test_read_after_gives_what_follows_a_retained_id_and_nothing_for_an_unknown_one(
    brokers: Brokers, room: str
) -> None:
    chat = brokers()
    ids = [await say(chat, room, f"m{n}") for n in range(10)]
    after = await read(chat, room, ids[6])
    assert (texts(after.deliveries), after.found, after.complete) == (["m7", "m8", "m9"], True, True)
    assert await read(chat, room, ids[9]) == LogRead([], found=True, complete=True)
    assert await read(chat, room, "1-0") == LogRead([], found=False, complete=False)
    assert await read(chat, room, f"{ids[4].split('-')[0]}-999") == LogRead([], found=False, complete=False)
    # An id of another room's log is unknown here.
    assert await read(chat, f"{room}-other", ids[3]) == LogRead([], found=False, complete=False)
    assert texts((await read(chat, room, None)).deliveries) == [f"m{n}" for n in range(10)]


async def test_a_read_stops_at_its_bounds_in_messages_and_bytes_across_pages(brokers: Brokers, room: str) -> None:
    chat = brokers()
    ids = [await say(chat, room, f"{n:03d}") for n in range(250)]  # more than one page (LOG_PAGE is 100)
    everything = await read(chat, room, ids[0])
    assert (len(everything.deliveries), everything.complete) == (249, True)
    assert [d.id for d in everything.deliveries] == [parse_message_id(i) for i in ids[1:]]
    by_count = await read(chat, room, ids[0], max_messages=150)
    assert (len(by_count.deliveries), by_count.complete) == (150, False)
    exactly = await read(chat, room, ids[99], max_messages=150)
    assert (len(exactly.deliveries), exactly.complete) == (150, True)
    # Frames differ by a few bytes (ids have more or fewer digits): the bound falls inside the 121st.
    first_120 = sum(len(d.frame) for d in everything.deliveries[:120])
    by_bytes = await read(chat, room, ids[0], max_bytes=first_120 + 10)
    assert (len(by_bytes.deliveries), by_bytes.complete) == (120, False)


async def test_the_log_keeps_at_least_retain_messages_and_older_ids_become_unknown(brokers: Brokers, room: str) -> None:
    chat = brokers(retain=100)
    ids = [await say(chat, room, f"m{n}") for n in range(400)]
    assert not (await read(chat, room, ids[0])).found
    assert texts((await read(chat, room, ids[-3])).deliveries) == ["m398", "m399"]
    kept = (await read(chat, room, None)).deliveries
    assert 100 <= len(kept) < 400  # Redis trims whole stream nodes (MAXLEN ~): at least RETAIN stay
    assert texts(kept)[-1] == "m399"


async def test_listeners_hear_every_append_in_log_order(brokers: Brokers, room: str) -> None:
    first, second, hearing = brokers(), brokers(), brokers()
    listener = await Listener(hearing).ready(room)
    sent = await asyncio.gather(
        *(say(first, room, f"a{n}") for n in range(40)), *(say(second, room, f"b{n}") for n in range(40))
    )
    stored = (await read(first, room, None)).deliveries
    assert {d.id for d in stored} == {parse_message_id(message_id) for message_id in sent}
    await eventually(lambda: len(listener.objects(room)) == 80, timeout=10, what="all 80 published")
    heard = [d for d in listener.got if d.room == room]
    # Published in the order of the log, and the same objects the log gives back.
    assert [d.frame for d in heard] == [d.frame for d in stored]
    await listener.stop()


async def test_a_listener_hears_only_the_rooms_it_subscribed_to_from_the_moment_it_is_confirmed(
    brokers: Brokers, room: str
) -> None:
    chat, hearing = brokers(), brokers()
    other = f"{room}-other"
    await say(chat, room, "before the subscription")
    listener = await Listener(hearing).ready(room)
    await say(chat, other, "in a room not heard")
    await say(chat, room, "heard")
    await eventually(lambda: len(listener.objects(room)) == 1, timeout=10, what="the message in the room heard")
    assert hearing.subscribed() == {room}

    await hearing.unsubscribe(room)
    await listener.hear(other)  # confirmed after the unsubscription: the same connection, in order
    await say(chat, room, "after the unsubscription")
    await say(chat, other, "now heard")
    await eventually(lambda: len(listener.objects(other)) == 1, timeout=10, what="the other room, now heard")
    assert [o["text"] for o in listener.objects(room)] == ["heard"]
    assert [o["text"] for o in listener.objects(other)] == ["now heard"]
    assert hearing.subscribed() == {other}
    await listener.stop()


async def test_what_is_said_right_after_a_confirmed_subscription_is_heard(brokers: Brokers, room: str) -> None:
    chat, hearing = brokers(), brokers()
    listener = await Listener(hearing).ready()
    rooms = [f"{room}-{n}" for n in range(30)]
    for each in rooms:
        await listener.hear(each)
        await say(chat, each, "first")  # the moment subscribe returns
    await eventually(lambda: all(listener.objects(each) for each in rooms), timeout=10, what="every first message")
    assert [len(listener.objects(each)) for each in rooms] == [1] * 30
    await listener.stop()


async def test_a_say_retried_with_the_same_name_and_ref_is_stored_once(brokers: Brokers, room: str) -> None:
    first, second, hearing = brokers(), brokers(), brokers()
    listener = await Listener(hearing).ready(room)
    body = message_body(room, "alice", "once", "r-1")
    stored = await first.append(room, body, name="alice", ref="r-1")
    assert not stored.retried
    assert stored.repeat is None
    # Again, through another replica's broker: nothing stored, and the answer is the message of the first try.
    again = await second.append(room, message_body(room, "alice", "once", "r-1"), name="alice", ref="r-1")
    assert again.retried
    assert again.id == stored.id
    assert again.repeat is not None
    assert again.repeat.frame == message_frame(stored.id, body)
    # Another name's ref, or a say without a ref, is its own message.
    bob = await first.append(room, message_body(room, "bob", "mine", "r-1"), name="bob", ref="r-1")
    plain = [
        await first.append(room, message_body(room, "alice", "no ref", None), name="alice", ref=None) for _ in "ab"
    ]
    assert not bob.retried
    assert not any(p.retried for p in plain)
    log = (await read(first, room, None)).deliveries
    assert texts(log) == ["once", "mine", "no ref", "no ref"]
    await eventually(lambda: len(listener.objects(room)) == 4, timeout=10, what="four messages published")
    assert [o["text"] for o in listener.objects(room)] == ["once", "mine", "no ref", "no ref"]
    await listener.stop()


async def test_a_ref_is_forgotten_after_the_retry_window(brokers: Brokers, room: str) -> None:
    chat = brokers(retry_window=1)
    await chat.append(room, message_body(room, "alice", "first", "r-1"), name="alice", ref="r-1")
    assert (await chat.append(room, message_body(room, "alice", "first", "r-1"), name="alice", ref="r-1")).retried

    async def stored_anew() -> bool:
        return not (
            await chat.append(room, message_body(room, "alice", "later", "r-1"), name="alice", ref="r-1")
        ).retried

    # Remembered for one to two windows: within three seconds a new say with that ref is stored.
    deadline = asyncio.get_running_loop().time() + 5
    while not await stored_anew():
        assert asyncio.get_running_loop().time() < deadline, "the ref was still remembered after 5 s"
        await asyncio.sleep(0.2)
    assert texts((await read(chat, room, None)).deliveries)[0] == "first"


# ---- presence --------------------------------------------------------------------------------------------------------


def presence(event: str, name: str, joined: list[str], left: list[str], count: int) -> dict[str, Any]:
    return {"type": "presence", "event": event, "name": name, "joined": joined, "left": left, "online_count": count}


async def test_presence_is_by_name_and_each_event_carries_the_change_and_the_count(brokers: Brokers, room: str) -> None:
    chat = brokers(presence_list_max=2, presence_interval_ms=0)
    listener = await Listener(brokers(presence_list_max=2, presence_interval_ms=0)).ready(room)
    assert await chat.join(room, presence_entry("c1", "carol")) == Online(["carol"], 1)
    await chat.join(room, presence_entry("c2", "alice"))
    await chat.join(room, presence_entry("c3", "alice"))  # a second tab: alice is online already
    # The welcome's list: the first PRESENCE_LIST_MAX names by code point ("Z" before "a"), and the full count.
    assert await chat.join(room, presence_entry("c4", "Zoë 🚀")) == Online(["Zoë 🚀", "alice"], 3)
    await chat.leave(room, presence_entry("c2", "alice"))  # alice is still online in her other tab
    await chat.leave(room, presence_entry("c3", "alice"))
    await chat.leave(room, presence_entry("c3", "alice"))  # twice: nothing more
    await chat.leave(room, presence_entry("c1", "carol"))
    await chat.leave(room, presence_entry("c4", "Zoë 🚀"))
    await eventually(lambda: len(listener.objects(room)) >= 6, timeout=10, what="presence events")
    assert listener.objects(room) == [
        presence("join", "carol", ["carol"], [], 1),
        presence("join", "alice", ["alice"], [], 2),
        presence("join", "Zoë 🚀", ["Zoë 🚀"], [], 3),
        presence("leave", "alice", [], ["alice"], 2),
        presence("leave", "carol", [], ["carol"], 1),
        presence("leave", "Zoë 🚀", [], ["Zoë 🚀"], 0),  # empty lists are lists, not objects
    ]
    assert all(d.id is None and d.room == room for d in listener.got if d.room == room)
    await listener.stop()


async def test_a_coalesced_event_carries_exactly_the_net_change_since_the_last_one(brokers: Brokers, room: str) -> None:
    chat = brokers(presence_interval_ms=400)
    listener = await Listener(brokers(presence_interval_ms=400)).ready(room)
    await chat.join(room, presence_entry("c1", "alice"))  # at once
    await chat.join(room, presence_entry("c2", "zed"))  # at the end of the interval
    await eventually(lambda: len(listener.objects(room)) == 2, timeout=10, what="zed's event")
    # Within one interval: names that came and went, or went and came back, cancel out; tabs are one name.
    for action, entry in [
        ("leave", ("c2", "zed")),
        ("join", ("c3", "bob")),
        ("leave", ("c3", "bob")),
        ("join", ("c4", "carol")),
        ("leave", ("c1", "alice")),
        ("join", ("c5", "alice")),
        ("join", ("c6", "dave")),
        ("join", ("c7", "dave")),
        ("leave", ("c6", "dave")),
        ("join", ("c8", "erin")),
        ("leave", ("c8", "erin")),
    ]:
        await getattr(chat, action)(room, presence_entry(*entry))
    await eventually(lambda: len(listener.objects(room)) >= 3, timeout=10, what="the coalesced event")
    assert listener.objects(room) == [
        presence("join", "alice", ["alice"], [], 1),
        presence("join", "zed", ["zed"], [], 2),
        # The last change (erin leaving) undid one before it: another change of the event names it.
        presence("join", "carol", ["carol", "dave"], ["zed"], 3),
    ]
    # Everything cancelled out: no event at all.
    await chat.join(room, presence_entry("c9", "frank"))
    await chat.leave(room, presence_entry("c9", "frank"))
    await asyncio.sleep(0.6)  # past the interval, so the flush has run
    assert len(listener.objects(room)) == 3
    await listener.stop()


async def test_a_change_undone_after_someone_read_the_list_is_announced_as_it_stands(
    brokers: Brokers, room: str
) -> None:
    """A welcome (or a page of the list) shows the room mid-interval; the next event must bring that reader to the
    truth too, so a change it saw is announced even if it is undone before the event (not if it is the reader's own)."""
    chat = brokers(presence_interval_ms=400)
    listener = await Listener(brokers(presence_interval_ms=400)).ready(room)
    await chat.join(room, presence_entry("c1", "alice"))
    await chat.join(room, presence_entry("c2", "zed"))
    await chat.join(room, presence_entry("c3", "dave"))
    await eventually(lambda: len(listener.objects(room)) == 2, timeout=10, what="the second event")
    await chat.leave(room, presence_entry("c2", "zed"))
    welcome = await chat.join(room, presence_entry("c4", "carol"))  # carol's welcome: zed has gone
    assert welcome == Online(["alice", "carol", "dave"], 3)
    await chat.join(room, presence_entry("c5", "zed"))  # and is back
    await chat.join(room, presence_entry("c6", "bob"))  # bob's own welcome saw him come: he went before anyone else did
    await chat.leave(room, presence_entry("c6", "bob"))
    await chat.leave(room, presence_entry("c3", "dave"))
    page = await chat.online(room, 10)  # a page read while dave is gone
    assert page == Online(["alice", "carol", "zed"], 3)
    await chat.join(room, presence_entry("c7", "dave"))  # and back
    await eventually(lambda: len(listener.objects(room)) == 3, timeout=10, what="the coalesced event")
    event = listener.objects(room)[2]
    assert event == presence("join", "dave", ["carol", "dave", "zed"], [], 4)
    # Each reader's list with the event applied is who is online.
    for seen in (welcome.names, page.names):
        assert sorted((set(seen) | set(event["joined"])) - set(event["left"])) == ["alice", "carol", "dave", "zed"]
    await listener.stop()


async def test_an_event_with_more_changes_than_its_lists_hold_says_truncated(brokers: Brokers, room: str) -> None:
    chat = brokers(presence_list_max=3, presence_interval_ms=300)
    listener = await Listener(brokers(presence_list_max=3, presence_interval_ms=300)).ready(room)
    await chat.join(room, presence_entry("c0", "alice"))
    for n in range(5):
        await chat.join(room, presence_entry(f"c{n + 1}", f"bob-{n}"))
    await chat.leave(room, presence_entry("c0", "alice"))
    await eventually(lambda: len(listener.objects(room)) == 2, timeout=10, what="the coalesced event")
    assert listener.objects(room)[1] == {
        **presence("leave", "alice", ["bob-0", "bob-1", "bob-2"], ["alice"], 5),
        "truncated": True,
    }
    await listener.stop()


async def test_who_is_online_pages_by_name_after_a_name(brokers: Brokers, room: str) -> None:
    chat = brokers()
    names = ["Zoë", "alice", "zoé", "ßeta", "émile", "日本", "😀 smile"]  # by code point, as UTF-8 bytes sort
    for n, name in enumerate(reversed(names)):
        await chat.join(room, presence_entry(f"c{n}", name))
    await chat.join(room, presence_entry("tab", "alice"))
    assert await chat.online(room, 3) == Online(names[:3], 7)
    assert await chat.online(room, 3, after="zoé") == Online(names[3:6], 7)
    assert await chat.online(room, 3, after="日本") == Online(names[6:], 7)
    assert await chat.online(room, 3, after="😀 smile") == Online([], 7)
    assert await chat.online(room, 100, after="b") == Online(names[2:], 7)  # `after` need not be online
    assert await chat.online(room, 100) == Online(names, 7)
    assert await chat.online(f"{room}-empty", 10) == Online([], 0)


async def test_entries_not_renewed_expire_and_a_renewal_brings_them_back(brokers: Brokers, room: str) -> None:
    chat = brokers(presence_ttl=1.0, presence_interval_ms=0)
    listener = await Listener(brokers(presence_ttl=1.0, presence_interval_ms=0)).ready(room)
    await chat.join(room, presence_entry("c1", "alice"))
    await chat.join(room, presence_entry("c2", "bob"))
    await chat.join(room, presence_entry("c3", "bob"))  # bob's other tab, on the replica that dies
    joined_at = time.monotonic()

    def left() -> list[dict[str, Any]]:
        return [o for o in listener.objects(room) if o["event"] == "leave"]

    async def bob_renewed_and_alice_gone() -> bool:
        # What bob's replica does every PRESENCE_TTL / 4; alice's replica died and renews nothing.
        await chat.refresh(room, [presence_entry("c2", "bob")])
        await asyncio.sleep(0.05)  # the event, if any, travels through pub/sub
        return bool(left())

    await eventually_async(bob_renewed_and_alice_gone, timeout=10, what="alice's entry expiring", interval=0.2)
    assert time.monotonic() - joined_at >= 0.9  # not before her time to live
    assert left() == [presence("leave", "alice", [], ["alice"], 1)]  # and bob, with a tab left, stays
    assert await chat.online(room, 10) == Online(["bob"], 1)
    # Her replica was only cut off from Redis: its next renewal brings her back.
    await chat.refresh(room, [presence_entry("c1", "alice"), presence_entry("c2", "bob")])
    await eventually(lambda: listener.objects(room)[-1]["event"] == "join", timeout=10, what="alice back")
    assert listener.objects(room)[-1] == presence("join", "alice", ["alice"], [], 2)
    await listener.stop()


async def test_many_expired_entries_are_swept_a_bounded_batch_per_call_until_none_is_left(
    brokers: Brokers, room: str
) -> None:
    chat = brokers(presence_ttl=1.0, presence_interval_ms=0)
    chat.sweep_max = 3
    listener = await Listener(brokers(presence_ttl=1.0, presence_interval_ms=0)).ready(room)
    ghosts = [f"ghost-{n:02d}" for n in range(10)]
    for n, ghost in enumerate(ghosts):
        await chat.join(room, presence_entry(f"d{n:02d}", ghost))
    await chat.join(room, presence_entry("c1", "alice"))

    def gone() -> list[str]:
        return [name for o in listener.objects(room) for name in o["left"]]

    async def alice_renewed_and_ghosts_gone() -> bool:
        await chat.refresh(room, [presence_entry("c1", "alice")])
        await asyncio.sleep(0.05)
        return len(gone()) == len(ghosts)

    await eventually_async(alice_renewed_and_ghosts_gone, timeout=10, what="every ghost swept", interval=0.3)
    leaves = [o for o in listener.objects(room) if o["left"]]
    assert all(len(o["left"]) <= 3 for o in leaves)  # no call swept more than its bound
    assert sorted(gone()) == ghosts
    assert leaves[-1]["online_count"] == 1
    await listener.stop()


async def test_a_burst_of_presence_changes_is_one_event_per_interval(brokers: Brokers, room: str) -> None:
    chat = brokers(presence_interval_ms=500)
    listener = await Listener(brokers(presence_interval_ms=500)).ready(room)
    await chat.join(room, presence_entry("c1", "alice"))
    started = time.monotonic()
    for n in range(30):
        await chat.join(room, presence_entry(f"x{n}", f"churn-{n}"))
        await chat.leave(room, presence_entry(f"x{n}", f"churn-{n}"))
    await chat.join(room, presence_entry("c2", "bob"))
    # The first change at once, then one event carrying the net change of the rest, when the interval is over.
    await eventually(lambda: len(listener.objects(room)) >= 2, timeout=10, what="the coalesced event")
    assert time.monotonic() - started >= 0.4
    assert listener.objects(room) == [
        presence("join", "alice", ["alice"], [], 1),
        presence("join", "bob", ["bob"], [], 2),
    ]
    await listener.stop()


async def test_a_waiting_change_is_published_by_the_next_call_once_due(brokers: Brokers, room: str) -> None:
    """If the replica that was to publish a waiting change is gone, any later presence call in the room does."""
    chat = brokers(presence_interval_ms=300)
    listener = await Listener(brokers(presence_interval_ms=300)).ready(room)
    await chat.join(room, presence_entry("c1", "alice"))
    await chat.join(room, presence_entry("c2", "bob"))
    chat._stop_presence_flushes()  # as if this replica were gone
    await asyncio.sleep(0.4)  # past the interval, with nobody to publish
    assert len(listener.objects(room)) == 1
    await chat.refresh(room, [presence_entry("c1", "alice")])
    await eventually(lambda: len(listener.objects(room)) == 2, timeout=10, what="the waiting change")
    assert listener.objects(room)[-1] == presence("join", "bob", ["bob"], [], 2)
    await listener.stop()


# ---- allowances ------------------------------------------------------------------------------------------------------


async def test_an_address_allowance_refuses_past_its_bytes_with_the_time_to_wait(brokers: Brokers) -> None:
    first, second = brokers(address_bytes_per_hour=100_000), brokers(address_bytes_per_hour=100_000)
    attacker = address()
    assert await first.charge(attacker, 60_000, new_room=False) is None
    refusal = await second.charge(attacker, 60_000, new_room=False)  # shared by every replica
    assert refusal is not None
    assert refusal.code == "quota_exceeded"
    assert refusal.retry_after_ms == pytest.approx(720_000, rel=0.02)  # 20,000 bytes at 100,000 an hour
    assert await second.charge(attacker, 30_000, new_room=False) is None  # what is left is still there
    assert await first.charge(address(), 60_000, new_room=False) is None  # another address has its own


async def test_an_address_may_create_only_so_many_rooms_an_hour(brokers: Brokers) -> None:
    chat = brokers(address_rooms_per_hour=3)
    creator = address()
    for _ in range(3):
        assert await chat.charge(creator, 100, new_room=True) is None
    refusal = await chat.charge(creator, 100, new_room=True)
    assert refusal is not None
    assert (refusal.code, refusal.retry_after_ms) == ("too_many_rooms", pytest.approx(1_200_000, rel=0.02))
    assert await chat.charge(creator, 100, new_room=False) is None  # existing rooms are fine


# ---- changes to messages: edits, deletions, reactions ----------------------------------------------------------------


async def change(
    chat: Broker,
    room: str,
    kind: Change,
    target: str,
    name: str = "alice",
    *,
    text: str = "",
    emoji: str = "👍",
    on: bool = True,
) -> str:
    command: Edit | Delete | React
    if kind is Change.EDIT:
        command = Edit(target, text, None)
    elif kind is Change.DELETE:
        command = Delete(target, None)
    else:
        command = React(target, emoji, on, None)
    body = change_body(room, name, command)
    return await chat.change(room, kind, target, body, name=name, emoji=emoji, on=on)


async def refused(code: ErrorCode, made: Awaitable[str]) -> None:
    with pytest.raises(ChangeRefused) as caught:
        await made
    assert caught.value.code is code


async def test_changes_are_entries_after_the_message_and_history_shows_the_message_as_it_now_is(
    brokers: Brokers, room: str
) -> None:
    chat = brokers()
    kept = await say(chat, room, "first @bob")
    gone = await say(chat, room, "second")
    edit = await change(chat, room, Change.EDIT, kept, text="first, edited @carol")
    await change(chat, room, Change.REACT, kept, "bob", emoji="👍")
    await change(chat, room, Change.REACT, kept, "carol", emoji="👍")
    await change(chat, room, Change.REACT, kept, "carol", emoji="🎉")
    await change(chat, room, Change.REACT, gone, "bob", emoji="🔥")
    await change(chat, room, Change.DELETE, gone)
    # The history: messages only, each as it now is.
    first, second = [json.loads(d.frame) for d in await chat.recent(room, 25)]
    assert (first["id"], first["text"], first["mentions"]) == (kept, "first, edited @carol", ["carol"])
    assert first["edited"] == json.loads((await read(chat, room, kept)).deliveries[1].frame)["ts"]
    assert first["reactions"] == [
        {"emoji": "👍", "count": 2, "names": ["bob", "carol"]},
        {"emoji": "🎉", "count": 1, "names": ["carol"]},
    ]
    assert second["id"] == gone
    assert {"text", "reactions", "mentions"}.isdisjoint(second)
    assert second["deleted"] >= second["ts"]
    # The log after the first message: the second, then each change in order, each with its id and time.
    after = [json.loads(d.frame) for d in (await read(chat, room, kept)).deliveries]
    assert [obj["type"] for obj in after] == [
        "message",
        "edit",
        "reaction",
        "reaction",
        "reaction",
        "reaction",
        "delete",
    ]
    assert after[0]["id"] == gone
    assert "text" not in after[0]  # a resume shows it as it now is, too
    assert (after[1]["id"], after[1]["target"], after[1]["text"]) == (edit, kept, "first, edited @carol")
    assert [(o["name"], o["emoji"], o["on"], o["count"]) for o in after[2:6]] == [
        ("bob", "👍", True, 1),
        ("carol", "👍", True, 2),
        ("carol", "🎉", True, 1),
        ("bob", "🔥", True, 1),
    ]
    assert after[6]["target"] == gone
    assert "text" not in after[6]


async def test_listeners_hear_changes_in_log_order_with_the_messages(brokers: Brokers, room: str) -> None:
    chat, hearing = brokers(), brokers()
    listener = await Listener(hearing).ready(room)
    target = await say(chat, room, "hello")
    await change(chat, room, Change.EDIT, target, text="hello again")
    await say(chat, room, "next")
    await change(chat, room, Change.REACT, target, "bob", on=True)
    await change(chat, room, Change.REACT, target, "bob", on=False)
    await eventually(lambda: len(listener.objects(room)) == 5, timeout=10, what="all five published")
    heard = listener.objects(room)
    assert [o["type"] for o in heard] == ["message", "edit", "message", "reaction", "reaction"]
    assert [o.get("count") for o in heard[3:]] == [1, 0]
    assert [o["id"] for o in heard] == [json.loads(d.frame)["id"] for d in (await read(chat, room, None)).deliveries]
    await listener.stop()


async def test_a_change_is_refused_with_its_reason_and_stores_nothing(brokers: Brokers, room: str) -> None:
    chat = brokers(edit_window=900)
    mine = await say(chat, room, "mine")
    await refused(ErrorCode.UNKNOWN_MESSAGE, change(chat, room, Change.EDIT, "1-1", text="x"))
    await refused(ErrorCode.NOT_YOURS, change(chat, room, Change.EDIT, mine, "mallory", text="x"))
    await refused(ErrorCode.NOT_YOURS, change(chat, room, Change.DELETE, mine, "mallory"))
    await refused(ErrorCode.NO_CHANGE, change(chat, room, Change.EDIT, mine, text="mine"))
    await refused(ErrorCode.NO_CHANGE, change(chat, room, Change.REACT, mine, on=False))
    await change(chat, room, Change.REACT, mine)
    await refused(ErrorCode.NO_CHANGE, change(chat, room, Change.REACT, mine))
    reaction = await change(chat, room, Change.REACT, mine, on=False)
    # A change is not a message: it cannot be changed itself.
    await refused(ErrorCode.UNKNOWN_MESSAGE, change(chat, room, Change.REACT, reaction))
    await change(chat, room, Change.DELETE, mine)
    await refused(ErrorCode.NO_CHANGE, change(chat, room, Change.DELETE, mine))
    await refused(ErrorCode.MESSAGE_DELETED, change(chat, room, Change.EDIT, mine, text="back"))
    await refused(ErrorCode.MESSAGE_DELETED, change(chat, room, Change.REACT, mine))
    kinds = [json.loads(d.frame)["type"] for d in (await read(chat, room, None)).deliveries]
    assert kinds == ["message", "reaction", "reaction", "delete"]


async def test_an_edit_after_the_window_is_refused(brokers: Brokers, room: str) -> None:
    chat = brokers(edit_window=1)
    target = await say(chat, room, "quick")
    await change(chat, room, Change.EDIT, target, text="quick edit")
    # The window is measured from the message's time (its id), on Redis's clock.
    await eventually_async(
        lambda: _edit_refused(chat, room, target), timeout=10, what="the edit window closing after a second"
    )


async def _edit_refused(chat: Broker, room: str, target: str) -> bool:
    try:
        await change(chat, room, Change.EDIT, target, text=f"late {time.monotonic()}")
    except ChangeRefused as refusal:
        if refusal.code is not ErrorCode.EDIT_WINDOW_CLOSED:
            raise
        return True
    return False


async def test_a_message_holds_a_bounded_number_of_reactions(brokers: Brokers, room: str) -> None:
    chat = brokers()
    target = await say(chat, room, "popular")
    for n in range(REACTIONS_PER_MESSAGE):
        await change(chat, room, Change.REACT, target, f"fan{n}", emoji=REACTIONS[n % len(REACTIONS)])
    await refused(ErrorCode.TOO_MANY_REACTIONS, change(chat, room, Change.REACT, target, "late"))
    [message] = [json.loads(d.frame) for d in await chat.recent(room, 1)]
    counts = {reaction["emoji"]: reaction["count"] for reaction in message["reactions"]}
    assert sum(counts.values()) == REACTIONS_PER_MESSAGE
    assert all(len(reaction["names"]) <= REACTION_NAMES_SHOWN for reaction in message["reactions"])
    # Taking one away makes room again.
    await change(chat, room, Change.REACT, target, "fan0", emoji=REACTIONS[0], on=False)
    await change(chat, room, Change.REACT, target, "late")


async def test_history_looks_past_changes_for_its_messages_within_a_bound(brokers: Brokers, room: str) -> None:
    chat = brokers()
    early = await say(chat, room, "early")
    later = await say(chat, room, "later")
    for n in range(150):
        await change(chat, room, Change.REACT, later, f"fan{n}", emoji="👍")
    assert [json.loads(d.frame)["id"] for d in await chat.recent(room, 25)] == [early, later]
    assert [json.loads(d.frame)["id"] for d in await chat.recent(room, 25, before=later)] == [early]


async def test_typing_notices_reach_every_listener_of_the_room_and_are_not_stored(brokers: Brokers, room: str) -> None:
    chat, hearing = brokers(), brokers()
    listener = await Listener(hearing).ready(room)
    await chat.publish_typing(room, ["ann", "bob"])
    await eventually(lambda: bool(listener.typing), timeout=10, what="the typing notice")
    assert [(notice.room, notice.names) for notice in listener.typing] == [(room, ("ann", "bob"))]
    assert (await read(chat, room, None)).deliveries == []
    await listener.stop()


# ---- owned names ------------------------------------------------------------------------------------------------


async def test_a_free_name_is_claimed_by_the_first_and_refused_to_any_other_token(brokers: Brokers) -> None:
    first, second = brokers(), brokers()
    folded = f"alice-{secrets.token_hex(4)}"
    hers, other = token_hash(new_token()), token_hash(new_token())
    assert await first.claim(folded, "Alice", "", hers, take=False) == (Claim.FREE, "Alice", 0)
    assert await first.claim(folded, "Alice", "", hers, take=True) == (Claim.CLAIMED, "Alice", 0)
    # On any replica: hers with her token (under the first spelling, however she spells it now), nobody else's.
    assert await second.claim(folded, "ALICE", hers, other, take=True) == (Claim.OWNED, "Alice", 0)
    assert await second.claim(folded, "alice", other, other, take=True) == (Claim.TAKEN, "Alice", 0)
    assert await second.claim(folded, "alice", "", other, take=True) == (Claim.TAKEN, "Alice", 0)
    assert not await second.release(folded, other)
    assert await first.claim(folded, "alice", hers, other, take=False) == (Claim.OWNED, "Alice", 0)


async def test_a_released_name_is_free_for_the_next_join(brokers: Brokers) -> None:
    first, second = brokers(), brokers()
    folded = f"bob-{secrets.token_hex(4)}"
    his, next_owner = token_hash(new_token()), token_hash(new_token())
    assert (await first.claim(folded, "bob", "", his, take=True))[0] is Claim.CLAIMED
    assert await second.release(folded, his)
    assert await second.release(folded, his)  # nobody's already: released
    assert await first.claim(folded, "Bob", his, next_owner, take=True) == (Claim.CLAIMED, "Bob", 0)
    assert await second.claim(folded, "bob", his, his, take=False) == (Claim.TAKEN, "Bob", 0)


async def test_an_address_may_claim_only_so_many_new_names_an_hour(brokers: Brokers) -> None:
    chat = brokers(address_names_per_hour=2)
    claimer = address()
    for _ in range(2):
        assert await chat.charge(claimer, 0, new_room=False, new_name=True) is None
    refusal = await chat.charge(claimer, 0, new_room=False, new_name=True)
    assert refusal is not None
    assert (refusal.code, refusal.retry_after_ms) == ("too_many_names", pytest.approx(1_800_000, rel=0.02))
    assert await chat.charge(claimer, 100, new_room=True) is None  # rooms and bytes are counted apart
    assert await chat.charge(address(), 0, new_room=False, new_name=True) is None


# ---- moderation -------------------------------------------------------------------------------------------------


async def test_a_mute_and_slow_mode_hold_back_messages_and_changes_in_the_store_itself(
    brokers: Brokers, room: str
) -> None:
    first, second = brokers(), brokers()
    said = await first.append(room, message_body(room, "ann", "hi", None), name="ann", ref=None, folded="ann")
    until = int(time.time() * 1000) + 60_000
    await first.moderate(room, "mute", "ann", until, b'{"type":"moderation"}', closes=False)
    # On another replica, at once: the rule is where the message would be stored.
    with pytest.raises(Refused) as muted:
        await second.append(room, message_body(room, "ann", "again", None), name="ann", ref=None, folded="ann")
    assert muted.value.code == "muted"
    assert 0 < muted.value.retry_after_ms <= 60_000
    react = React(said.id, "👍", True, None)
    with pytest.raises(Refused):
        await second.change(
            room, Change.REACT, said.id, change_body(room, "ann", react), name="ann", emoji="👍", folded="ann"
        )
    # A moderator is not held back; a deletion of one's own message is allowed.
    await second.append(
        room, message_body(room, "ann", "mod", None), name="ann", ref=None, folded="ann", moderator=True
    )
    delete = Delete(said.id, None)
    await second.change(room, Change.DELETE, said.id, change_body(room, "ann", delete), name="ann", folded="ann")
    assert (await second.rules(room, "ann", "ann")).muted_until == until
    await first.moderate(room, "mute", "ann", 0, b'{"type":"moderation"}', closes=False)
    assert (await second.rules(room, "ann", "ann")).muted_until is None

    await first.moderate(room, "slow", "", 30, b'{"type":"moderation"}', closes=False)
    assert (await second.rules(room, "bob", "bob")).slow_seconds == 30
    await second.append(room, message_body(room, "bob", "one", None), name="bob", ref=None, folded="bob")
    with pytest.raises(Refused) as slow:
        await first.append(room, message_body(room, "bob", "two", None), name="bob", ref=None, folded="bob")
    assert slow.value.code == "slow_mode"
    assert 0 < slow.value.retry_after_ms <= 30_000
    await first.append(room, message_body(room, "cy", "mine", None), name="cy", ref=None, folded="cy")
    await first.moderate(room, "slow", "", 0, b'{"type":"moderation"}', closes=False)
    await first.append(room, message_body(room, "bob", "two", None), name="bob", ref=None, folded="bob")


async def test_a_moderator_deletes_anyones_message_and_the_tombstone_says_so(brokers: Brokers, room: str) -> None:
    chat = brokers()
    said = await chat.append(room, message_body(room, "ann", "spam", None), name="ann", ref=None, folded="ann")
    delete = Delete(said.id, None, "spam")
    with pytest.raises(ChangeRefused):
        await chat.change(room, Change.DELETE, said.id, change_body(room, "bob", delete), name="bob", folded="bob")
    await chat.change(
        room, Change.DELETE, said.id, change_body(room, "mod", delete), name="mod", folded="mod", moderator=True
    )
    edit = Edit(said.id, "mine now", None)
    with pytest.raises(ChangeRefused):  # a moderator may delete, not edit, someone else's message
        await chat.change(room, Change.EDIT, said.id, change_body(room, "mod", edit), name="mod", moderator=True)
    [tombstone] = [json.loads(d.frame) for d in await chat.recent(room, 10)]
    assert (tombstone["moderated"], "text" in tombstone) == (True, False)
    [entry] = [
        json.loads(d.frame)
        for d in (await chat.read_after(room, None, max_messages=10, max_bytes=1 << 20)).deliveries
        if json.loads(d.frame)["type"] == "delete"
    ]
    assert (entry["moderated"], entry["reason"]) == (True, "spam")


async def test_bans_by_room_and_by_chat_are_seen_by_every_replica(brokers: Brokers, room: str) -> None:
    first, second = brokers(), brokers()
    folded = f"troll-{secrets.token_hex(3)}"
    listener = await Listener(second).ready(room)
    await first.moderate(room, "ban", folded, FOREVER, b'{"type":"moderation","action":"ban"}', closes=True)
    assert (await second.rules(room, folded, folded)).banned_until == FOREVER
    assert (await second.rules(f"{room}-other", folded, folded)).banned_until is None
    await eventually(lambda: bool(listener.moderation), timeout=5, what="the ban's notice")
    notice = listener.moderation[0]
    assert (notice.room, notice.folded, notice.closes) == (room, folded, True)
    assert json.loads(notice.frame)["action"] == "ban"

    before = int(time.time() * 1000) - 1
    await first.ban_everywhere(folded, FOREVER)
    assert folded in [name for name, _ in await second.bans_since(before)]
    assert (await second.claim(folded, folded, "", token_hash(new_token()), take=True))[0] is Claim.BANNED
    await first.ban_everywhere(folded, 0)
    assert (await second.claim(folded, folded, "", token_hash(new_token()), take=True))[0] is Claim.CLAIMED
    await listener.stop()


async def test_the_audit_log_pages_newest_first(brokers: Brokers) -> None:
    chat = brokers()
    mark = secrets.token_hex(4)
    ids = [await chat.audit(json.dumps({"action": "mute", "n": n, "mark": mark}).encode()) for n in range(3)]
    newest = await chat.audit_log(2, None)
    assert [entry_id for entry_id, _ in newest] == ids[::-1][:2]
    older = await chat.audit_log(5, ids[1])
    assert ids[0] in [entry_id for entry_id, _ in older]
    assert ids[1] not in [entry_id for entry_id, _ in older]


async def test_a_joins_rules_count_the_names_sockets_and_a_name_has_its_own_rooms_allowance(
    brokers: Brokers, room: str
) -> None:
    chat = brokers(name_rooms_per_hour=2)
    await chat.join(room, presence_entry("c1", "Ann"))
    await chat.join(room, presence_entry("c2", "Ann"))
    rules = await chat.rules(room, "ann", "Ann")
    assert (rules.sockets_open, rules.sockets_per_name) == (2, 0)
    await chat.moderate(room, "sockets", "", 20, b'{"type":"moderation"}', closes=False)
    assert (await chat.rules(room, "ann", "Ann")).sockets_per_name == 20
    folded = f"founder-{secrets.token_hex(3)}"
    assert await chat.charge_room_of_name(folded) is None
    assert await chat.charge_room_of_name(folded) is None
    refusal = await chat.charge_room_of_name(folded)
    assert refusal is not None
    assert (refusal.code, refusal.retry_after_ms) == ("too_many_rooms", pytest.approx(1_800_000, rel=0.02))
