"""The `cluster` profile (docker-compose.cluster.yml) on its own test stack: its shape (three primaries each with one
replica over all 16384 slots, a password on every node, locked-down containers, nothing published but nginx), and
the failover of one primary while rooms on every shard chat through nginx. `pytest -s` prints the measured times
(lines starting FIGURES)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from urllib.parse import urlsplit

import pytest

from support.chat import eventually, poll
from support.figures import report
from support.resilient import ResilientClient, keep_saying, settle
from support.stack import CREATOR_SERVICE, NODE_SERVICES, SLOTS, ClusterNode, Stack, cluster_problem, room_on

SAY_EVERY = 0.4  # seconds between two messages of one sender: within RATE_LIMIT (5 a second)
# A room on a surviving shard may see no message for this long during another shard's failover, at most: its two
# senders say 5 messages a second between them, so this is several lost beats, not scheduling noise.
CALM_GAP_SECONDS = 2.0
# Chat in the failed shard's room resumes at most this long after the killed node is started again (and becomes the
# promoted replica's replica, which confirms messages again): its start, a full sync, and the page's retry.
RESUME_AFTER_RESTART_SECONDS = 20.0


@pytest.fixture
def cluster_replicas(cluster_stack: Stack) -> list[str]:
    """The names the cluster stack's web replicas give themselves, in container order."""
    return [cluster_stack.replica_name(container) for container in cluster_stack.web_containers()]


def seed_host(stack: Stack) -> str:
    """The node the web replicas learn the cluster from: the host in their REDIS_URL."""
    url = stack.container_env(stack.web_containers()[0])["REDIS_URL"]
    host = urlsplit(url).hostname
    assert host, url
    return host


def inspect(stack: Stack, container: str, template: str) -> str:
    return stack.docker("inspect", "--format", template, container).stdout.strip()


# ---- the shape of the profile -------------------------------------------------------------------------------------


def test_the_cluster_has_three_primaries_each_with_one_replica_over_all_16384_slots(cluster_stack: Stack) -> None:
    stack = cluster_stack
    nodes = stack.cluster_nodes()
    assert cluster_problem(nodes) is None, cluster_problem(nodes)
    assert sorted(node.host for node in nodes) == sorted(NODE_SERVICES)
    primaries = [node for node in nodes if node.primary]
    replicas = [node for node in nodes if not node.primary]
    assert (len(primaries), len(replicas)) == (3, 3)
    assert sorted(str(node.follows) for node in replicas) == sorted(node.id for node in primaries)
    # The primaries' ranges tile the slots: every slot once.
    ranges = sorted(item for node in primaries for item in node.slots)
    assert ranges[0][0] == 0
    assert ranges[-1][1] == SLOTS - 1
    assert all(previous[1] + 1 == following[0] for previous, following in itertools.pairwise(ranges))
    # Every node is up, agrees, and each replica copies its primary (it authenticated with masterauth).
    view = {(node.id, node.primary, node.follows, node.slots) for node in nodes}
    for container in stack.redis_containers():
        info = stack.redis_cli("cluster", "info", container=container)
        for line in ("cluster_state:ok", "cluster_slots_assigned:16384", "cluster_known_nodes:6"):
            assert line in info, f"{container}: {info}"
        assert {(n.id, n.primary, n.follows, n.slots) for n in stack.cluster_nodes(container)} == view, container
    for replica in replicas:
        assert "master_link_status:up" in stack.redis_cli("info", "replication", container=replica.container)
    # In cluster mode the single Redis does not run, and the creator made the cluster and exited with 0.
    assert stack.containers("redis", all_states=True) == []
    [creator] = stack.containers(CREATOR_SERVICE, all_states=True)
    assert inspect(stack, creator, "{{.State.Status}} {{.State.ExitCode}}") == "exited 0"
    assert "redis-cluster-create: the cluster is ok" in stack.docker("logs", creator).stdout


def test_the_web_replicas_use_the_cluster_and_clients_are_sent_to_nodes_by_name(cluster_stack: Stack) -> None:
    """The replicas are configured for the cluster, seeded with a node; a node answers a key it does not serve with
    MOVED naming the owner by its Compose name, which stays right when a container comes back at another address."""
    stack = cluster_stack
    for container in stack.web_containers():
        env = stack.container_env(container)
        assert env["REDIS_CLUSTER"] == "true"
        assert env["REDIS_URL"] == "redis://redis-node-1:6379"
    primaries = stack.primaries()
    for asked, owner in zip(primaries, primaries[1:] + primaries[:1], strict=True):
        room = room_on(owner)
        moved = stack.redis_cli("get", f"chat:{{{room}}}:log", container=asked.container, follow=False)
        assert moved.split()[0::2] == ["MOVED", f"{owner.host}:6379"], moved


def test_every_node_refuses_commands_without_the_password(cluster_stack: Stack) -> None:
    stack = cluster_stack
    for container in stack.redis_containers():
        for command in (["ping"], ["cluster", "nodes"]):
            anonymous = stack.exec(container, "redis-cli", *command, check=False)
            assert "NOAUTH" in anonymous.stdout + anonymous.stderr, f"{container}: {anonymous.stdout}"
        wrong = stack.exec(container, "sh", "-c", "REDISCLI_AUTH=guess redis-cli ping", check=False)
        assert "WRONGPASS" in wrong.stdout + wrong.stderr, container
    # From a web replica's container, over the Compose network, as a program would.
    script = (
        "import redis, sys\n"
        "for host in sys.argv[1:]:\n"
        "    try:\n        redis.Redis(host=host, socket_timeout=5).ping(); print(host, 'ANSWERED')\n"
        "    except redis.AuthenticationError: print(host, 'REFUSED')\n"
    )
    attempt = stack.exec(stack.web_containers()[0], "python3", "-c", script, *NODE_SERVICES, check=False)
    assert attempt.stdout.split() == [word for host in NODE_SERVICES for word in (host, "REFUSED")], attempt


def test_only_nginx_publishes_a_port_on_the_cluster_stack(cluster_stack: Stack) -> None:
    stack = cluster_stack
    for container in stack.serving_containers() + stack.containers(CREATOR_SERVICE, all_states=True):
        bindings = json.loads(inspect(stack, container, "{{json .HostConfig.PortBindings}}")) or {}
        published = stack.docker("port", container, check=False).stdout.split()
        if stack.containers("nginx") == [container]:
            assert list(bindings) == ["8080/tcp"], bindings
            assert published[-1] == f"127.0.0.1:{stack.http_port}", published
        else:
            assert bindings == {}, f"{container} publishes {bindings}"
            assert published == [], f"{container} publishes {published}"


def test_cluster_nodes_are_locked_down_like_the_single_redis(cluster_stack: Stack) -> None:
    stack = cluster_stack
    [creator] = stack.containers(CREATOR_SERVICE, all_states=True)
    volumes = set()
    for container in [*stack.redis_containers(all_states=True), creator]:
        host = json.loads(inspect(stack, container, "{{json .HostConfig}}"))
        assert host["ReadonlyRootfs"] is True, f"{container} has a writable root filesystem"
        assert "ALL" in (host["CapDrop"] or []), f"{container} keeps capabilities"
        assert "no-new-privileges:true" in (host["SecurityOpt"] or [])
        assert inspect(stack, container, "{{.Config.User}}") == "redis"
        expected = "no" if container == creator else "unless-stopped"
        assert host["RestartPolicy"]["Name"] == expected, container
        if container != creator:
            [data] = [
                m for m in json.loads(inspect(stack, container, "{{json .Mounts}}")) if m["Destination"] == "/data"
            ]
            assert data["Type"] == "volume"
            volumes.add(data["Name"])
    assert volumes == {f"{stack.project}_{service}-data" for service in NODE_SERVICES}  # a volume of its own each


# ---- failover of one primary ----------------------------------------------------------------------------------------


def promoted(stack: Stack, heir: ClusterNode, asked: str) -> float | None:
    """The time the heir is seen serving slots as a primary (CLUSTER NODES on a surviving node), or None yet."""
    nodes = {node.id: node for node in stack.cluster_nodes(asked)}
    return time.monotonic() if nodes[heir.id].primary and nodes[heir.id].slots else None


def rejoined(stack: Stack, victim: ClusterNode, heir: ClusterNode) -> bool | None:
    """True once the restarted node is back as the replica of its heir, copying it, and the cluster is whole."""
    nodes = stack.cluster_nodes()
    back = next(node for node in nodes if node.id == victim.id)
    if back.primary or back.follows != heir.id or cluster_problem(nodes) is not None:
        return None
    info = stack.redis_cli("info", "replication", container=victim.container, check=False)
    return True if "master_link_status:up" in info else None


def own_after(client: ResilientClient, since: float) -> list[float]:
    """When the client's own messages sent after `since` came back accepted."""
    return [
        client.arrived[m["id"]]
        for m in client.messages
        if m.get("name") == client.name and client.sent_at.get(str(m.get("ref")), 0.0) > since
    ]


def largest_gap(client: ResilientClient, start: float, end: float) -> float:
    """The longest time without any message arriving at the client within [start, end]."""
    times = sorted([start, end, *(t for t in client.arrived.values() if start <= t <= end)])
    return max(later - earlier for earlier, later in itertools.pairwise(times))


async def test_failover_of_one_primary_resumes_its_rooms_and_leaves_the_other_shards_uninterrupted(
    cluster_stack: Stack, cluster_replicas: list[str]
) -> None:
    """docker kill of one primary (not the seed node the replicas start from) while a room on each shard chats, four
    clients a room over both replicas: its replica is promoted within the cluster's failover time; once the killed
    node is started again (the promoted replica's own replica, which confirms messages), chat in the room on that
    shard resumes by itself, every acknowledged message is kept, and its clients get every message of the log
    (resuming with `since` where a socket was lost); rooms on the other two shards see no close, no refusal, no gap
    and no stall."""
    stack = cluster_stack
    stack.wait_cluster_ok()
    nodes = stack.cluster_nodes()
    primaries = [node for node in nodes if node.primary]
    victim = next(node for node in primaries if node.host != seed_host(stack))
    heir = next(node for node in nodes if node.follows == victim.id)
    survivor = next(node for node in primaries if node is not victim).container
    node_timeout = float(stack.container_env(victim.container)["REDIS_CLUSTER_NODE_TIMEOUT"]) / 1000
    rooms = {node.host: room_on(node, "failover") for node in primaries}
    hit = rooms[victim.host]
    members = {room: [ResilientClient(stack.ws_url, f"{room}-{i}", room) for i in range(4)] for room in rooms.values()}
    everyone = [client for clients in members.values() for client in clients]
    senders = {room: clients[:2] for room, clients in members.items()}
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    killed = False
    try:
        # One after another, so that nginx (least connections) spreads each room over both replicas.
        for client in everyone:
            await client.start()
        for room, clients in members.items():
            assert {client.replica for client in clients} == set(cluster_replicas), f"{room}: not on both replicas"
        talking = [sender for clients in senders.values() for sender in clients]
        tasks = [asyncio.create_task(keep_saying(sender, stop, every=SAY_EVERY)) for sender in talking]
        await eventually(lambda: all(len(c.messages) >= 10 for c in everyone), timeout=30, what="chat in every room")

        # Kept down until its replica has taken over (Docker would restart it within seconds, often first).
        await asyncio.to_thread(stack.docker, "update", "--restart=no", victim.container)
        await asyncio.to_thread(stack.docker, "kill", victim.container)
        killed, killed_at = True, time.monotonic()
        promoted_at = await asyncio.to_thread(
            poll,
            lambda: promoted(stack, heir, survivor),
            timeout=node_timeout + 20,
            what=f"{heir.host} promoted in place of {victim.host}",
            interval=0.2,
        )
        # The promoted replica has no replica of its own to confirm messages with (REDIS_CONFIRM_REPLICAS=1) until
        # the killed node is back as one: started again, as Docker's restart policy or ElastiCache's node
        # replacement would. Chat in the failed shard's room then resumes by itself: a message said after the kill
        # is accepted.
        await asyncio.to_thread(stack.docker, "start", victim.container)
        restarted_at = time.monotonic()
        await eventually(
            lambda: any(own_after(sender, killed_at) for sender in senders[hit]),
            timeout=RESUME_AFTER_RESTART_SECONDS,
            what=f"chat resuming in {hit} within {RESUME_AFTER_RESTART_SECONDS:.0f} s of the killed node's restart",
            interval=0.05,
        )
        resumed_at = min(t for sender in senders[hit] for t in own_after(sender, killed_at))
        # And goes on: ten more messages everywhere.
        counts = {client.name: len(client.messages) for client in everyone}
        await eventually(
            lambda: all(len(c.messages) >= counts[c.name] + 10 for c in everyone), timeout=30, what="chat going on"
        )
        window_end = time.monotonic()
        stop.set()
        await asyncio.gather(*tasks)
        # The killed node comes back (as its heir's replica) while the rooms settle.
        await asyncio.to_thread(stack.docker, "start", victim.container)
        logs = {room: await settle(stack, room, clients) for room, clients in members.items()}
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await asyncio.gather(*(client.stop() for client in everyone))
        if killed:
            await asyncio.to_thread(stack.docker, "update", "--restart=unless-stopped", victim.container)
            # Whatever happened, later tests find the cluster whole again.
            if not stack.containers(victim.host):
                await asyncio.to_thread(stack.docker, "start", victim.container)
            await asyncio.to_thread(stack.wait_cluster_ok, 90)
    # The killed node is back as the replica of the node that took its slots.
    await asyncio.to_thread(
        poll,
        lambda: rejoined(stack, victim, heir),
        timeout=30,
        what=f"{victim.host} back as the replica of {heir.host}",
        interval=0.5,
    )

    # The other shards: not interrupted at all.
    calm = [client for room, clients in members.items() if room != hit for client in clients]
    for client in calm:
        assert not client.closes, f"{client.name} lost its socket: {client.closes}"
        assert len(client.welcomes) == 1, f"{client.name} joined again"
        assert not client.errors, f"{client.name} got errors: {client.errors[:3]}"
        assert client.delivered == logs[client.room], f"{client.name}: a message lost, repeated or out of order"
    gaps = [largest_gap(client, killed_at, window_end) for client in calm]
    assert max(gaps) < CALM_GAP_SECONDS, f"a room on another shard stalled for {max(gaps):.1f} s"
    acks = [
        client.arrived[m["id"]] - client.sent_at[m["ref"]]
        for client in calm
        for m in client.messages
        if m.get("name") == client.name and killed_at <= client.arrived[m["id"]] <= window_end
    ]
    assert max(acks) < CALM_GAP_SECONDS, f"a message on another shard took {max(acks):.1f} s to be accepted"

    # The failed shard's room: every client gets the whole log after the failover, in its order.
    log = logs[hit]
    in_log = set(log)
    await eventually(
        lambda: all(in_log <= set(client.delivered) for client in members[hit]),
        timeout=30,
        what=f"every client in {hit} holding the whole log",
    )
    for client in members[hit]:
        firsts = [message_id for message_id in dict.fromkeys(client.delivered) if message_id in in_log]
        assert firsts == log, f"{client.name} holds the log's messages out of order"
    # Every message acknowledged (confirmed by the replica that took over) is kept.
    acknowledged = {m["id"] for sender in senders[hit] for m in sender.messages if m.get("name") == sender.name}
    assert acknowledged <= in_log, f"acknowledged, then lost: {sorted(acknowledged - in_log)}"
    refused = [error for sender in senders[hit] for error in sender.refused.values()]
    report(
        "cluster_failover",
        node_timeout_ms=round(node_timeout * 1000),
        killed=victim.host,
        promoted=heir.host,
        promoted_after_kill_seconds=round(promoted_at - killed_at, 2),
        chat_resumed_after_kill_seconds=round(resumed_at - killed_at, 2),
        chat_resumed_after_promotion_seconds=round(resumed_at - promoted_at, 2),
        chat_resumed_after_restart_seconds=round(resumed_at - restarted_at, 2),
        failed_shard_sockets_closed=sum(len(client.closes) for client in members[hit]),
        failed_shard_close_codes=sorted({code for client in members[hit] for _, code in client.closes}),
        failed_shard_sends_refused=len(refused),
        failed_shard_refusal_codes=sorted({str(error.get("code")) for error in refused}),
        failed_shard_acknowledged_then_lost=len(acknowledged - set(log)),
        failed_shard_repeated_deliveries=sum(len(c.delivered) - len(set(c.delivered)) for c in members[hit]),
        other_shards_largest_gap_seconds=round(max(gaps), 2),
        other_shards_slowest_acceptance_seconds=round(max(acks), 2),
        other_shards_sockets_closed=0,
        messages={room: len(ids) for room, ids in logs.items()},
    )
