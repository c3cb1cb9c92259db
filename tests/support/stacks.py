"""Fixtures for system tests that run on both Redis layouts: a module that imports them (`from support.stacks import
either_stack, room_on_a_primary`) runs each of its tests on the single Redis and on the Redis Cluster, each in a room
of its own on a primary picked at random."""

from __future__ import annotations

import secrets

import pytest

from .stack import Stack, room_on


@pytest.fixture(scope="session", params=["standalone", "cluster"], name="stack")
def either_stack(request: pytest.FixtureRequest) -> Stack:
    """The session's stack on the single Redis (conftest's `stack`), or on the Redis Cluster (`cluster_stack`)."""
    started: Stack = request.getfixturevalue("stack" if request.param == "standalone" else "cluster_stack")
    return started


@pytest.fixture(name="room")
def room_on_a_primary(stack: Stack) -> str:
    """A room of the test's own; on the cluster, on a primary picked at random."""
    primaries = stack.primaries()
    return room_on(primaries[secrets.randbelow(len(primaries))])
