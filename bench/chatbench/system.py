"""What the machine and the stack's containers spend: busy cores from /proc/stat, CPU of processes from
/proc/<pid>/stat, and each container's CPU and memory from its cgroup (the numbers `docker stats` shows)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from chatbench.docker import PROJECT_LABEL, SERVICE_LABEL, docker, project_containers, replica_number, wait_healthy

HZ = os.sysconf("SC_CLK_TCK")  # USER_HZ: the unit of /proc/stat and /proc/<pid>/stat times
NCPU = os.cpu_count() or 1
PROC = Path("/proc")
CGROUP = Path("/sys/fs/cgroup")


# ---------------------------------------------------------------- the machine


@dataclass(frozen=True, slots=True)
class MachineTimes:
    user: int
    system: int
    idle: int
    iowait: int
    irq: int
    softirq: int
    steal: int
    total: int


def read_machine() -> MachineTimes | None:
    try:
        first = (PROC / "stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    v = [int(x) for x in first[1:9]] + [0] * 8
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    return MachineTimes(user + nice, system, idle, iowait, irq, softirq, steal, sum(v[:8]))


def machine_report(a: MachineTimes, b: MachineTimes) -> dict[str, float]:
    """Everything on the box over the window: busy cores and where the time went."""
    total = (b.total - a.total) or 1
    idle = b.idle - a.idle
    busy = total - idle - (b.iowait - a.iowait)

    def pct(x: int) -> float:
        return round(100 * x / total, 1)

    return {
        "ncpu": NCPU,
        "busy_cores": round(busy / total * NCPU, 2),
        "busy_pct": pct(busy),
        "user_pct": pct(b.user - a.user),
        "system_pct": pct(b.system - a.system),
        "softirq_pct": pct(b.softirq - a.softirq + b.irq - a.irq),
        "steal_pct": pct(b.steal - a.steal),
        "idle_pct": pct(idle),
    }


def busy_seconds(a: MachineTimes, b: MachineTimes) -> float:
    """CPU seconds all processes used together over the window."""
    total = (b.total - a.total) or 1
    busy = total - (b.idle - a.idle) - (b.iowait - a.iowait)
    return busy / HZ


# ---------------------------------------------------------------- processes


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, CPU ticks used so far) for every process we can see."""
    table: dict[int, tuple[int, int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat_fields(int(entry.name))
        if stat is not None:
            table[int(entry.name)] = (int(stat[1]), int(stat[11]) + int(stat[12]))
    return table


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, ..., utime at 11, stime at 12]."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def process_ticks(pid: int) -> tuple[int, int] | None:
    """CPU ticks (user, system) one process has used."""
    stat = _stat_fields(pid)
    return None if stat is None else (int(stat[11]), int(stat[12]))


def tree_ticks(root: int, table: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """CPU ticks of a process and all its descendants (a Hypercorn master and its workers, nginx and its
    workers), and how many processes that is. As fanout.mjs --watch-pids."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    ticks = procs = 0
    stack, seen = [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        ticks += table[pid][1]
        procs += 1
        stack.extend(children.get(pid, []))
    return ticks, procs


# ---------------------------------------------------------------- containers


@dataclass(slots=True)
class Container:
    """One container of the stack under test."""

    name: str  # as in the report: web-1, web-2, nginx-1, redis-1
    service: str  # web, nginx, redis
    id: str
    pid: int  # its main process, in this machine's pid namespace
    hostname: str  # what a replica calls itself (the `replica` of its welcome)
    started: str = ""  # when the container (re)started, as docker inspect says
    cpu_file: Path | None = None  # cpuacct.usage (ns, cgroup v1) or cpu.stat (usage_usec, cgroup v2)
    mem_files: tuple[Path, Path] | None = None  # usage, stat (to subtract inactive_file, as docker stats does)


@dataclass(slots=True)
class ContainerSample:
    cpu_ns: int | None = None
    memory_bytes: int | None = None  # docker stats' MEM USAGE: cgroup usage minus inactive file cache
    rss_bytes: int | None = None  # resident memory of its processes
    procs: int = 0


@dataclass(slots=True)
class Sample:
    """One snapshot taken at the edge of a measured window."""

    t_ns: int
    machine: MachineTimes | None
    processes: dict[int, tuple[int, int] | None]  # generator pid -> CPU ticks (user, system)
    containers: dict[str, ContainerSample] = field(default_factory=dict)


def compose_project_of(url: str) -> str | None:
    """The Compose project whose container publishes the URL's port on this machine, if any."""
    port = urlsplit(url).port
    if port is None:
        return None
    try:
        out = docker("ps", "--filter", f"publish={port}", "--format", f'{{{{.Label "{PROJECT_LABEL}"}}}}')
    except (OSError, subprocess.SubprocessError):
        return None
    projects = [line for line in out.split() if line]
    return projects[0] if projects else None


def discover(project: str) -> list[Container]:
    """The running containers of a Compose project, with their main pid and cgroup files."""
    names = project_containers(project)
    if not names:
        return []
    fmt = "|".join(
        [
            "{{.Name}}",
            "{{.Id}}",
            "{{.State.Pid}}",
            "{{.Config.Hostname}}",
            f'{{{{index .Config.Labels "{SERVICE_LABEL}"}}}}',
            "{{.State.StartedAt}}",
        ]
    )
    containers = []
    for line in docker("inspect", "--format", fmt, *names).splitlines():
        if not line.strip():
            continue
        name, cid, pid, hostname, service, started = line.split("|")
        short = name.lstrip("/").removeprefix(f"{project}-")
        container = Container(name=short, service=service, id=cid, pid=int(pid), hostname=hostname, started=started)
        container.cpu_file, container.mem_files = _cgroup_files(int(pid))
        containers.append(container)
    return sorted(containers, key=lambda c: (c.service != "web", c.service, replica_number(c.name)))


def restart(containers: list[Container], timeout: float = 180) -> None:
    """Restarts containers and waits until each is healthy again (or running, where it has no health check)."""
    if not containers:
        return
    ids = [c.id for c in containers]
    docker("restart", *ids, timeout=timeout)
    wait_healthy(ids, timeout)


def _cgroup_files(pid: int) -> tuple[Path | None, tuple[Path, Path] | None]:
    try:
        lines = (PROC / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None, None
    v1: dict[str, str] = {}
    unified = ""
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            unified = path
        for controller in controllers.split(","):
            v1[controller] = path
    cpu: Path | None = None
    mem: tuple[Path, Path] | None = None
    if "cpuacct" in v1 and (CGROUP / "cpuacct" / v1["cpuacct"].lstrip("/") / "cpuacct.usage").exists():
        cpu = CGROUP / "cpuacct" / v1["cpuacct"].lstrip("/") / "cpuacct.usage"
    elif unified and (CGROUP / unified.lstrip("/") / "cpu.stat").exists():
        cpu = CGROUP / unified.lstrip("/") / "cpu.stat"
    if "memory" in v1 and (CGROUP / "memory" / v1["memory"].lstrip("/") / "memory.usage_in_bytes").exists():
        base = CGROUP / "memory" / v1["memory"].lstrip("/")
        mem = (base / "memory.usage_in_bytes", base / "memory.stat")
    elif unified and (CGROUP / unified.lstrip("/") / "memory.current").exists():
        base = CGROUP / unified.lstrip("/")
        mem = (base / "memory.current", base / "memory.stat")
    return cpu, mem


def sample_container(container: Container, table: dict[int, tuple[int, int]]) -> ContainerSample:
    sample = ContainerSample()
    ticks, sample.procs = tree_ticks(container.pid, table)
    sample.cpu_ns = _read_cpu_ns(container.cpu_file)
    if sample.cpu_ns is None and sample.procs:
        sample.cpu_ns = ticks * 1_000_000_000 // HZ
    sample.memory_bytes = _read_memory(container.mem_files)
    sample.rss_bytes = _tree_rss(container.pid, table)
    return sample


def _read_cpu_ns(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError:
        return None
    if path.name == "cpuacct.usage":
        return int(text)
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) * 1000
    return None


def _read_memory(files: tuple[Path, Path] | None) -> int | None:
    if files is None:
        return None
    try:
        usage = int(files[0].read_text())
        stat = files[1].read_text()
    except OSError:
        return None
    inactive = 0
    for line in stat.splitlines():
        key, _, value = line.partition(" ")
        # cgroup v1 reports the hierarchy's total under total_inactive_file; v2 has inactive_file only
        if key in ("total_inactive_file", "inactive_file"):
            inactive = int(value)
            if key == "total_inactive_file":
                break
    return max(0, usage - inactive)


def _tree_rss(root: int, table: dict[int, tuple[int, int]]) -> int | None:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, stack, seen, found = 0, [root], set(), False
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            for line in (PROC / str(pid) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    found = True
                    break
        except OSError:
            continue
        stack.extend(children.get(pid, []))
    return total if found else None


def docker_stats_memory(containers: list[Container]) -> dict[str, int]:
    """Fallback where cgroup files cannot be read: `docker stats --no-stream` (about 2 s, and costs CPU)."""
    if not containers:
        return {}
    out = docker("stats", "--no-stream", "--format", "{{.ID}} {{.MemUsage}}", *[c.id for c in containers])
    by_id = {c.id[:12]: c.name for c in containers}
    memory: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0][:12] in by_id:
            memory[by_id[parts[0][:12]]] = parse_size(parts[1])
    return memory


def parse_size(text: str) -> int:
    """'37.22MiB' -> bytes, as `docker stats` prints sizes."""
    match = re.fullmatch(r"([\d.]+)\s*([KMGT]?i?B)", text)
    if not match:
        return 0
    units = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4, "kB": 1000, "KB": 1000}
    units |= {"MB": 1000**2, "GB": 1000**3, "TB": 1000**4}
    return int(float(match.group(1)) * units.get(match.group(2), 1))


def cpu_now(containers: list[Container]) -> dict[str, int | None]:
    """Each container's CPU so far (ns), from its cgroup file alone where known (cheap enough to read every 100
    ms); None where it cannot be read (a container between stop and start)."""
    table = process_table() if any(c.cpu_file is None for c in containers) else {}
    out: dict[str, int | None] = {}
    for c in containers:
        if c.cpu_file is not None:
            out[c.name] = _read_cpu_ns(c.cpu_file)
        else:
            ticks, procs = tree_ticks(c.pid, table)
            out[c.name] = ticks * 1_000_000_000 // HZ if procs else None
    return out


def take_sample(generator_pids: list[int], containers: list[Container]) -> Sample:
    """One snapshot of the machine, the generator's processes and the containers (about 10-30 ms)."""
    t = time.monotonic_ns()
    machine = read_machine()
    processes = {pid: process_ticks(pid) for pid in generator_pids}
    table = process_table() if containers else {}
    return Sample(t, machine, processes, {c.name: sample_container(c, table) for c in containers})
