"""Fixtures shared by every kind of test. The markers follow the folders: tests/unit, tests/system, tests/browser."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.redis_server import ClusterServer, RedisServer, redis_image_built, started_cluster, started_redis
from support.stack import Stack, running_stack

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="also run long variants (soak, long fuzz)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        kind = Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        if kind in ("unit", "system", "browser"):
            item.add_marker(kind)
    if not config.getoption("--long"):
        # Long variants are opt-in and documented; they are not part of a normal run, and say so.
        deselected = [item for item in items if item.get_closest_marker("long")]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if not item.get_closest_marker("long")]


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The whole Compose stack, started once per session for the system and browser tests (support/stack.py)."""
    with running_stack() as started:
        yield started


@pytest.fixture(scope="session")
def cluster_stack() -> Iterator[Stack]:
    """The whole stack on the Redis Cluster of the `cluster` profile (six nodes instead of the single Redis), started
    once per session, and only when a test asks for it."""
    with running_stack(cluster=True) as started:
        yield started


@pytest.fixture(scope="session")
def ha_stack() -> Iterator[Stack]:
    """The whole stack on the `ha` profile's primary, replica and three Sentinels instead of the single Redis,
    started once per session, and only when a test asks for it."""
    with running_stack(ha=True) as started:
        yield started


@pytest.fixture
def room() -> str:
    """A room of the test's own, so tests never see each other's messages."""
    return f"t-{secrets.token_hex(6)}"


@pytest.fixture
def replicas(stack: Stack) -> list[str]:
    """The names the web replicas give themselves, in container order."""
    return [stack.replica_name(container) for container in stack.web_containers()]


@pytest.fixture(scope="session")
def redis_image() -> Iterator[str]:
    """The image of services/redis, built once per session for the broker tests."""
    with redis_image_built() as image:
        yield image


@pytest.fixture(scope="module")
def redis_server(redis_image: str) -> Iterator[RedisServer]:
    """A Redis of that image of the test module's own (support/redis_server.py)."""
    with started_redis(redis_image) as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster(redis_image: str) -> Iterator[ClusterServer]:
    """A Redis Cluster of that image (three primaries, a replica each) of the test module's own."""
    with started_cluster(redis_image) as server:
        yield server
