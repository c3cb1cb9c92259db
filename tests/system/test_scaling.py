"""Scale-out on one host: `docker compose up --scale web=3` gives a third replica that nginx sends traffic to with
no edit to nginx.conf (upstream-watch reloads nginx when the addresses behind `web` change), and whose clients chat
with the others'. The stack is scaled back to two at the end, and nginx has dropped the third before the next test."""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any

from support.chat import client_on, clients_on_each_replica, eventually
from support.stack import Stack

RELOAD = re.compile(r"upstream-watch: web is now ([0-9. ]+?) ?; reloading nginx")


def scale(stack: Stack, replicas: int) -> None:
    try:
        stack.compose("up", "--detach", "--scale", f"web={replicas}", "--no-recreate", "--wait", timeout=300)
    except subprocess.CalledProcessError as error:
        raise AssertionError(f"scaling to {replicas} failed: {error.stderr}") from None


def web_addresses(stack: Stack) -> set[str]:
    addresses = set()
    for container in stack.web_containers():
        out = stack.docker("inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container)
        addresses.add(out.stdout.strip())
    return addresses


def nginx_upstreams(stack: Stack) -> set[str] | None:
    """The addresses nginx last reloaded with, as upstream-watch announced them (None before any reload)."""
    [nginx] = stack.containers("nginx")
    logs = stack.docker("logs", nginx).stderr
    found = RELOAD.findall(logs)
    return set(found[-1].split()) if found else None


HEARD = "chat_fanout_received_total"


async def each_replica_hears_only_its_own_rooms(
    stack: Stack, containers: list[str], names: list[str], room: str
) -> None:
    """A room per replica, all of whose members are on that replica: each replica hears its own room's messages and
    none of the other two rooms' (with one channel for all, each would hear all 30)."""
    pairs = [
        [await client_on(stack.ws_url, name, name=f"{who}-{index}", room=f"{room}-own-{index}") for who in ("a", "b")]
        for index, name in enumerate(names)
    ]
    # Sockets that landed on another replica on their way joined the room there: wait out their grace.
    for index in range(len(names)):
        await eventually(
            lambda index=index: stack.replicas_hearing(f"{room}-own-{index}") == 1,
            timeout=30,
            what="only its own replica hearing each room",
            interval=0.5,
        )
    before = [stack.replica_metrics(container)[HEARD] for container in containers]
    for index, (sender, hearer) in enumerate(pairs):
        for n in range(10):  # within the burst
            assert (await sender.say_and_wait(f"own {n}", f"own-{index}-{n}"))["type"] == "message"
        await hearer.wait_for(lambda obj, index=index: obj.get("ref") == f"own-{index}-9")
    heard = [stack.replica_metrics(container)[HEARD] - was for container, was in zip(containers, before, strict=True)]
    print(f"fan-out objects heard per replica for 3 rooms of 10 messages, one room each: {heard}")
    for count in heard:
        # Its own room's 10 messages (presence is quiet by now), and none of the other rooms' 20.
        assert 10 <= count < 15, heard
    for pair in pairs:
        for client in pair:
            await client.close()


async def test_a_third_replica_gets_traffic_and_chats_with_the_others(stack: Stack, room: str) -> None:
    assert len(stack.web_containers()) == 2
    scale(stack, 3)
    try:
        containers = stack.web_containers()
        assert len(containers) == 3
        names = [stack.replica_name(container) for container in containers]
        seen: set[str] = set()

        def all_answer() -> bool:
            with stack.http() as http:
                for _ in range(6):
                    response = http.get("/health")
                    if response.status_code == 200:
                        seen.add(response.json()["replica"])
            return seen >= set(names)

        # upstream-watch looks every 2 s; the reload itself is immediate.
        started = time.monotonic()
        await eventually(all_answer, timeout=60, what=f"/health answers from all of {names}", interval=0.5)
        assert seen == set(names)
        assert nginx_upstreams(stack) == web_addresses(stack)
        print(f"third replica in rotation {time.monotonic() - started:.1f}s after `up --wait` returned")

        clients = await clients_on_each_replica(stack.ws_url, names, room=room)
        assert [client.replica for client in clients] == names
        for index, sender in enumerate(clients):
            ref = f"scale-{index}"
            echo = await sender.say_and_wait(f"hello from replica {index}", ref=ref)
            assert echo["type"] == "message"

            def is_it(obj: dict[str, Any], ref: str = ref) -> bool:
                return obj["type"] == "message" and obj.get("ref") == ref

            for other in clients:
                if other is not sender:
                    got = await other.wait_for(is_it)
                    assert got["id"] == echo["id"]
                    assert got["text"] == f"hello from replica {index}"
        # Every replica delivered the same messages in the same order.
        orders = [[m["id"] for m in client.of_type("message")] for client in clients]
        assert orders[0] == orders[1] == orders[2]
        for client in clients:
            await client.close()
        await each_replica_hears_only_its_own_rooms(stack, containers, names, room)
    finally:
        scale(stack, 2)
        # Until nginx has reloaded without the removed replica, it would try (and skip) its address: wait for it.
        await eventually(
            lambda: nginx_upstreams(stack) == web_addresses(stack),
            timeout=60,
            what="nginx to reload with the two remaining replicas",
            interval=0.5,
        )
    assert len(stack.web_containers()) == 2
