"""Foundation: the stack as deployed, seen only through nginx (the one published port)."""

from __future__ import annotations

import json

from support.chat import ChatClient, clients_on_each_replica, eventually
from support.stack import Stack


def test_health_answers_from_every_replica_through_nginx(stack: Stack, replicas: list[str]) -> None:
    seen = set()
    with stack.http() as http:
        for _ in range(20):
            response = http.get("/health")
            assert response.status_code == 200
            body = response.json()
            assert body["status"] == "ok"
            seen.add(body["replica"])
    assert seen == set(replicas)


async def test_frame_sent_on_one_replica_reaches_a_client_on_the_other(
    stack: Stack, replicas: list[str], room: str
) -> None:
    alice, bob = await clients_on_each_replica(stack.ws_url, replicas[:2], room=room)
    assert alice.replica != bob.replica
    echo = await bob.say_and_wait("hello from the other replica", ref="b-1")
    assert echo["type"] == "message"
    got = await alice.wait_for(lambda o: o["type"] == "message" and o["ref"] == "b-1")
    assert got["text"] == "hello from the other replica"
    assert got["name"] == bob.welcome["name"]  # type: ignore[index]
    await alice.close()
    await bob.close()


async def test_nginx_keeps_serving_http_while_a_replica_is_stopped(stack: Stack, replicas: list[str]) -> None:
    stopped = stack.web_containers()[0]
    stack.docker("stop", stopped)
    try:
        with stack.http() as http:
            for _ in range(10):
                response = http.get("/health")
                assert response.status_code == 200
                assert response.json()["replica"] == replicas[1]
            assert http.get("/").status_code == 200
        # New chat sockets go to the replica that is left.
        client = await ChatClient.open(stack.ws_url)
        welcome = await client.join("lone", "lobby")
        assert welcome["replica"] == replicas[1]
        await client.close()
    finally:
        stack.docker("start", stopped)
        stack.wait_healthy()
    # Both are back in rotation.
    seen: set[str] = set()

    def both_seen() -> bool:
        seen.add(stack.get("/health").json()["replica"])
        return seen == set(replicas)

    await eventually(both_seen, timeout=30, what="both replicas answering again", interval=0.2)


def test_only_nginx_publishes_a_port(stack: Stack) -> None:
    for service in ("redis", "web"):
        for container in stack.containers(service):
            ports = stack.docker("inspect", "--format", "{{json .NetworkSettings.Ports}}", container).stdout
            assert '"HostPort"' not in ports, f"{container} publishes {ports}"
    for container in stack.containers("nginx"):
        ports = stack.docker("inspect", "--format", "{{json .NetworkSettings.Ports}}", container).stdout
        assert f'"HostPort":"{stack.http_port}"' in ports


def test_the_project_publishes_nginx_s_port_and_nothing_else(stack: Stack) -> None:
    """What Compose itself says the project publishes, service by service: Redis and the replicas are reachable only
    on the Compose network."""
    rows = [json.loads(line) for line in stack.compose("ps", "--all", "--format", "json").stdout.splitlines() if line]
    published = {
        (row["Service"], publisher["TargetPort"], publisher["PublishedPort"], publisher["URL"])
        for row in rows
        for publisher in row.get("Publishers") or []
        if publisher.get("PublishedPort")
    }
    assert published == {("nginx", 8080, stack.http_port, "127.0.0.1")}
    for service, port in (("redis", "6379"), ("web", "8000")):
        answer = stack.compose("port", service, port, check=False)
        assert answer.returncode != 0 or not answer.stdout.strip().split(":")[-1].strip("0"), answer.stdout


async def test_every_replica_writes_frames_on_the_direct_path(stack: Stack, replicas: list[str], room: str) -> None:
    """The fast send path leans on Hypercorn's insides; were it to fail, the replicas would fall back to the ASGI
    send, with half the capacity and nothing else to show for it. Every socket of every replica took the direct path."""
    clients = await clients_on_each_replica(stack.ws_url, replicas, room=room)
    for client in clients:
        await client.close()
    for container in stack.web_containers():
        metrics = stack.replica_metrics(container)
        assert metrics['chat_send_path_total{path="direct"}'] >= 1, container
        assert metrics['chat_send_path_total{path="asgi"}'] == 0, container


def test_web_containers_do_not_run_as_root(stack: Stack) -> None:
    for container in stack.web_containers():
        uid = stack.exec(container, "id", "-u").stdout.strip()
        assert uid != "0"
        user = stack.docker("inspect", "--format", "{{.Config.User}}", container).stdout.strip()
        assert user
        assert user.split(":")[0] not in ("0", "root")
