"""The one place the benchmark and the tests drive Docker: the CLI, a Compose project's containers, their health."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Sequence

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
# Compose builds its images with the project and service labels, so a container `docker run` makes from one
# carries them too; only Compose's own service containers say oneoff=False (as `docker compose ps` filters).
SERVICE_CONTAINER = "com.docker.compose.oneoff=False"
HEALTH = "{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}"
READY = ("healthy", "running")  # running counts only where a container has no health check


def docker_command(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`docker <args>`, its output captured as text; raises CalledProcessError on failure when `check`."""
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


def docker(*args: str, timeout: float = 60) -> str:
    """What `docker <args>` prints; raises CalledProcessError when it fails."""
    return docker_command(*args, timeout=timeout).stdout


def project_containers(project: str, service: str | None = None, *, all_states: bool = False) -> list[str]:
    """Names of a Compose project's containers (of one service if given), in replica order: web-1, web-2, ...
    Running ones only, unless `all_states`."""
    filters = ["--filter", f"label={PROJECT_LABEL}={project}", "--filter", f"label={SERVICE_CONTAINER}"]
    if service is not None:
        filters += ["--filter", f"label={SERVICE_LABEL}={service}"]
    names = docker("ps", *(["--all"] if all_states else []), *filters, "--format", "{{.Names}}").split()
    return sorted(names, key=lambda name: (name.rsplit("-", 1)[0], replica_number(name)))


def replica_number(name: str) -> int:
    """The number Compose gives each container of a service (project-web-2: 2), 0 for a name without one."""
    match = re.search(r"-(\d+)$", name)
    return int(match.group(1)) if match else 0


def health(containers: Sequence[str]) -> dict[str, str]:
    """Container name -> 'healthy', 'unhealthy', 'starting', or its state ('running', 'exited', ...) where it has
    no health check."""
    if not containers:
        return {}
    lines = docker("inspect", "--format", HEALTH, *containers).splitlines()
    rows = (line.lstrip("/").partition(" ") for line in lines if line.strip())
    return {name: state for name, _, state in rows}


def wait_healthy(containers: Sequence[str], timeout: float) -> None:
    """Returns once every container is healthy (or running, where it has no health check); raises TimeoutError
    with their states when that takes longer than `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        states = health(containers)
        if states and all(state in READY for state in states.values()):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"containers not healthy within {timeout:.0f}s: {states}")
        time.sleep(0.5)
