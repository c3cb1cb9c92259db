"""A Redis of the project's own image (services/redis: password, AOF, renamed commands, the memory policy), started
with testcontainers and published on this machine's loopback only, for the tests of the brokers."""

from __future__ import annotations

import contextlib
import secrets
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
        """A RedisBroker on this server, as a replica would have one, with these settings."""
        return RedisBroker(
            Settings(replica_name="broker-test", redis_url=self.url, redis_password=Secret(self.password), **settings)
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
