"""Runs the team's reference generator, ../shared/bench/fanout.mjs, on the same scenario, so that the two
tools' figures can be shown side by side. It runs from a writable copy with one bug fixed (bench/README.md)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from chatbench.scenarios import Scenario
from chatbench.system import Container

SOURCE = Path("/work/shared/bench")
# Before its first step, fanout.mjs's marker is an empty Buffer: a ready client that receives any frame then
# (presence events while the others connect) loops forever in data.indexOf(MARK), which always finds 0.
BUG = "  let p = data.indexOf(MARK);"
FIX = "  let p = MARK.length ? data.indexOf(MARK) : -1;"


class FanoutCopy:
    """fanout.mjs copied to a temporary directory, patched, with its pinned `ws` installed by `npm ci`."""

    def __init__(self, source: Path = SOURCE) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="chatbench-fanout-"))
        for name in ("fanout.mjs", "package.json", "package-lock.json"):
            shutil.copy(source / name, self.dir / name)
        script = self.dir / "fanout.mjs"
        text = script.read_text()
        if text.count(BUG) != 1:
            raise RuntimeError(f"{source / 'fanout.mjs'} changed: the line to fix is not there once; check the fix")
        script.write_text(text.replace(BUG, FIX))
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--silent"],
            cwd=self.dir,
            check=True,
            capture_output=True,
            timeout=300,
        )

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
