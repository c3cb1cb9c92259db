"""The Compose stack under test: started once per session under a project name and host port of its own, so a
stack started by scripts/up is never touched, and torn down with its volume at the end."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from testcontainers.compose import DockerCompose

from chatbench.docker import docker, docker_command, health, project_containers, wait_healthy

from .addresses import forwarded

ROOT = Path(__file__).resolve().parents[2]
STACK_ENV = ROOT / "tests" / "stack.env"


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

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}/ws"

    @property
    def origin(self) -> str:
        return self.base_url

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "compose", "--env-file", str(STACK_ENV), *args],
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

    def states(self) -> dict[str, str]:
        """Container name -> 'healthy', 'unhealthy', 'starting', or the container state when it has no health."""
        return health(project_containers(self.project, all_states=True))

    def wait_healthy(self, timeout: float = 180) -> None:
        try:
            wait_healthy(project_containers(self.project, all_states=True), timeout)
        except TimeoutError as error:
            raise AssertionError(f"the stack: {error}") from None  # a test that waits on it fails, not errors

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

    def rss_kib(self, container: str) -> int:
        """Resident memory of the container's main process (PID 1), in KiB."""
        return int(self.exec(container, "grep", "VmRSS", "/proc/1/status").stdout.split()[1])

    def redis_cli(self, *args: str) -> str:
        """A redis-cli command in Redis's own container, with the password from its environment."""
        command = 'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli "$@"'
        return self.exec(self.containers("redis")[0], "sh", "-c", command, "redis-cli", *args).stdout

    def replicas_hearing(self, room: str) -> int:
        """How many connections (one per replica) are subscribed to the room's channel."""
        _, count = self.redis_cli("pubsub", "numsub", f"chat:{{{room}}}:channel").split()
        return int(count)

    def redis_info(self) -> dict[str, str]:
        """Redis's INFO (memory, CPU, stats, ...) as field -> value."""
        lines = self.redis_cli("info", "everything").splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))

    def redis_cpu_seconds(self) -> float:
        info = self.redis_info()
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

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
def running_stack() -> Iterator[Stack]:
    require_docker()
    reused = os.environ.get("TEST_STACK_PROJECT")
    if reused:
        # While writing a test: run it against a stack already up (started with tests/stack.env's settings), which
        # is left as it is. CI never sets this.
        yield Stack(
            project=reused,
            http_port=int(os.environ["TEST_STACK_PORT"]),
            env={"COMPOSE_PROJECT_NAME": reused, "REDIS_PASSWORD": os.environ.get("TEST_STACK_REDIS_PASSWORD", "")},
        )
        return
    project = f"chat-test-{secrets.token_hex(3)}"
    stack = Stack(
        project=project,
        http_port=free_port(),
        env={
            "COMPOSE_PROJECT_NAME": project,
            "HTTP_BIND": "127.0.0.1",
            "REDIS_PASSWORD": secrets.token_hex(16),
            # Images of their own: another test session building other sources at the same time is not mixed in.
            "IMAGE_TAG": project,
        },
    )
    stack.env["HTTP_PORT"] = str(stack.http_port)
    saved = {key: os.environ.get(key) for key in stack.env}
    os.environ.update(stack.env)  # testcontainers runs docker compose with this process's environment
    compose = DockerCompose(ROOT, env_file=[str(STACK_ENV)], build=True, wait=True, quiet_build=True)
    try:
        compose.start()
        yield stack
    except subprocess.CalledProcessError as error:
        raise AssertionError(f"docker compose failed: {error.stderr or error.stdout}") from None
    finally:
        try:
            compose.stop()
        finally:
            images = stack.docker("images", "--quiet", "--filter", f"reference=*/*:{project}", check=False).stdout
            if images.split():
                stack.docker("image", "rm", "--force", *set(images.split()), check=False)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
