"""The Docker helpers the benchmark and tests/support/stack.py share (bench/chatbench/docker.py), with the docker
CLI replaced by canned answers."""

from __future__ import annotations

import pytest

from chatbench import docker


def answering(monkeypatch: pytest.MonkeyPatch, answer: str) -> list[tuple[str, ...]]:
    asked: list[tuple[str, ...]] = []

    def fake(*args: str, timeout: float = 60) -> str:
        asked.append(args)
        return answer

    monkeypatch.setattr(docker, "docker", fake)
    return asked


def test_containers_come_in_replica_order(monkeypatch: pytest.MonkeyPatch) -> None:
    answering(monkeypatch, "chat-web-10\nchat-web-2\nchat-redis-1\nchat-web-1\n")
    assert docker.project_containers("chat") == ["chat-redis-1", "chat-web-1", "chat-web-2", "chat-web-10"]


def test_containers_are_the_projects_service_containers_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # A container `docker run` makes from one of the stack's images carries its project and service labels too.
    asked = answering(monkeypatch, "")
    docker.project_containers("chat", "web", all_states=True)
    [args] = asked
    filters = {args[i + 1] for i, arg in enumerate(args) if arg == "--filter"}
    assert filters == {
        "label=com.docker.compose.project=chat",
        "label=com.docker.compose.service=web",
        "label=com.docker.compose.oneoff=False",
    }
    assert "--all" in args


def test_wait_healthy_returns_once_all_are_healthy_or_running_without_a_check(monkeypatch: pytest.MonkeyPatch) -> None:
    answering(monkeypatch, "/chat-web-1 healthy\n/chat-tool-1 running\n")
    docker.wait_healthy(["chat-web-1", "chat-tool-1"], timeout=0)


def test_wait_healthy_gives_up_at_its_deadline_naming_the_states(monkeypatch: pytest.MonkeyPatch) -> None:
    answering(monkeypatch, "/chat-web-1 healthy\n/chat-web-2 starting\n")
    with pytest.raises(TimeoutError, match="'chat-web-2': 'starting'"):
        docker.wait_healthy(["chat-web-1", "chat-web-2"], timeout=0)
