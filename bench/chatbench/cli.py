"""bench/run's command line: which scenarios, against which stack, with what overrides; writes the results."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from chatbench import report
from chatbench.crosscheck import FanoutCopy
from chatbench.runner import Options, ScenarioRun
from chatbench.scenarios import ALL, SCENARIOS, Scenario
from chatbench.system import compose_project_of, discover, restart

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"

# command-line option -> Scenario field, for running a scenario at another size
OVERRIDES = {
    "clients": int,
    "rooms": int,
    "senders": int,
    "rate": float,
    "total_rate": float,
    "warmup": float,
    "duration": float,
    "grace": float,
    "size": int,
    "arrival": str,
    "start_rate": float,
    "step_factor": float,
    "refine": int,
    "max_steps": int,
    "max_time": float,
    "p99_bound_ms": float,
    "storm_replica": str,
    "storm_quiet": float,
    "storm_deadline": float,
}
FIELD = {
    "warmup": "warmup_s",
    "duration": "duration_s",
    "grace": "grace_s",
    "max_time": "max_time_s",
    "storm_quiet": "storm_quiet_s",
    "storm_deadline": "storm_deadline_s",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="Load generator and benchmark runner for Infinite Chat (protocol v1). See bench/README.md.",
    )
    p.add_argument(
        "scenarios",
        nargs="*",
        default=["all"],
        help=f"any of {', '.join(SCENARIOS)}, or all (default: {', '.join(ALL)})",
    )
    p.add_argument("--url", help="WebSocket URL of nginx (default: `docker compose port nginx 8080`, path /ws)")
    p.add_argument(
        "--project", help="the stack's Compose project (default: the one whose container publishes the URL's port)"
    )
    p.add_argument("--up", action="store_true", help="bring the stack up first with scripts/up")
    p.add_argument("--processes", type=int, default=1, help="generator processes sharing the clients (default 1)")
    p.add_argument("--crosscheck", action="store_true", help="also run ../shared/bench/fanout.mjs on each scenario")
    p.add_argument("--room-prefix", default="bench", help="rooms are PREFIX-0, PREFIX-1, ... (default bench)")
    p.add_argument(
        "--name-prefix",
        default=None,
        help="user names are PREFIX0, PREFIX1, ... (default u<4 random hex>-: names are claimed, and a run reusing "
        "another's would find them taken)",
    )
    p.add_argument("--connect-concurrency", type=int, default=50, help="handshakes in flight at once, in all")
    p.add_argument("--rate-limit", type=float, default=5, help="the server's RATE_LIMIT; find-max stays under 0.8x")
    p.add_argument("--settle-max", type=float, default=5, help="longest wait for quiet between steps (s)")
    p.add_argument(
        "--restart-replicas",
        action="store_true",
        help="restart the web replicas before idle, so memory per connection is measured on fresh replicas",
    )
    p.add_argument(
        "--typing",
        type=float,
        default=0,
        metavar="SECONDS",
        help="every connected client also sends a typing notice every SECONDS in each step (the page: 3); default off",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--label", default="", help="copied into the results")
    p.add_argument("--results", type=Path, default=RESULTS, help="output folder (default bench/results)")
    p.add_argument(
        "--scale", type=float, help="scale every scenario's clients and senders by F (rooms keep their size)"
    )
    p.add_argument("--render", nargs="+", type=Path, metavar="JSON", help="only re-make Markdown and PNG from results")
    sizes = p.add_argument_group("scenario overrides (for smaller or other runs)")
    for name, kind in OVERRIDES.items():
        sizes.add_argument(f"--{name.replace('_', '-')}", type=kind, dest=name)
    return p


def default_url() -> str:
    done = subprocess.run(
        ["docker", "compose", "port", "nginx", "8080"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"no running stack found ({done.stderr.strip()}): start one (scripts/up) or pass --url")
    port = done.stdout.strip().rsplit(":", 1)[1]
    return f"ws://127.0.0.1:{port}/ws"


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{'https' if parts.scheme == 'wss' else 'http'}://{parts.netloc}"


def sized(scenario: Scenario, args: argparse.Namespace) -> Scenario:
    changes: dict[str, Any] = {}
    if args.scale:
        # Multi-room scenarios keep their room size and lose rooms; a one-room scenario gets a smaller room.
        f = args.scale
        changes["clients"] = max(2, round(scenario.clients * f))
        if scenario.rooms > 1:
            changes["rooms"] = max(1, round(scenario.rooms * f))
        if scenario.senders is not None:
            changes["senders"] = max(1, round(scenario.senders * f))
    for name in OVERRIDES:
        value = getattr(args, name)
        if value is not None:
            changes[FIELD.get(name, name)] = value
    return dataclasses.replace(scenario, **changes)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# What a stack under the benchmark needs (bench/README.md): all of the generator's sockets come from one address,
# which the production limits would treat as one abusive client. Per-connection limits stay as they are.
BENCH_LIMITS = {
    "WS_PER_ADDRESS": "65535",  # nginx's largest
    "WS_CONNECTS_PER_SECOND": "100000",
    "WS_CONNECTS_BURST": "100000",
    "HTTP_REQUESTS_PER_SECOND": "100000",
    "HTTP_REQUESTS_BURST": "100000",
    "SOCKETS_PER_ADDRESS": "1000000",
    "ADDRESS_BYTES_PER_HOUR": str(1 << 40),
    "ADDRESS_ROOMS_PER_HOUR": "1000000",
    "ADDRESS_NAMES_PER_HOUR": "1000000",
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.typing < 0:
        raise SystemExit("--typing takes seconds between notices (> 0), or 0 for none")
    if args.render:
        for path, res in zip(args.render, report.load(args.render), strict=True):
            report.write([res], path.with_suffix(""), title_of(res))
        return 0
    names = ALL if args.scenarios in (["all"], []) else args.scenarios
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}: choose from {', '.join(SCENARIOS)} or all")
    if args.up:
        # The generator is one address with thousands of sockets: lift the per-address limits for this stack.
        subprocess.run([str(ROOT / "scripts" / "up")], cwd=ROOT, check=True, env={**os.environ, **BENCH_LIMITS})
    url = args.url or default_url()
    project = args.project or compose_project_of(url)
    containers = discover(project) if project else []
    if not containers:
        log(f"note: no Compose containers publish {url}'s port here; replica CPU and memory will not be reported")
    options = Options(
        url=url,
        origin=origin_of(url),
        processes=args.processes,
        room_prefix=args.room_prefix,
        name_prefix=args.name_prefix or f"u{secrets.token_hex(2)}-",
        connect_concurrency=args.connect_concurrency,
        settle_max_s=args.settle_max,
        rate_limit=args.rate_limit,
        seed=args.seed,
        label=args.label,
        typing_s=args.typing,
        containers=containers,
        project=project,
        log=log,
    )
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    fanout = FanoutCopy() if args.crosscheck else None
    results: list[dict[str, Any]] = []
    try:
        for name in names:
            scenario = sized(SCENARIOS[name], args)
            if args.restart_replicas and scenario.memory_per_connection and project:
                log(f"{name}: restarting the replicas of {project} first (--restart-replicas)")
                restart([c for c in options.containers if c.service == "web"])
                options.containers = discover(project)  # new pids
            res = ScenarioRun(scenario, options).run()
            res["resized"] = scenario != SCENARIOS[name]
            if fanout is not None:
                res["crosscheck"] = crosscheck(fanout, scenario, options)
            stem = args.results / f"{stamp}-{name}"
            stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
            outputs = [stem.with_suffix(".json"), *report.write([res], stem, title_of(res))]
            log(f"{name}: {summary(res)}")
            log("  wrote " + ", ".join(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p) for p in outputs))
            results.append(res)
        if len(results) > 1:
            stem = args.results / f"{stamp}-summary"
            outputs = report.write(results, stem, f"chatbench {stamp}: {', '.join(names)}")
            log("wrote " + ", ".join(str(p) for p in outputs))
    finally:
        if fanout is not None:
            fanout.remove()
    return 0


def crosscheck(fanout: FanoutCopy, sc: Scenario, options: Options) -> dict[str, Any]:
    room_prefix = f"{options.room_prefix}-fx"
    command = fanout.command(
        sc,
        url=options.url,
        room_prefix=room_prefix,
        # The Node generator keeps no claim tokens: names of its own for each scenario, never one of ours.
        name_prefix=f"f{secrets.token_hex(2)}-",
        containers=options.containers,
        seed=options.seed,
    )
    log(f"{sc.name}: cross-check with fanout.mjs")
    shown = " ".join(command)
    try:
        result = fanout.run(command, timeout=sc.max_time_s + 300 if sc.find_max else 600)
    except (RuntimeError, subprocess.SubprocessError, json.JSONDecodeError) as error:
        return {"command": shown, "room_prefix": room_prefix, "error": str(error)}
    return {"command": shown, "room_prefix": room_prefix, "fanout": result}


def title_of(res: dict[str, Any]) -> str:
    return (
        f"chatbench {res['scenario']}: {res['clients']} clients, {res['rooms']} room(s), "
        f"{res['processes']} generator process(es) — {res.get('started_at', '')}"
    )


def summary(res: dict[str, Any]) -> str:
    if res.get("error"):
        return f"ERROR {res['error']}"
    if res.get("mode") == "storm":
        storm = res["storm"]
        rec, traffic, msgs = storm["reconnect"], storm["traffic"], storm["messages"]
        web = storm["cpu"]["services"].get("web", {}).get("cpu_s")
        return (
            f"{rec['reconnected']}/{storm['clients_on_replica']} of {storm['replica']}'s clients back, all live at "
            f"{rec['all_live_s']} s (reconnect p50/p99 {rec['reconnect_ms']['p50']}/{rec['reconnect_ms']['p99']} "
            f"ms), settled {storm['settled']} at {storm['window_s']} s; {traffic['frames']} frames, "
            f"{traffic['bytes'] / 1e6:.2f} MB; replicas {web} CPU-s; messages lost {msgs['lost']}, dup "
            f"{msgs['duplicated']}, same order {msgs['order']['same_order']}"
        )
    if res.get("mode") == "find-max":
        best = res.get("max_held")
        return (
            f"max held {best['deliveries_per_s']} deliveries/s at p99 {best['p99_ms']} ms ({res['stop_reason']})"
            if best
            else f"no step held ({res['stop_reason']})"
        )
    row = res["steps"][0]
    lat = row["latency_ms"]
    return (
        f"{row['deliveries_per_s']} deliveries/s, lost {row['lost']}, dup {row['duplicated']}, same order "
        f"{row['order']['same_order']}, p50/p99 {lat['p50']}/{lat['p99']} ms, generator {row['generator']['cores']} "
        f"cores ({row['generator'].get('us_per_delivery')} µs/delivery)"
    )
