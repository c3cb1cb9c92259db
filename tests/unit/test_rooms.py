"""The rooms of one replica (rooms.py): a member joining gets its welcome first, then exactly what the room said
after its history, each once; a join reads its history only once the replica hears the room, which it stops
hearing a grace after its last member left; the fan-out drops repeats by id; a gap after a lost subscription is
filled from the log, or, when too large, the room's members are closed with 1013 to resume on their own."""

from __future__ import annotations

import asyncio
import json
import time

from infinite_chat.allowances import Allowances
from infinite_chat.broker import Delivery, MemoryBroker
from infinite_chat.config import Settings
from infinite_chat.protocol import CloseCode, message_body, parse_message_id
from infinite_chat.rooms import Rooms, Stage
from infinite_chat.session import Session
from infinite_chat.signin import SignIn
from support.chat import eventually
from support.peer import Peer, outbox, settle


def setup(**settings: object) -> tuple[Rooms, MemoryBroker]:
    broker = MemoryBroker(Settings(replica_name="unit", **settings))  # type: ignore[arg-type]
    return Rooms(broker, broker.settings), broker


def message(n: int) -> Delivery:
    return Delivery("lobby", (100, n), f'{{"n":{n}}}'.encode())


async def test_a_joining_member_gets_its_welcome_then_what_followed_its_history_once() -> None:
    rooms, _ = setup()
    sink = Peer()
    member = rooms.enter("lobby", outbox(sink), "alice")
    # While its history (up to message 2) is read, the room goes on: 1 and 2 are in the history, 3 and 4 are not.
    for n in (1, 2, 3, 4):
        rooms.deliver(message(n))
    assert member.stage is Stage.JOINING
    rooms.welcome(member, b"welcome", (100, 2))
    rooms.deliver(message(5))
    await settle()
    assert sink.objects == [b"welcome", b'{"n":3}', b'{"n":4}', b'{"n":5}']
    assert member.stage is Stage.LIVE


async def test_until_a_newer_message_arrives_a_welcomed_member_skips_what_its_history_had() -> None:
    rooms, _ = setup()
    sink = Peer()
    member = rooms.enter("lobby", outbox(sink), "alice")
    rooms.welcome(member, b"welcome", (100, 5))
    presence = Delivery("lobby", None, b"presence")
    for delivery in (message(4), presence, message(5), message(6)):
        rooms.deliver(delivery)
    await settle()
    assert sink.objects == [b"welcome", b"presence", b'{"n":6}']


async def test_the_fan_out_drops_a_message_it_has_already_delivered() -> None:
    rooms, _ = setup()
    sink = Peer()
    member = rooms.enter("lobby", outbox(sink), "alice")
    rooms.welcome(member, b"welcome", None)
    for n in (1, 2, 2, 1, 3):  # a catch-up from the log and pub/sub can bring the same message twice
        rooms.deliver(message(n))
    await settle()
    assert sink.objects == [b"welcome", b'{"n":1}', b'{"n":2}', b'{"n":3}']


async def test_rooms_hear_only_their_own_and_an_empty_room_is_forgotten() -> None:
    rooms, _ = setup(unsubscribe_grace=0)
    lobby, other = Peer(), Peer()
    alice = rooms.enter("lobby", outbox(lobby), "alice")
    bob_connection = outbox(other)
    bob = rooms.enter("other", bob_connection, "bob")
    rooms.welcome(alice, b"w", None)
    rooms.welcome(bob, b"w", None)
    rooms.deliver(message(1))
    await settle()
    assert other.objects == [b"w"]
    assert rooms.remove(bob_connection) is bob
    await eventually(lambda: [room.name for room in rooms] == ["lobby"], timeout=5, what="the empty room forgotten")
    assert rooms.remove(bob_connection) is None


async def test_a_gap_after_a_lost_subscription_is_filled_from_the_log() -> None:
    rooms, broker = setup()
    first = (await broker.append("lobby", message_body("lobby", "bob", "before", None), name="bob", ref=None)).id
    sink = Peer()
    member = rooms.enter("lobby", outbox(sink), "alice")
    rooms.welcome(member, b"welcome", parse_message_id(first))
    # Said while this replica was not subscribed: it reaches the member only through the log.
    for text in ("m1", "m2"):
        await broker.append("lobby", message_body("lobby", "bob", text, None), name="bob", ref=None)
    await rooms.fill_gaps()
    await settle()
    assert [json.loads(o)["text"] for o in sink.objects[1:]] == ["m1", "m2"]


async def test_a_gap_larger_than_a_resume_closes_the_rooms_members_to_resume_on_their_own() -> None:
    rooms, broker = setup(resume_max_messages=3)
    first = (await broker.append("lobby", message_body("lobby", "bob", "before", None), name="bob", ref=None)).id
    sink = Peer()
    member = rooms.enter("lobby", outbox(sink), "alice")
    rooms.welcome(member, b"welcome", parse_message_id(first))
    for n in range(5):
        await broker.append("lobby", message_body("lobby", "bob", f"m{n}", None), name="bob", ref=None)
    await rooms.fill_gaps()
    await settle()
    # What could be read goes out first: the member resumes from there.
    assert [json.loads(o)["text"] for o in sink.objects[1:]] == ["m0", "m1", "m2"]
    assert sink.closed == (CloseCode.TRY_AGAIN, "missed too much: reconnect with since")
    assert [room.members for room in rooms] == [{}]


class HearingFirst(MemoryBroker):
    """A twin that notes, for each read of a room's history, whether the room was heard at that moment."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.read_while_heard: list[bool] = []

    async def recent(self, room: str, limit: int, before: str | None = None) -> list[Delivery]:
        self.read_while_heard.append(room in self.subscribed())
        return await super().recent(room, limit, before)


async def test_a_join_reads_its_history_only_once_the_replica_hears_the_room() -> None:
    broker = HearingFirst(Settings(replica_name="unit"))
    rooms = Rooms(broker, broker.settings)
    sink = Peer()
    connection = outbox(sink)
    session = Session(
        connection,
        rooms,
        broker,
        broker.settings,
        address="198.18.0.1",
        allowances=Allowances(broker, 1 << 20),
        signin=SignIn(broker.settings),
    )
    await session.handle(json.dumps({"type": "join", "name": "alice", "room": "lobby"}))
    await settle()
    assert json.loads(sink.objects[0])["type"] == "welcome"
    assert broker.read_while_heard == [True]


async def test_a_room_is_heard_while_it_has_members_and_for_a_grace_after_the_last_left() -> None:
    rooms, broker = setup(unsubscribe_grace=0.3)
    first = outbox(Peer())
    await rooms.hear(rooms.enter("lobby", first, "alice"))
    assert broker.subscribed() == {"lobby"}
    rooms.remove(first)
    assert broker.subscribed() == {"lobby"}  # not at once
    again = outbox(Peer())
    await rooms.hear(rooms.enter("lobby", again, "alice"))  # back within the grace: the same subscription
    await asyncio.sleep(0.2)
    rooms.remove(again)
    left = time.monotonic()
    await eventually(lambda: broker.subscribed() == set(), timeout=5, what="the room unsubscribed")
    # A grace after the last leave, not after the first one (0.2 s earlier): coming back cancelled that one.
    assert time.monotonic() - left >= 0.25
    assert list(rooms) == []


async def test_a_join_just_as_the_grace_ends_keeps_the_room_heard() -> None:
    rooms, broker = setup(unsubscribe_grace=0)
    first = outbox(Peer())
    await rooms.hear(rooms.enter("lobby", first, "alice"))
    rooms.remove(first)
    rooms._forget("lobby")  # what the grace timer does when it fires: the room goes, its unsubscription is on its way
    await rooms.hear(rooms.enter("lobby", outbox(Peer()), "bob"))  # before it has gone out: subscribed, no wait
    await settle()
    assert broker.subscribed() == {"lobby"}
