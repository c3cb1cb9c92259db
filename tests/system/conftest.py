"""The system tests share one Compose stack per session (see support/stack.py)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from support.stack import Stack, running_stack


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    with running_stack() as started:
        yield started


@pytest.fixture
def room() -> str:
    """A room of the test's own, so tests never see each other's messages."""
    return f"t-{secrets.token_hex(6)}"


@pytest.fixture
def replicas(stack: Stack) -> list[str]:
    """The names the web replicas give themselves, in container order."""
    return [stack.replica_name(container) for container in stack.web_containers()]
