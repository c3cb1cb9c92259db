"""Turns results into what people read: a Markdown table (one row per step) with notes, and a PNG plot of the
latency percentiles and deliveries/s against the offered load."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]
Result = dict[str, Any]


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


def _cores(row: Row, service: str) -> str:
    return fmt(row.get("services", {}).get(service, {}).get("cores"), 2)


COLUMNS: list[tuple[str, Callable[[Result, int, Row], str]]] = [
    ("scenario", lambda res, k, r: str(res["scenario"])),
    ("step", lambda res, k, r: f"{k + 1}" + ("" if r.get("held") is None else (" held" if r["held"] else " FAILED"))),
    ("clients / rooms", lambda res, k, r: f"{r['clients_open']} / {res['rooms']}"),
    ("senders × msg/s", lambda res, k, r: f"{r['senders']} × {r['rate_per_sender']:g}"),
    ("offered msgs/s", lambda res, k, r: fmt(r["offered_msgs_per_s"], 1)),
    ("accepted / sent", lambda res, k, r: f"{fmt(r['accepted_msgs'])} / {fmt(r['sent_msgs'])}"),
    ("expected", lambda res, k, r: fmt(r["expected_deliveries"])),
    ("received", lambda res, k, r: fmt(r["received_deliveries"])),
    ("lost", lambda res, k, r: fmt(r["lost"])),
    ("late", lambda res, k, r: fmt(r.get("late_after_grace"))),
    ("dup", lambda res, k, r: fmt(r["duplicated"])),
    ("same order", lambda res, k, r: fmt(r["order"]["same_order"])),
    ("deliveries/s", lambda res, k, r: fmt(r["deliveries_per_s"])),
    ("p50 ms", lambda res, k, r: fmt(r["latency_ms"]["p50"], 1)),
    ("p90 ms", lambda res, k, r: fmt(r["latency_ms"]["p90"], 1)),
    ("p99 ms", lambda res, k, r: fmt(r["latency_ms"]["p99"], 1)),
    ("max ms", lambda res, k, r: fmt(r["latency_ms"]["max"], 1)),
    ("echo p99 ms", lambda res, k, r: fmt(r["echo_latency_ms"]["p99"], 1)),
    (
        "generator cores",
        lambda res, k, r: fmt(r["generator"]["cores"], 2) + (" SATURATED" if r["generator_saturated"] else ""),
    ),
    ("generator µs/delivery", lambda res, k, r: fmt(r["generator"].get("us_per_delivery"), 1)),
    ("machine busy cores", lambda res, k, r: fmt(r["machine"].get("busy_cores"), 2)),
    ("replicas cores", lambda res, k, r: _cores(r, "web")),
    ("replicas MB", lambda res, k, r: fmt(r.get("services", {}).get("web", {}).get("memory_mb"), 1)),
    ("nginx cores", lambda res, k, r: _cores(r, "nginx")),
    ("redis cores", lambda res, k, r: _cores(r, "redis")),
    ("errors", lambda res, k, r: ", ".join(f"{c} {n}" for c, n in sorted(r["errors"].items())) or "0"),
]


def _mb(n: int | float | None) -> str:
    return "–" if n is None else f"{n / 1e6:,.2f}"


def _kind(res: Result, kind: str) -> str:
    entry = res["storm"]["traffic"]["by_type"].get(kind) or {}
    return f"{fmt(entry.get('frames'))} / {_mb(entry.get('bytes'))}"


def _replicas_cpu(res: Result) -> str:
    containers = res["storm"]["cpu"]["containers"]
    return ", ".join(
        f"{name} {fmt(c.get('cpu_s'), 2)}" + (" (restarted)" if c.get("restarted") else "")
        for name, c in containers.items()
        if name.startswith("web")
    )


def _service_cpu(res: Result, service: str) -> str:
    return fmt(res["storm"]["cpu"]["services"].get(service, {}).get("cpu_s"), 2)


def _reconnect_ms(res: Result) -> str:
    ms = res["storm"]["reconnect"]["reconnect_ms"]
    return f"{fmt(ms['p50'])} / {fmt(ms['p99'])} / {fmt(ms['max'])}"


STORM_COLUMNS: list[tuple[str, Callable[[Result], str]]] = [
    ("scenario", lambda res: str(res["label"] or res["scenario"])),
    ("clients", lambda res: fmt(res["clients"])),
    ("restarted (its clients)", lambda res: f"{res['storm']['replica']} ({res['storm']['clients_on_replica']})"),
    (
        "back / lost their socket",
        lambda res: f"{res['storm']['reconnect']['reconnected']} / {res['storm']['reconnect']['disconnected']}",
    ),
    ("all live s", lambda res: fmt(res["storm"]["reconnect"]["all_live_s"], 2)),
    ("reconnect p50 / p99 / max ms", _reconnect_ms),
    ("attempts max", lambda res: fmt(res["storm"]["reconnect"]["attempts_max"])),
    ("presence settled s", lambda res: fmt(res["storm"]["presence_settled_s"], 2)),
    ("window s", lambda res: fmt(res["storm"]["window_s"], 2) + ("" if res["storm"]["settled"] else " NOT settled")),
    ("frames", lambda res: fmt(res["storm"]["traffic"]["frames"])),
    ("MB", lambda res: _mb(res["storm"]["traffic"]["bytes"])),
    ("welcome frames / MB", lambda res: _kind(res, "welcome")),
    ("presence frames / MB", lambda res: _kind(res, "presence")),
    ("message frames / MB", lambda res: _kind(res, "message")),
    ("error frames", lambda res: fmt((res["storm"]["traffic"]["by_type"].get("error") or {}).get("frames"))),
    (
        "per client max frames / KB",
        lambda res: (
            f"{fmt(res['storm']['traffic']['per_client_max']['frames'])} / "
            f"{fmt(res['storm']['traffic']['per_client_max']['bytes'] / 1e3, 1)}"
        ),
    ),
    ("replicas CPU s", _replicas_cpu),
    ("nginx CPU s", lambda res: _service_cpu(res, "nginx")),
    ("redis CPU s", lambda res: _service_cpu(res, "redis")),
    ("generator CPU s", lambda res: fmt(res["storm"]["cpu"]["generator"]["cpu_s"], 2)),
    (
        "messages lost / dup / same order",
        lambda res: (
            f"{fmt(res['storm']['messages']['lost'])} / {fmt(res['storm']['messages']['duplicated'])} / "
            f"{fmt(res['storm']['messages']['order']['same_order'])}"
        ),
    ),
]


def storm_table(results: Sequence[Result]) -> str:
    """One row per storm: from the restart until every client is live again and presence is quiet."""
    lines = ["| " + " | ".join(h for h, _ in STORM_COLUMNS) + " |", "|" + "---|" * len(STORM_COLUMNS)]
    for res in results:
        lines.append("| " + " | ".join(cell(res) for _, cell in STORM_COLUMNS) + " |")
    return "\n".join(lines)


def storm_notes(res: Result) -> list[str]:
    storm = res["storm"]
    rec, msgs = storm["reconnect"], storm["messages"]
    by_type = storm["traffic"]["by_type"]
    out = [
        f"  - restart of {storm['replica']} ({storm['replica_hostname']}): `docker restart` took "
        f"{fmt(storm['restart_s'], 2)} s, healthy again by {fmt(storm['healthy_s'], 1)} s; its clients' sockets "
        f"closed {fmt(rec['first_close_s'], 2)}-{fmt(rec['last_close_s'], 2)} s after it began (codes "
        f"{rec['close_codes']}); welcomed again by {rec['welcomed_by']}",
        f"  - reconnects: {rec['attempts']} attempts for {rec['outages']} outages, failed attempts "
        f"{rec['failed_attempts'] or 0}, resumed: false {rec['not_resumed']}",
        "  - received in the window, by type (frames / objects / bytes): "
        + "; ".join(f"{k} {fmt(v['frames'])} / {fmt(v['objects'])} / {fmt(v['bytes'])}" for k, v in by_type.items()),
        f"  - messages: {msgs['senders']} senders × {msgs['rate_per_sender']:g} msg/s on the other replicas, "
        f"{msgs['sent_msgs']} sent ({msgs['accepted_msgs']} accepted), {fmt(msgs['expected_deliveries'])} expected, "
        f"{fmt(msgs['received_deliveries'])} received, {msgs['lost']} lost, {msgs['duplicated']} duplicated, same "
        f"order {fmt(msgs['order']['same_order'])}",
        f"  - machine busy cores over the window {fmt(storm['cpu']['machine'].get('busy_cores'), 2)}, generator "
        f"{fmt(storm['cpu']['generator']['cores'], 2)} cores",
    ]
    out += [f"  - {warning}" for warning in storm["warnings"]]
    return out


def table(results: Sequence[Result]) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for res in results:
        for k, row in enumerate(res.get("steps") or []):
            lines.append("| " + " | ".join(cell(res, k, row) for _, cell in COLUMNS) + " |")
    return "\n".join(lines)


def notes(res: Result) -> list[str]:
    """What the table cannot say in a cell: the find-max verdict, memory per connection, the target, warnings."""
    size = (
        f"{res['clients']} clients, {res['rooms']} room(s), {res['senders']} senders × {res['rate_per_sender']:g} msg/s"
    )
    if res.get("resized"):
        size = f"**resized for this run** to {size} (the issue's scenario: {res.get('about', '')})"
    else:
        size = res.get("about", size)
    out = [f"- **{res['scenario']}**: {size}; {res['processes']} generator process(es)."]
    connect = res.get("connect", {})
    out.append(
        f"  - connected {connect.get('connected')}/{connect.get('attempted')} in {connect.get('phase_s')} s "
        f"({connect.get('errors')} errors), per replica: {connect.get('per_replica')}"
    )
    if res.get("mode") == "find-max":
        best, bad = res.get("max_held"), res.get("first_failed")
        if best:
            out.append(
                f"  - find-max: **{fmt(best['deliveries_per_s'])} deliveries/s held** at "
                f"{fmt(best['offered_msgs_per_s'], 1)} msgs/s (p99 {best['p99_ms']} ms)"
            )
        else:
            out.append("  - find-max: no step held")
        if bad:
            out.append(
                f"  - first failed: {fmt(bad['offered_msgs_per_s'], 1)} msgs/s, {fmt(bad['deliveries_per_s'])} "
                f"deliveries/s, p99 {bad['p99_ms']} ms, lost {bad['lost']}"
            )
        out.append(f"  - stopped: {res.get('stop_reason')}")
    memory = res.get("memory_per_connection")
    if memory:
        out.append(
            f"  - replica memory per connection: **{fmt(memory.get('kb_per_connection'), 1)} KB** "
            f"(cgroup, as docker stats), {fmt(memory.get('rss_kb_per_connection'), 1)} KB resident, over "
            f"{memory.get('connections')} connections: "
            + "; ".join(
                f"{name} {v['connections']} conns, {v['memory_mb_before']} → {v['memory_mb_with_clients']} MB"
                for name, v in memory.get("replicas", {}).items()
            )
        )
    if memory:
        started = {c["name"]: c.get("started", "")[:19] for c in res.get("stack", {}).get("containers", [])}
        out.append(
            "  - replicas started at "
            + ", ".join(f"{name} {started.get(name, '?')}" for name in memory.get("replicas", {}))
            + f", this run at {res.get('started_at', '')[:19]}: the figure is only right on replicas that never held "
            "this many connections before (bench/README.md)"
        )
    if res.get("storm"):
        out += storm_notes(res)
    target = res.get("target")
    if target:
        goal = ", ".join(f"{k} {v}" for k, v in target.items() if k != "met")
        out.append(f"  - target ({goal}): {'met' if target['met'] else '**missed**'}")
    for k, row in enumerate(res.get("steps") or []):
        typing = row.get("typing") or {}
        if typing.get("every_s") or typing.get("received_objects"):
            per = typing.get("per_member_per_s") or {}
            out.append(
                f"  - step {k + 1}: typing"
                + (f", a notice every {typing['every_s']:g} s from every client" if typing.get("every_s") else "")
                + f": {fmt(typing.get('sent'))} sent in the window; received {fmt(typing.get('received_objects'))} "
                f"typing objects in {fmt(typing.get('received_frames'))} frames, {fmt(typing.get('received_bytes'))} "
                f"bytes; per member per second {fmt(per.get('objects'), 2)} objects, {fmt(per.get('frames'), 2)} "
                f"frames, {fmt(per.get('bytes'), 1)} bytes"
            )
    for k, row in enumerate(res.get("steps") or []):
        for warning in row.get("warnings", []):
            out.append(f"  - step {k + 1}: {warning}")
    if res.get("disconnects"):
        out.append(f"  - {res['disconnects']} connections closed by the server: {res.get('disconnect_samples')}")
    if res.get("frames", {}).get("errors"):
        out.append(f"  - error frames over the run: {res['frames']['errors']}")
    return out


def markdown(results: Sequence[Result], title: str) -> str:
    parts = [f"# {title}", ""]
    if results:
        host = results[0].get("host", {})
        parts.append(
            f"Machine: {host.get('ncpu')} × {host.get('cpu')}, kernel {host.get('kernel')}; "
            f"stack {results[0].get('stack', {}).get('project')} at {results[0].get('url')}; "
            f"started {results[0].get('started_at')}."
        )
        parts.append("")
    if any(res.get("steps") for res in results):
        parts += [table(results), ""]
    storms = [res for res in results if res.get("storm")]
    if storms:
        parts += [storm_table(storms), ""]
    for res in results:
        parts += notes(res)
    for res in results:
        if res.get("crosscheck"):
            parts += ["", crosscheck_table(res)]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- chatbench and fanout.mjs side by side

COMPARED: list[tuple[str, Callable[[Row], Any], int]] = [
    ("offered msgs/s", lambda r: r.get("offered_msgs_per_s"), 1),
    ("sent msgs (measured)", lambda r: r.get("sent_msgs"), 0),
    ("accepted msgs", lambda r: r.get("accepted_msgs"), 0),
    ("expected deliveries", lambda r: r.get("expected_deliveries"), 0),
    ("received deliveries", lambda r: r.get("received_deliveries"), 0),
    ("lost", lambda r: r.get("lost"), 0),
    ("late after grace", lambda r: r.get("late_after_grace"), 0),
    ("duplicated", lambda r: r.get("duplicated"), 0),
    ("same order", lambda r: (r.get("order") or {}).get("same_order"), 0),
    ("deliveries/s", lambda r: r.get("deliveries_per_s"), 0),
    ("latency p50 ms", lambda r: (r.get("latency_ms") or {}).get("p50"), 2),
    ("latency p90 ms", lambda r: (r.get("latency_ms") or {}).get("p90"), 2),
    ("latency p99 ms", lambda r: (r.get("latency_ms") or {}).get("p99"), 2),
    ("latency max ms", lambda r: (r.get("latency_ms") or {}).get("max"), 2),
    ("echo p50 ms", lambda r: (r.get("echo_latency_ms") or {}).get("p50"), 2),
    ("echo p99 ms", lambda r: (r.get("echo_latency_ms") or {}).get("p99"), 2),
    ("send lag p99 ms", lambda r: (r.get("send_lag_ms") or {}).get("p99"), 2),
    ("generator cores", lambda r: (r.get("generator") or {}).get("cores"), 3),
    ("generator µs/delivery", lambda r: generator_us(r), 1),
    ("machine busy cores", lambda r: (r.get("machine") or {}).get("busy_cores"), 2),
    ("replicas cores", lambda r: replicas_cores(r), 2),
    ("nginx cores", lambda r: service_cores(r, "nginx"), 2),
    ("redis cores", lambda r: service_cores(r, "redis"), 2),
]


def generator_us(row: Row) -> float | None:
    gen = row.get("generator") or {}
    if gen.get("us_per_delivery") is not None:
        return float(gen["us_per_delivery"])
    received = row.get("received_deliveries")
    return gen["cpu_s"] / received * 1e6 if received and gen.get("cpu_s") is not None else None


def replicas_cores(row: Row) -> float | None:
    if "services" in row:
        return row["services"].get("web", {}).get("cores")  # type: ignore[no-any-return]
    watched = row.get("watched") or {}
    cores = [v["cores"] for k, v in watched.items() if k.startswith("web")]
    return round(sum(cores), 2) if cores else None


def service_cores(row: Row, service: str) -> float | None:
    if "services" in row:
        return row["services"].get(service, {}).get("cores")  # type: ignore[no-any-return]
    watched = row.get("watched") or {}
    cores = [v["cores"] for k, v in watched.items() if k.startswith(service)]
    return round(sum(cores), 2) if cores else None


def fanout_rows(fanout: Result) -> list[Row]:
    """fanout.mjs puts a single step's figures at the top level, and find-max steps under `steps`."""
    return list(fanout["steps"]) if fanout.get("mode") == "find-max" else [fanout]


def crosscheck_table(res: Result) -> str:
    check = res["crosscheck"]
    if check.get("error"):
        return f"## Cross-check with fanout.mjs: {res['scenario']}\n\nfanout.mjs failed: {check['error']}\n"
    ours, theirs = res.get("steps") or [], fanout_rows(check["fanout"])
    lines = [
        f"## Cross-check with fanout.mjs: {res['scenario']}",
        "",
        f"Same scenario run by `{check['command']}` right after chatbench (rooms `{check['room_prefix']}-*`).",
        "",
    ]
    n = min(len(ours), len(theirs))
    header = ["figure"]
    for k in range(n):
        suffix = f" step {k + 1}" if n > 1 else ""
        header += [f"chatbench{suffix}", f"fanout.mjs{suffix}"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, get, digits in COMPARED:
        cells = [name]
        for k in range(n):
            cells += [fmt(get(ours[k]), digits), fmt(get(theirs[k]), digits)]
        lines.append("| " + " | ".join(cells) + " |")
    if len(ours) != len(theirs):
        lines.append("")
        lines.append(f"chatbench ran {len(ours)} step(s), fanout.mjs {len(theirs)}; the first {n} are compared.")
    if res.get("mode") == "find-max":
        fanout_best = check["fanout"].get("max_held") or {}
        ours_best = res.get("max_held") or {}
        lines.append("")
        lines.append(
            f"find-max: chatbench held {fmt(ours_best.get('deliveries_per_s'))} deliveries/s, fanout.mjs "
            f"{fmt(fanout_best.get('deliveries_per_s'))}."
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the plot


def plot(results: Sequence[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat_ax, rate_ax) = plt.subplots(2, 1, sharex=True, figsize=(9, 7.5))
    colours = {"p50": "tab:green", "p90": "tab:orange", "p99": "tab:red"}
    several = len(results) > 1
    labelled: set[str] = set()

    def once(label: str) -> str | None:
        """Each legend entry once, however many scenarios share the plot."""
        if label in labelled:
            return None
        labelled.add(label)
        return label

    for n, res in enumerate(results):
        steps = sorted(res.get("steps") or [], key=lambda r: r["offered_msgs_per_s"])
        if not steps:
            continue
        x = [r["offered_msgs_per_s"] for r in steps]
        first = n == 0
        for key, colour in colours.items():
            y = [r["latency_ms"][key] for r in steps]
            lat_ax.plot(
                x, [float("nan") if v is None else v for v in y], "o-", color=colour, label=key if first else None
            )
        received = [r["deliveries_per_s"] for r in steps]
        rate_ax.plot(x, received, "o-", color="tab:blue", label="received" if first else None)
        expected = [r["offered_deliveries_per_s"] for r in steps]
        rate_ax.plot(x, expected, "_--", color="grey", ms=14, label="expected" if first else None)
        if several:  # one point per scenario: name them
            lat_ax.annotate(
                res["scenario"],
                (x[-1], steps[-1]["latency_ms"]["p99"]),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
            rate_ax.annotate(
                res["scenario"], (x[-1], received[-1]), fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
        failed = [r for r in steps if r.get("held") is False]
        if failed:
            fx = [r["offered_msgs_per_s"] for r in failed]
            lat_ax.plot(
                fx, [r["latency_ms"]["p99"] for r in failed], "x", color="black", ms=10, label=once("failed step")
            )
            rate_ax.plot(fx, [r["deliveries_per_s"] for r in failed], "x", color="black", ms=10)
        if res.get("p99_bound_ms"):
            bound = res["p99_bound_ms"]
            lat_ax.axhline(bound, color="red", lw=0.8, ls=":", label=once(f"p99 bound {bound} ms"))
        check = (res.get("crosscheck") or {}).get("fanout")
        if check:
            theirs = sorted(fanout_rows(check), key=lambda r: r.get("offered_msgs_per_s", 0))
            tx = [r.get("offered_msgs_per_s", 0) for r in theirs]
            style: dict[str, Any] = {"mfc": "none", "color": "purple", "ms": 9}
            lat_ax.plot(tx, [r["latency_ms"]["p99"] for r in theirs], "^", label=once("fanout.mjs p99"), **style)
            rate_ax.plot(tx, [r["deliveries_per_s"] for r in theirs], "^", label=once("fanout.mjs received"), **style)
    lat_ax.set_xlim(left=0)
    rate_ax.set_ylim(bottom=0)
    if _positive(lat_ax):
        lat_ax.set_yscale("log")
    lat_ax.set_ylabel("latency (ms)")
    lat_ax.grid(True, which="both", alpha=0.3)
    lat_ax.legend(fontsize=8)
    rate_ax.set_ylabel("deliveries/s")
    rate_ax.set_xlabel("offered load (msgs/s sent, in all)")
    rate_ax.grid(True, alpha=0.3)
    rate_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def storm_plot(results: Sequence[Result], path: Path, title: str) -> None:
    """Clients live and what they have received against the time since the restart, one line per storm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (live_ax, bytes_ax) = plt.subplots(2, 1, sharex=True, figsize=(9, 7.5))
    for res in results:
        storm = res.get("storm")
        if not storm or not storm.get("series"):
            continue
        label = str(res.get("label") or res["scenario"])
        t = [row[0] for row in storm["series"]]
        live_ax.plot(t, [row[1] for row in storm["series"]], "-", label=label)
        bytes_ax.plot(t, [row[3] / 1e6 for row in storm["series"]], "-", label=f"{label}: MB received")
        if storm["reconnect"].get("all_live_s") is not None:
            live_ax.axvline(storm["reconnect"]["all_live_s"], color="grey", lw=0.8, ls=":")
    live_ax.set_ylabel("clients live")
    live_ax.grid(True, alpha=0.3)
    live_ax.legend(fontsize=8)
    bytes_ax.set_ylabel("MB received by all clients")
    bytes_ax.set_xlabel("seconds since the restart")
    bytes_ax.grid(True, alpha=0.3)
    bytes_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _positive(ax: Any) -> bool:
    """Whether any latency was plotted (a log scale needs one value above 0)."""
    return any(any(isinstance(v, float | int) and v > 0 for v in line.get_ydata(orig=True)) for line in ax.get_lines())


def write(results: Sequence[Result], stem: Path, title: str) -> list[Path]:
    """<stem>.md and <stem>.png; the JSON is written by the caller (one file per scenario)."""
    md = stem.with_suffix(".md")
    md.write_text(markdown(results, title))
    png = stem.with_suffix(".png")
    if any(res.get("steps") for res in results) or not any(res.get("storm") for res in results):
        plot(results, png, title)
    else:
        storm_plot(results, png, title)
    return [md, png]


def load(paths: Sequence[Path]) -> list[Result]:
    return [json.loads(p.read_text()) for p in paths]
