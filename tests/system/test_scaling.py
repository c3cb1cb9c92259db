"""Scale-out on one host: `docker compose up --scale web=3` gives a third replica that nginx sends traffic to with
no edit to nginx.conf (upstream-watch reloads nginx when the addresses behind `web` change), and whose clients chat
with the others'. The stack is scaled back to two at the end, and nginx has dropped the third before the next test."""

from __future__ import annotations

import re
import subprocess
import time
from typing import Any

from support.chat import clients_on_each_replica, eventually
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
