"""The Compose stack under test: started once per session under a project name and host port of its own, so a
stack started by scripts/up is never touched, and torn down with its volume at the end. Either on the single Redis
or on the Redis Cluster of the `cluster` profile (docker-compose.cluster.yml); the Redis helpers work on both."""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from redis.crc import key_slot
from testcontainers.compose import DockerCompose

from chatbench.docker import (
    PROJECT_LABEL,
    SERVICE_CONTAINER,
    SERVICE_LABEL,
    docker,
    docker_command,
    health,
    project_containers,
    wait_healthy,
)

from .addresses import forwarded

ROOT = Path(__file__).resolve().parents[2]
STACK_ENV = ROOT / "tests" / "stack.env"
# Cluster mode: the override file and the profile that replace the single Redis with the cluster's nodes.
CLUSTER_FILES = ("docker-compose.yml", "docker-compose.cluster.yml")
CLUSTER_PROFILE = "cluster"
NODE_SERVICES = tuple(f"redis-node-{n}" for n in range(1, 7))
# HA mode: a primary and a replica that Sentinel fails over (the `ha` profile, docker-compose.ha.yml). The services
# are named for the roles they start in; after a failover either may be the primary (Stack.ha_primary).
HA_FILES = ("docker-compose.yml", "docker-compose.ha.yml")
HA_PROFILE = "ha"
HA_SERVICES = ("redis-primary", "redis-replica")
SENTINEL_SERVICES = tuple(f"redis-sentinel-{n}" for n in range(1, 4))
SENTINEL_MASTER = "infinite-chat"
CREATOR_SERVICE = "redis-cluster-create"  # one-shot: exited with 0 is its healthy
PRIMARIES = 3
SLOTS = 16384
NAME_SERVICE_STATE = '{{.Names}} {{.Label "' + SERVICE_LABEL + '"}} {{.State}}'


@dataclass(frozen=True)
class ClusterNode:
    """One line of CLUSTER NODES. The single Redis of a standalone stack is shown as one primary with every slot."""

    id: str
    host: str  # the name it announces: its Compose service (redis-node-N), or "redis"
    container: str
    primary: bool
    follows: str | None  # a replica: the id of its primary
    slots: tuple[tuple[int, int], ...]  # first and last slot of each range served
    flags: frozenset[str]
    connected: bool

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"}) or not self.connected

    def serves(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


def room_slot(room: str) -> int:
    """The slot of a room's keys (they share the room as hash tag), computed as Redis does (CRC16 of the tag)."""
    return int(key_slot(f"chat:{{{room}}}:log".encode()))


def room_on(node: ClusterNode, prefix: str = "t") -> str:
    """A new room (random name) whose slot `node` serves."""
    while True:
        room = f"{prefix}-{secrets.token_hex(6)}"
        if node.serves(room_slot(room)):
            return room


def parse_cluster_nodes(text: str, container_of: Callable[[str], str]) -> list[ClusterNode]:
    """CLUSTER NODES (one node a line: id, address,host, flags, primary, ping, pong, epoch, link, slots...)
    parsed; `container_of` names the container of a host."""
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        node_id, address, flags, primary = fields[0], fields[1], set(fields[2].split(",")), fields[3]
        host = address.partition(",")[2]
        ranges = (item.partition("-") for item in fields[8:] if not item.startswith("["))  # [..]: migrating
        nodes.append(
            ClusterNode(
                id=node_id,
                host=host,
                container=container_of(host) if host else "",
                primary="master" in flags,
                follows=None if primary == "-" else primary,
                slots=tuple((int(first), int(last or first)) for first, _, last in ranges),
                flags=frozenset(flags - {"myself", "master", "slave"}),
                connected=fields[7] == "connected",
            )
        )
    return nodes


def cluster_problem(nodes: list[ClusterNode]) -> str | None:
    """What keeps this view of the cluster from being whole (3 primaries serving all slots, each followed by one
    replica, no node failing), or None."""
    failing = [f"{n.host}({','.join(sorted(n.flags))})" for n in nodes if n.failing]
    primaries = [n for n in nodes if n.primary and n.slots]
    covered = sum(last - first + 1 for n in primaries for first, last in n.slots)
    followers = {p.id: sum(1 for n in nodes if n.follows == p.id) for p in primaries}
    if len(nodes) != len(NODE_SERVICES):
        return f"{len(nodes)} nodes known"
    if failing:
        return f"failing: {failing}"
    if len(primaries) != PRIMARIES or covered != SLOTS:
        return f"{len(primaries)} primaries serve {covered} slots"
    if set(followers.values()) != {1}:
        return f"replicas per primary: {followers}"
    return None


class DockerMissing(RuntimeError):
    pass


def require_docker() -> None:
    """Tests that need Docker fail loudly without it; they never skip."""
    for command in (["info"], ["compose", "version"]):
        try:
            docker(*command, timeout=30)
        except (OSError, subprocess.SubprocessError) as error:
            raise DockerMissing(
                f"`docker {' '.join(command)}` failed ({error}); run the tests with scripts/test, which prepares Docker"
            ) from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Stack:
    project: str
    http_port: int
    env: dict[str, str] = field(default_factory=dict)
    cluster: bool = False  # on the Redis Cluster (the `cluster` profile) rather than the single Redis
    ha: bool = False  # on a primary and a replica under Sentinel (the `ha` profile)
    # A moderator's token for this stack (its digest is the stack's MODERATOR_TOKENS), made for the session.
    moderator_token: str = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}/ws"

    @property
    def origin(self) -> str:
        return self.base_url

    @property
    def compose_options(self) -> list[str]:
        """What `docker compose` needs besides the env file to see this stack's services: in cluster mode, both
        files and the profile."""
        if self.ha:
            return [*(item for file in HA_FILES for item in ("-f", file)), "--profile", HA_PROFILE]
        if not self.cluster:
            return []
        return [*(item for file in CLUSTER_FILES for item in ("-f", file)), "--profile", CLUSTER_PROFILE]

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "compose", "--env-file", str(STACK_ENV), *self.compose_options, *args],
            cwd=ROOT,
            env={**os.environ, **self.env},
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def docker(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return docker_command(*args, check=check, timeout=timeout)

    def containers(self, service: str, *, all_states: bool = False) -> list[str]:
        """Container names of a service, in replica order (web-1, web-2, ...)."""
        return project_containers(self.project, service, all_states=all_states)

    def web_containers(self) -> list[str]:
        return self.containers("web")

    def replica_name(self, container: str) -> str:
        """What the replica in this container calls itself (its hostname, as /health and welcome say)."""
        return self.docker("inspect", "--format", "{{.Config.Hostname}}", container).stdout.strip()

    def serving_containers(self) -> list[str]:
        """Every container of the project, in any state, but the cluster's one-shot creator (done once it exited
        with 0, which Compose checked before it started the web replicas)."""
        creator = set(self.containers(CREATOR_SERVICE, all_states=True))
        return [c for c in project_containers(self.project, all_states=True) if c not in creator]

    def states(self) -> dict[str, str]:
        """Container name -> 'healthy', 'unhealthy', 'starting', or the container state when it has no health."""
        return health(self.serving_containers())

    def wait_healthy(self, timeout: float = 180) -> None:
        """Every container healthy and, in cluster mode, the cluster whole again (wait_cluster_ok)."""
        started = time.monotonic()
        try:
            wait_healthy(self.serving_containers(), timeout)
        except TimeoutError as error:
            raise AssertionError(f"the stack: {error}") from None  # a test that waits on it fails, not errors
        if self.cluster:
            self.wait_cluster_ok(max(10.0, timeout - (time.monotonic() - started)))

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=10, headers=forwarded())

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        with self.http() as client:
            return client.get(path, **kwargs)  # type: ignore[arg-type]

    def exec(self, container: str, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.docker("exec", container, *command, check=check)

    def container_of(self, replica: str) -> str:
        """The container of the replica that calls itself `replica` (as a welcome names it)."""
        return {self.replica_name(container): container for container in self.web_containers()}[replica]

    def container_env(self, container: str) -> dict[str, str]:
        """The environment a container was started with (what Compose gave it)."""
        lines = self.docker("inspect", "--format", "{{range .Config.Env}}{{println .}}{{end}}", container).stdout
        return dict(line.split("=", 1) for line in lines.splitlines() if "=" in line)

    def rss_kib(self, container: str) -> int:
        """Resident memory of the container's main process (PID 1), in KiB."""
        return int(self.exec(container, "grep", "VmRSS", "/proc/1/status").stdout.split()[1])

    # Redis: the single one, or the cluster's nodes.

    def redis_containers(self, *, all_states: bool = False) -> list[str]:
        """The Redis containers: the single redis, or the cluster's nodes in node order (running ones only, unless
        `all_states`). One `docker ps` for all of them."""
        services = NODE_SERVICES if self.cluster else HA_SERVICES if self.ha else ("redis",)
        filters = ["--filter", f"label={PROJECT_LABEL}={self.project}", "--filter", f"label={SERVICE_CONTAINER}"]
        rows = self.docker("ps", "--all", *filters, "--format", NAME_SERVICE_STATE).stdout.splitlines()
        found = [row.split() for row in rows if row.strip()]
        chosen = [(services.index(service), name) for name, service, state in found if service in services]
        running = {name for name, _, state in found if state == "running"}
        return [name for _, name in sorted(chosen) if all_states or name in running]

    def node_container(self, host: str) -> str:
        """The container of the node that announces itself as `host` (its Compose service), running or not."""
        return f"{self.project}-{host}-1"  # Compose's name for the one container of a service

    def redis_cli(self, *args: str, container: str | None = None, follow: bool = True, check: bool = True) -> str:
        """A redis-cli command inside a Redis container (the first running one unless `container` names one), with
        the password from its environment. In cluster mode a key's command follows MOVED to its node, unless not
        `follow`."""
        command = 'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli "$@"'
        options = ["-c"] if self.cluster and follow else []
        target = container or (self.ha_primary() if self.ha else self.redis_containers()[0])
        return self.exec(target, "sh", "-c", command, "redis-cli", *options, *args, check=check).stdout

    def ha_primary(self) -> str:
        """HA mode: the container of the node the Sentinels name the primary (the first Sentinel that answers)."""
        for sentinel in self.containers_of(SENTINEL_SERVICES):
            answer = self.exec(
                sentinel,
                "sh",
                "-c",
                'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -p 26379 sentinel get-master-addr-by-name "$1"',
                "sentinel",
                SENTINEL_MASTER,
                check=False,
            ).stdout.split()
            if answer and answer[0] in HA_SERVICES:
                return self.node_container(answer[0])
        raise AssertionError("no Sentinel names a primary")

    def containers_of(self, services: tuple[str, ...]) -> list[str]:
        return [container for service in services for container in self.containers(service)]

    def cluster_nodes(self, container: str | None = None) -> list[ClusterNode]:
        """CLUSTER NODES as seen from `container` (by default the first running node), parsed; a standalone stack's
        Redis as a single primary serving every slot."""
        if not self.cluster:
            [redis] = self.containers("redis", all_states=True)
            return [ClusterNode("standalone", "redis", redis, True, None, ((0, SLOTS - 1),), frozenset(), True)]
        return parse_cluster_nodes(self.redis_cli("cluster", "nodes", container=container), self.node_container)

    def primaries(self) -> list[ClusterNode]:
        """The primaries serving slots, in slot order (the single Redis of a standalone stack)."""
        serving = [node for node in self.cluster_nodes() if node.primary and node.slots and not node.failing]
        return sorted(serving, key=lambda node: node.slots[0])

    def slot_owner(self, room: str) -> str:
        """The container of the primary serving the slot of the room's keys (`chat:{room}:log` and the others)."""
        slot = room_slot(room)
        [owner] = [node.container for node in self.primaries() if node.serves(slot)]
        return owner

    def wait_cluster_ok(self, timeout: float = 60) -> None:
        """Waits until every running node says cluster_state:ok and the first one sees the cluster whole
        (cluster_problem); fails with what it saw at the deadline. Nothing to wait for on the single Redis."""
        if not self.cluster:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = {c: self.redis_cli("cluster", "info", container=c) for c in self.redis_containers()}
                bad = sorted(c for c, info in states.items() if "cluster_state:ok" not in info)
                problem = f"cluster_state not ok on {bad}" if bad else cluster_problem(self.cluster_nodes())
            except (subprocess.CalledProcessError, ValueError) as error:
                problem = str(error)
            if problem is None:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the Redis Cluster is not whole after {timeout:.0f}s: {problem}")
            time.sleep(0.5)

    def restart_redis(self, timeout: float = 180) -> None:
        """Restarts the single Redis, or every node of the cluster (one after another, as `docker restart` does),
        and waits until it serves again: healthy and, for the cluster, whole."""
        self.docker("restart", *self.redis_containers(all_states=True), timeout=timeout)
        self.wait_healthy(timeout)

    def stop_redis(self) -> None:
        """Stops the single Redis, or every node of the cluster: Redis is gone for the replicas."""
        self.docker("stop", *self.redis_containers())

    def start_redis(self, timeout: float = 180) -> None:
        """Starts whatever Redis containers are not running and waits until they serve (whole, for a cluster)."""
        stopped = [c for c in self.redis_containers(all_states=True) if c not in self.redis_containers()]
        if stopped:
            self.docker("start", *stopped)
        self.wait_healthy(timeout)

    def replicas_hearing(self, room: str) -> int:
        """How many connections (one per replica) hear the room's channel: its sharded subscribers (SSUBSCRIBE),
        counted on the node that serves its slot."""
        out = self.redis_cli("pubsub", "shardnumsub", f"chat:{{{room}}}:channel", container=self.slot_owner(room))
        _, count = out.split()
        return int(count)

    def redis_info(self, container: str | None = None) -> dict[str, str]:
        """A Redis's INFO (memory, CPU, stats, ...) as field -> value: the single Redis, or one node (the first
        running one unless `container` names one)."""
        lines = self.redis_cli("info", "everything", container=container).splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))

    def redis_cpu_seconds_by_node(self) -> dict[str, float]:
        """CPU seconds (system and user) each running Redis container has used: container -> seconds."""
        seconds = {}
        for container in self.redis_containers():
            info = self.redis_info(container)
            seconds[container] = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
        return seconds

    def redis_cpu_seconds(self) -> float:
        """CPU seconds Redis has used: the single Redis, or all the cluster's nodes together."""
        return sum(self.redis_cpu_seconds_by_node().values())

    def replica_metrics(self, container: str) -> dict[str, float]:
        """The replica's /metrics (not reachable through nginx), read from inside its container."""
        script = "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8000/metrics').read().decode())"
        text = self.exec(container, "python3", "-c", script).stdout
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """These values in this process's environment for a while (testcontainers runs docker compose with it)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def running_stack(*, cluster: bool = False, ha: bool = False) -> Iterator[Stack]:
    """A stack of its own for this session: on the single Redis, with `cluster` on the Redis Cluster, or with `ha`
    on a primary and a replica under Sentinel."""
    require_docker()
    variable = "TEST_CLUSTER_STACK" if cluster else "TEST_HA_STACK" if ha else "TEST_STACK"
    reused = os.environ.get(f"{variable}_PROJECT")
    if reused:
        # While writing a test: run it against a stack already up (started with tests/stack.env's settings, and in
        # cluster mode the cluster's files and profile), which is left as it is. CI never sets this.
        yield Stack(
            project=reused,
            http_port=int(os.environ[f"{variable}_PORT"]),
            env={
                "COMPOSE_PROJECT_NAME": reused,
                "REDIS_PASSWORD": os.environ.get(f"{variable}_REDIS_PASSWORD", ""),
                # For tests that recreate a service: the images that stack runs, on the port it has.
                "IMAGE_TAG": os.environ.get(f"{variable}_IMAGE_TAG", "local"),
                "HTTP_PORT": os.environ[f"{variable}_PORT"],
                "HTTP_BIND": "127.0.0.1",
            },
            cluster=cluster,
            ha=ha,
            moderator_token=os.environ.get(f"{variable}_MODERATOR_TOKEN", ""),
        )
        return
    moderator_token = secrets.token_urlsafe(32)
    project = f"chat-test-{'cluster-' if cluster else 'ha-' if ha else ''}{secrets.token_hex(3)}"
    stack = Stack(
        project=project,
        http_port=free_port(),
        env={
            "COMPOSE_PROJECT_NAME": project,
            "HTTP_BIND": "127.0.0.1",
            "REDIS_PASSWORD": secrets.token_hex(16),
            # Images of their own: another test session building other sources at the same time is not mixed in.
            "IMAGE_TAG": project,
            "MODERATOR_TOKENS": hashlib.sha256(moderator_token.encode()).hexdigest(),
        },
        cluster=cluster,
        ha=ha,
        moderator_token=moderator_token,
    )
    stack.env["HTTP_PORT"] = str(stack.http_port)
    compose = DockerCompose(
        ROOT,
        compose_file_name=list(CLUSTER_FILES) if cluster else list(HA_FILES) if ha else None,
        profiles=[CLUSTER_PROFILE] if cluster else [HA_PROFILE] if ha else None,
        env_file=[str(STACK_ENV)],
        build=True,
        wait=True,
        quiet_build=True,
    )
    try:
        with environment(stack.env):
            compose.start()
        stack.wait_cluster_ok()
        yield stack
    except subprocess.CalledProcessError as error:
        raise AssertionError(f"docker compose failed: {error.stderr or error.stdout}") from None
    finally:
        try:
            with environment(stack.env):
                compose.stop()
        finally:
            images = stack.docker("images", "--quiet", "--filter", f"reference=*/*:{project}", check=False).stdout
            if images.split():
                stack.docker("image", "rm", "--force", *set(images.split()), check=False)
