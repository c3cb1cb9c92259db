"""Fixtures of the system tests (the `stack` itself is shared with the browser tests: tests/conftest.py)."""

from __future__ import annotations

import secrets

import pytest

from support.stack import Stack


@pytest.fixture
def room() -> str:
    """A room of the test's own, so tests never see each other's messages."""
    return f"t-{secrets.token_hex(6)}"


@pytest.fixture
def replicas(stack: Stack) -> list[str]:
    """The names the web replicas give themselves, in container order."""
    return [stack.replica_name(container) for container in stack.web_containers()]
