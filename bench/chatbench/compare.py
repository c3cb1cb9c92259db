"""bench/compare-storm: the storm scenario run against two running stacks, interleaved (A B B A in each round, so a
drift of the machine's speed during a round weighs on both builds alike), and a table of each figure's mean per
build. Each run is `bench/run storm` with its own results folder; the table is made from their JSON."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chatbench.report import fmt

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
Result = dict[str, Any]
ORDER = (0, 1, 1, 0)  # one round: A B B A


def _storm(res: Result, *path: str) -> Any:
    value: Any = res["storm"]
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _kind(kind: str, field: str, scale: float = 1) -> Callable[[Result], float | None]:
    def get(res: Result) -> float | None:
        value = _storm(res, "traffic", "by_type", kind, field)
        return None if value is None else value / scale

    return get


def _replicas(res: Result, restarted: bool | None) -> float | None:
    """CPU seconds of the restarted replica (True), of the others (False), or of all of them (None)."""
    containers = _storm(res, "cpu", "containers") or {}
    values = [
        c["cpu_s"]
        for name, c in containers.items()
        if name.startswith("web") and "cpu_s" in c and (restarted is None or c.get("restarted") is restarted)
    ]
    return sum(values) if values else None


def _kb(value: Any) -> float | None:
    return None if value is None else value / 1e3


def _mb(value: Any) -> float | None:
    return None if value is None else value / 1e6


# figure, how to read it from a storm's JSON, digits shown
FIGURES: list[tuple[str, Callable[[Result], float | None], int]] = [
    ("clients welcomed again", lambda r: _storm(r, "reconnect", "reconnected"), 0),
    ("all live again, s after the restart", lambda r: _storm(r, "reconnect", "all_live_s"), 2),
    ("reconnect p50, ms (close to welcome)", lambda r: _storm(r, "reconnect", "reconnect_ms", "p50"), 0),
    ("reconnect p99, ms", lambda r: _storm(r, "reconnect", "reconnect_ms", "p99"), 0),
    ("reconnect attempts, most by one client", lambda r: _storm(r, "reconnect", "attempts_max"), 1),
    ("last presence frame, s after the restart", lambda r: _storm(r, "presence_settled_s"), 2),
    ("window, s (restart to settled)", lambda r: _storm(r, "window_s"), 2),
    ("frames received, all clients", lambda r: _storm(r, "traffic", "frames"), 0),
    ("MB received, all clients", lambda r: _mb(_storm(r, "traffic", "bytes")), 2),
    ("welcome frames", _kind("welcome", "frames"), 0),
    ("welcome MB", _kind("welcome", "bytes", 1e6), 2),
    ("presence frames", _kind("presence", "frames"), 0),
    ("presence MB", _kind("presence", "bytes", 1e6), 2),
    ("message frames", _kind("message", "frames"), 0),
    ("message MB", _kind("message", "bytes", 1e6), 2),
    ("error frames", _kind("error", "frames"), 0),
    ("most frames to one client", lambda r: _storm(r, "traffic", "per_client_max", "frames"), 0),
    ("most KB to one client", lambda r: _kb(_storm(r, "traffic", "per_client_max", "bytes")), 1),
    ("restarted replica CPU s", lambda r: _replicas(r, True), 2),
    ("other replicas CPU s", lambda r: _replicas(r, False), 2),
    ("all replicas CPU s", lambda r: _replicas(r, None), 2),
    ("nginx CPU s", lambda r: _storm(r, "cpu", "services", "nginx", "cpu_s"), 2),
    ("redis CPU s", lambda r: _storm(r, "cpu", "services", "redis", "cpu_s"), 2),
    ("generator CPU s", lambda r: _storm(r, "cpu", "generator", "cpu_s"), 2),
    ("machine busy cores", lambda r: _storm(r, "cpu", "machine", "busy_cores"), 2),
    ("messages lost", lambda r: _storm(r, "messages", "lost"), 1),
    ("messages duplicated", lambda r: _storm(r, "messages", "duplicated"), 1),
    ("runs not in one order", lambda r: 0 if _storm(r, "messages", "order", "same_order") else 1, 1),
    ("runs not settled by the deadline", lambda r: 0 if _storm(r, "settled") else 1, 1),
]


def summarize(values: Sequence[float | None], digits: int) -> str:
    """The mean, and the range when the runs differ: `12.3 (11.0-13.5)`."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return "–"
    mean = sum(present) / len(present)
    text = fmt(mean, digits)
    low, high = fmt(min(present), digits), fmt(max(present), digits)
    if low != high:
        text += f" ({low}–{high})"
    if len(present) < len(values):
        text += f" [{len(present)} of {len(values)}]"
    return text


def ratio(a: Sequence[float | None], b: Sequence[float | None]) -> str:
    """B's mean over A's."""
    av = [float(v) for v in a if v is not None]
    bv = [float(v) for v in b if v is not None]
    if not av or not bv:
        return "–"
    mean_a, mean_b = sum(av) / len(av), sum(bv) / len(bv)
    return "–" if mean_a == 0 else f"{mean_b / mean_a:.2f}"


def compare_table(labels: tuple[str, str], runs: dict[str, list[Result]]) -> str:
    """One row per figure: each build's mean over its runs (range in brackets), and B / A."""
    a, b = labels
    ok = {label: [r for r in runs.get(label, []) if r.get("storm")] for label in labels}
    lines = [
        f"| figure | {a} ({len(ok[a])} runs) | {b} ({len(ok[b])} runs) | {b} / {a} |",
        "|---|---|---|---|",
    ]
    for name, get, digits in FIGURES:
        va = [get(r) for r in ok[a]]
        vb = [get(r) for r in ok[b]]
        lines.append(f"| {name} | {summarize(va, digits)} | {summarize(vb, digits)} | {ratio(va, vb)} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/compare-storm",
        description="Run the storm scenario against two running stacks, interleaved A B B A per round, and print "
        "the mean of each figure per build. Options after -- go to bench/run (e.g. -- --clients 200).",
    )
    p.add_argument("--a", nargs=2, required=True, metavar=("URL", "PROJECT"), help="build A's nginx URL and project")
    p.add_argument("--b", nargs=2, required=True, metavar=("URL", "PROJECT"), help="build B's nginx URL and project")
    p.add_argument("--labels", nargs=2, default=["A", "B"], metavar=("A", "B"), help="names of the builds")
    p.add_argument("--rounds", type=int, default=3, help="rounds of A B B A (default 3: six runs of each)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the runs go (default bench/results)")
    return p


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = parser().parse_args(argv)
    labels = (str(args.labels[0]), str(args.labels[1]))
    stacks = [(labels[0], *args.a), (labels[1], *args.b)]
    folder = args.results / f"{time.strftime('%Y%m%d-%H%M%S')}-compare-storm"
    folder.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[Result]] = {labels[0]: [], labels[1]: []}
    files: list[str] = []
    n = 0
    for k in range(args.rounds):
        for which in ORDER:
            label, url, project = stacks[which]
            n += 1
            out = folder / f"{n:02d}-{label}"
            command = [
                str(ROOT / "bench" / "run"),
                "storm",
                "--url",
                url,
                "--project",
                project,
                "--label",
                f"{label} run {n}",
                "--results",
                str(out),
                *extra,
            ]
            log(f"compare-storm: round {k + 1} of {args.rounds}, run {n}: {label} ({project}, {url})")
            done = subprocess.run(command, cwd=ROOT, check=False)
            found = sorted(out.glob("*-storm.json"))
            if done.returncode != 0 or not found:
                log(f"compare-storm: run {n} ({label}) failed (exit {done.returncode}); left out of the means")
                continue
            res: Result = json.loads(found[-1].read_text())
            if res.get("error"):
                log(f"compare-storm: run {n} ({label}): {res['error']}; left out of the means")
                continue
            runs[label].append(res)
            files.append(str(found[-1]))
    table = compare_table(labels, runs)
    head = (
        f"# Storm, {labels[0]} against {labels[1]}: {args.rounds} round(s) of A B B A\n\n"
        f"{labels[0]}: {args.a[1]} at {args.a[0]}; {labels[1]}: {args.b[1]} at {args.b[0]}; bench/run options: "
        f"{' '.join(extra) or '(none)'}. Means over the runs, the range in brackets.\n"
    )
    text = head + "\n" + table + "\n\nRuns:\n" + "".join(f"- {f}\n" for f in files)
    (folder / "compare.md").write_text(text)
    print(table)
    log(f"compare-storm: wrote {folder / 'compare.md'}")
    return 0 if all(runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
