"""A Redis of the project's own image (services/redis: password, AOF, renamed commands, the memory policy), started
with testcontainers and published on this machine's loopback only, for the tests of the brokers."""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer

from infinite_chat.broker import RedisBroker
from infinite_chat.config import Secret, Settings

from .stack import ROOT, free_port, require_docker


@dataclass
class RedisServer:
    container: DockerContainer
    port: int
    password: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def broker(self, **settings: Any) -> RedisBroker:
        """A RedisBroker on this server, as a replica would have one, with these settings (a Redis without replicas:
        nothing to wait for, REDIS_CONFIRM_REPLICAS=0, unless the test says otherwise)."""
        chosen = {"redis_confirm_replicas": 0} | settings
        return RedisBroker(
            Settings(replica_name="broker-test", redis_url=self.url, redis_password=Secret(self.password), **chosen)
        )

    def restart(self) -> None:
        subprocess.run(["docker", "restart", self.container.get_wrapped_container().id], check=True, timeout=120)
        wait_until_answering(self)


def wait_until_answering(server: RedisServer, timeout: float = 60) -> None:
    client = redis.Redis(host="127.0.0.1", port=server.port, password=server.password, socket_timeout=2)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)
    finally:
        client.close()


@contextlib.contextmanager
def redis_image_built() -> Iterator[str]:
    """The image of services/redis, under a tag of its own, removed afterwards."""
    require_docker()
    tag = f"infinite-chat-test/redis:broker-{secrets.token_hex(3)}"
    subprocess.run(["docker", "build", "-q", "-t", tag, str(ROOT / "services" / "redis")], check=True, timeout=600)
    try:
        yield tag
    finally:
        subprocess.run(["docker", "image", "rm", "--force", tag], check=False, capture_output=True, timeout=120)


@contextlib.contextmanager
def started_redis(image: str, **environment: str) -> Iterator[RedisServer]:
    """A Redis of that image, published on this machine's loopback only, stopped afterwards."""
    password = secrets.token_hex(16)
    port = free_port()
    container = DockerContainer(image).with_env("REDIS_PASSWORD", password)
    for name, value in environment.items():
        container = container.with_env(name, value)
    container.ports["6379/tcp"] = ("127.0.0.1", port)  # type: ignore[assignment]
    # The reaper container (Ryuk) is an image from a registry this machine may not reach; the finally cleans up.
    saved = testcontainers_config.ryuk_disabled
    testcontainers_config.ryuk_disabled = True
    try:
        container.start()
        server = RedisServer(container, port, password)
        wait_until_answering(server)
        yield server
    finally:
        testcontainers_config.ryuk_disabled = saved
        container.stop()


@dataclass
class ClusterServer:
    """A Redis Cluster of three primaries with a replica each, of the project's image, on this machine's loopback
    (host networking: each node on a port of its own, its cluster bus on that port + 10000)."""

    containers: dict[int, DockerContainer]  # by port
    password: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{min(self.containers)}"

    def broker(self, **settings: Any) -> RedisBroker:
        """A RedisBroker in cluster mode, seeded with the first node, as a replica would have one."""
        return RedisBroker(
            Settings(
                replica_name="broker-test",
                redis_url=self.url,
                redis_cluster=True,
                redis_password=Secret(self.password),
                **settings,
            )
        )

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=self.password, socket_timeout=2)

    def primaries(self) -> dict[int, list[tuple[int, int]]]:
        """Port of each primary -> the slot ranges it serves."""
        for port in self.containers:
            with contextlib.suppress(redis.RedisError), self.client(port) as client:
                served: dict[int, list[tuple[int, int]]] = {}
                for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                    served.setdefault(int(primary[1]), []).append((int(start), int(end)))
                return served
        raise AssertionError("no node of the cluster answers")

    def owner(self, slot: int) -> int:
        return next(port for port, ranges in self.primaries().items() if any(a <= slot <= b for a, b in ranges))

    def move_slot(self, slot: int, to: int) -> None:
        """Moves one slot, and its keys, from the primary that serves it to the primary on port `to`, as
        `redis-cli --cluster reshard` does (IMPORTING, MIGRATING, MIGRATE, then SETSLOT NODE on every primary)."""
        source = self.owner(slot)
        with self.client(source) as old, self.client(to) as new:
            old_id, new_id = old.execute_command("CLUSTER MYID"), new.execute_command("CLUSTER MYID")
            new.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", old_id)
            old.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", new_id)
            while keys := old.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                old.execute_command("MIGRATE", "127.0.0.1", to, "", 0, 5000, "AUTH", self.password, "KEYS", *keys)
            new.execute_command("CLUSTER SETSLOT", slot, "NODE", new_id)
            old.execute_command("CLUSTER SETSLOT", slot, "NODE", new_id)
        for port in self.primaries():
            with self.client(port) as client:
                client.execute_command("CLUSTER SETSLOT", slot, "NODE", new_id)

    def kill(self, port: int) -> None:
        subprocess.run(["docker", "kill", self.containers[port].get_wrapped_container().id], check=True, timeout=60)

    def start(self, port: int) -> None:
        subprocess.run(["docker", "start", self.containers[port].get_wrapped_container().id], check=True, timeout=60)

    def wait_ok(self, timeout: float = 60) -> None:
        """Until every node that runs says the cluster is ok and all slots have a primary, and every replica is in
        sync with its primary (one that never was would not take over: its data counts as too old)."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for port in self.containers:
                try:
                    with self.client(port) as client:
                        cluster = client.execute_command("CLUSTER INFO")
                        replication = client.info("replication")
                        states.append(
                            cluster["cluster_state"] == "ok"
                            and int(cluster["cluster_slots_ok"]) == 16384
                            and (replication["role"] == "master" or replication.get("master_link_status") == "up")
                        )
                except redis.RedisError:
                    continue
            if states and all(states):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the cluster is not ok after {timeout}s")
            time.sleep(0.2)


def cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster bus port (+10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


@contextlib.contextmanager
def started_cluster(image: str) -> Iterator[ClusterServer]:
    """Six nodes of that image made into a cluster (three primaries, a replica each), stopped afterwards. The
    hardened configuration of the image, plus the cluster settings of the Compose cluster profile."""
    password = secrets.token_hex(16)
    ports = cluster_ports(6)
    containers: dict[int, DockerContainer] = {}
    saved = testcontainers_config.ryuk_disabled
    testcontainers_config.ryuk_disabled = True
    try:
        for port in ports:
            # The password on the command line: a throwaway one, for a test cluster on the loopback.
            container = (
                DockerContainer(image)
                .with_kwargs(network_mode="host", entrypoint="redis-server")
                .with_command(
                    [
                        "/etc/redis/infinite-chat.conf",
                        *("--bind", "127.0.0.1", "--port", str(port), "--requirepass", password),
                        *("--masterauth", password, "--cluster-enabled", "yes", "--cluster-node-timeout", "2000"),
                        *("--cluster-require-full-coverage", "no", "--cluster-config-file", f"nodes-{port}.conf"),
                    ]
                )
            )
            containers[port] = container
            container.start()
        server = ClusterServer(containers, password)
        for port in ports:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with server.client(port) as client:
                        client.ping()
                    break
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        first = containers[ports[0]].get_wrapped_container().id
        create = ["--cluster", "create", *(f"127.0.0.1:{port}" for port in ports), "--cluster-replicas", "1"]
        subprocess.run(
            ["docker", "exec", "-e", f"REDISCLI_AUTH={password}", first, "redis-cli", *create, "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        server.wait_ok()
        yield server
    finally:
        testcontainers_config.ryuk_disabled = saved
        for container in containers.values():
            with contextlib.suppress(Exception):
                container.stop()
