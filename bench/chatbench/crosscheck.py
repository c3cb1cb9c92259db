"""Runs the team's reference generator, ../shared/bench/fanout.mjs, on the same scenario, so that the two
tools' figures can be shown side by side. It runs, unchanged, from a writable copy (bench/README.md)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from chatbench.scenarios import Scenario
from chatbench.system import Container

# The team's tools sit beside the repository, wherever it is checked out; never at an absolute path.
RELATIVE_SOURCE = Path("../shared/bench")
ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / RELATIVE_SOURCE
FILES = ("fanout.mjs", "package.json", "package-lock.json")
# Before 1.2.0, a client that received a frame before the first step (our presence events while the others
# connect) searched for an empty marker and looped forever.
OLDEST = "1.2.0"


class FanoutCopy:
    """fanout.mjs copied as it is to a temporary directory (its source is read-only), with its pinned `ws`
    installed by `npm ci`."""

    def __init__(self, source: Path = SOURCE) -> None:
        check_version(source / "fanout.mjs")
        self.dir = Path(tempfile.mkdtemp(prefix="chatbench-fanout-"))
        try:
            for name in FILES:
                shutil.copy(source / name, self.dir / name)
            npm_ci(self.dir)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def command(
        self, sc: Scenario, *, url: str, room_prefix: str, name_prefix: str, containers: list[Container], seed: int
    ) -> list[str]:
        args = {
            "protocol": "v1",
            "urls": url,
            "clients": sc.clients,
            "rooms": sc.rooms,
            "senders": sc.sender_count(),
            "rate": sc.sender_rate(),
            "arrival": sc.arrival,
            "seed": seed,
            "duration": sc.duration_s,
            "warmup": sc.warmup_s,
            "grace": sc.grace_s,
            "size": sc.size,
            "room-prefix": room_prefix,
            "name-prefix": name_prefix,
        }
        if sc.find_max:
            args |= {
                "p99-bound-ms": sc.p99_bound_ms,
                "start-rate": sc.start_rate or sc.sender_rate() * sc.sender_count(),
                "step-factor": sc.step_factor,
                "refine": sc.refine,
                "max-steps": sc.max_steps,
                "max-time": sc.max_time_s,
            }
        command = ["node", "fanout.mjs"]
        for key, value in args.items():
            command += [f"--{key}", f"{value:g}" if isinstance(value, float) else str(value)]
        if sc.find_max:
            command.append("--find-max")
        if containers:
            command += ["--watch-pids", ",".join(f"{c.name}={c.pid}" for c in containers)]
        return [*command, "--quiet"]

    def run(self, command: list[str], timeout: float) -> dict[str, Any]:
        done = subprocess.run(command, cwd=self.dir, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"fanout.mjs exited {done.returncode}: {done.stderr.strip()[-500:]}")
        result: dict[str, Any] = json.loads(done.stdout)
        return result


def check_version(script: Path) -> None:
    """Refuses a fanout.mjs that is missing or older than OLDEST. Its own VERSION (the one its --help and JSON
    report) decides: its package.json has not followed it (it says 0.1.0 at 1.2.0)."""
    if not script.is_file():
        raise FileNotFoundError(
            f"no fanout.mjs at {script}: --crosscheck needs the team's generator at {RELATIVE_SOURCE}/fanout.mjs, "
            "relative to the repository root"
        )
    match = re.search(r"^const VERSION = '(\d+\.\d+\.\d+)';", script.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{script} names no VERSION; --crosscheck needs fanout.mjs {OLDEST} or later")
    if numbers(match.group(1)) < numbers(OLDEST):
        raise RuntimeError(
            f"{script} is version {match.group(1)}; --crosscheck needs {OLDEST} or later, which does not hang on "
            "frames that arrive before the first step"
        )


def numbers(version: str) -> tuple[int, ...]:
    """'1.10.0' -> (1, 10, 0), so that versions compare as numbers."""
    return tuple(int(part) for part in version.split("."))


def npm_ci(directory: Path) -> None:
    """Installs the `ws` that package-lock.json pins."""
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--silent"],
        cwd=directory,
        check=True,
        capture_output=True,
        timeout=300,
    )
