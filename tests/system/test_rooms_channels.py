"""A channel per room, on the real stack through nginx: a replica hears only the rooms it has members in, and a
member's first join on a replica (a new subscription) misses nothing said around it."""

from __future__ import annotations

import asyncio

from support.chat import ChatClient, client_on, eventually
from support.stack import Stack

HEARD = "chat_fanout_received_total"


async def test_a_replica_with_no_member_in_a_room_hears_none_of_it(
    stack: Stack, replicas: list[str], room: str
) -> None:
    first, second = stack.web_containers()[:2]
    alice = await client_on(stack.ws_url, replicas[0], name="alice", room=room)
    bob = await client_on(stack.ws_url, replicas[0], name="bob", room=room)
    # Sockets that landed on the other replica on their way joined the room there: wait out their grace. Then the
    # room's channel has one subscriber, the replica with its members.
    await eventually(
        lambda: stack.replicas_hearing(room) == 1, timeout=30, what="one replica hearing the room", interval=0.5
    )
    heard_before = {c: stack.replica_metrics(c)[HEARD] for c in (first, second)}
    for n in range(20):
        await asyncio.sleep(0.25)  # within the rate limit: 4 a second
        assert (await alice.say_and_wait(f"only here {n}", f"here-{n}"))["type"] == "message"
    await bob.wait_for(lambda o: o.get("ref") == "here-19")
    heard = {c: stack.replica_metrics(c)[HEARD] - heard_before[c] for c in (first, second)}
    assert heard[first] >= 20, heard
    # The other replica heard none of the 20 (with one channel for all rooms it heard every one).
    assert heard[second] < 5, heard
    for client in (alice, bob):
        await client.close()


async def test_joins_that_subscribe_a_replica_miss_nothing_said_meanwhile(
    stack: Stack, replicas: list[str], room: str
) -> None:
    """Someone on one replica keeps talking while, room after room, someone joins on the other: each newcomer's
    welcome plus what follows it holds every message from its history on, with no gap."""
    talker_rooms = [f"{room}-{n}" for n in range(6)]
    talkers = [
        await client_on(stack.ws_url, replicas[0], name=f"talker-{n}", room=r) for n, r in enumerate(talker_rooms)
    ]
    stop = asyncio.Event()

    async def talk(client: ChatClient, tag: str) -> None:
        n = 0
        while not stop.is_set():
            await client.say_and_wait(f"{tag} {n}", f"{tag}-{n}")
            n += 1
            await asyncio.sleep(0.25)  # a steady 4 a second, within the rate limit

    talking = [asyncio.create_task(talk(t, f"t{n}")) for n, t in enumerate(talkers)]
    newcomers = []
    for n, talk_room in enumerate(talker_rooms):
        newcomers.append(await client_on(stack.ws_url, replicas[1], name=f"new-{n}", room=talk_room))
    # Each room says a few more after the last join.
    counts = [len(talker.messages()) for talker in talkers]
    await eventually(
        lambda: all(len(t.messages()) >= n + 4 for t, n in zip(talkers, counts, strict=True)),
        timeout=15,
        what="four more messages in each room",
    )
    stop.set()
    await asyncio.gather(*talking)
    for n, (talker, newcomer) in enumerate(zip(talkers, newcomers, strict=True)):
        said = [o["id"] for o in talker.messages()]  # everything the room got: only its talker speaks
        await newcomer.wait_for(lambda o, last=said[-1]: o.get("id") == last)
        seen = [o["id"] for o in newcomer.messages()]  # the welcome's history, then what followed it
        assert seen, f"room {n}: nothing seen"
        assert seen == said[said.index(seen[0]) :], f"room {n}: a gap or a repeat"
    for client in talkers + newcomers:
        await client.close()
