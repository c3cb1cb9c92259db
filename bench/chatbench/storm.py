"""The figures of a reconnect storm (the `storm` scenario): what the clients received by object type, how long each
took to be welcomed again, and CPU counters that start again from zero when their container restarts. Pure
functions and the reconnect policy of the web client, so the scenario's accounting is tested without Docker."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from chatbench.accounting import latency_stats

RESTARTING = 1012  # the close code of a replica that drains (docs/protocol.md, "Closing")
# The web client's reconnect policy (services/web/src/infinite_chat/static/app.js, scheduleReconnect).
BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 5.0
WELCOME_TIMEOUT_S = 15.0  # an attempt (socket, upgrade, join) that has no welcome by then is given up and retried
TYPE_PREFIX = b'{"type":"'  # how the server starts every object it builds (orjson keeps the key order)


def reconnect_delay_s(attempt: int, close_code: int | None, rng: random.Random) -> float:
    """How long a client waits before reconnect attempt `attempt` (0 for the first), as the web client does: after
    a 1012 the first attempt goes at once with a little jitter (0.1-0.5 s), so a crowd spreads out; otherwise
    exponential backoff with jitter, between half and all of min(5 s, 0.5 s x 2^attempt)."""
    if close_code == RESTARTING and attempt == 0:
        return 0.1 + rng.random() * 0.4
    ceiling = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2.0**attempt)
    return ceiling / 2 + rng.random() * ceiling / 2


# ---------------------------------------------------------------- traffic by object type


@dataclass(slots=True)
class Kind:
    frames: int = 0  # frames holding at least one object of this type
    objects: int = 0
    bytes: int = 0  # the objects' own bytes (each line of a frame, without the newlines between them)


@dataclass(slots=True)
class Traffic:
    """Frames received, their payload bytes, and the same by object type. A frame holding objects of two types
    counts under both, so the types' frames can add up to more than `frames`; their bytes add up to `bytes` less
    the newlines between the objects of a frame."""

    frames: int = 0
    bytes: int = 0
    by_type: dict[str, Kind] = field(default_factory=dict)


def object_type(line: bytes) -> str:
    """The `type` of one object of a server frame, read from its first bytes where the server put it first (as
    it builds every object), else parsed; `malformed` for a line that is not JSON."""
    if line.startswith(TYPE_PREFIX):
        end = line.find(b'"', len(TYPE_PREFIX))
        if end > 0:
            return line[len(TYPE_PREFIX) : end].decode("utf-8", "replace")
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "malformed"
    return str(obj.get("type")) if isinstance(obj, dict) else "non_object"


def tally(traffic: Traffic, data: bytes) -> list[str]:
    """Adds one frame to `traffic`; returns the types of the objects in it, in order."""
    traffic.frames += 1
    traffic.bytes += len(data)
    kinds: list[str] = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        kind = object_type(line)
        entry = traffic.by_type.get(kind)
        if entry is None:
            entry = traffic.by_type[kind] = Kind()
        if kind not in kinds:
            entry.frames += 1
        entry.objects += 1
        entry.bytes += len(line)
        kinds.append(kind)
    return kinds


def merge_traffic(parts: Sequence[Traffic]) -> Traffic:
    total = Traffic()
    for part in parts:
        total.frames += part.frames
        total.bytes += part.bytes
        for kind, entry in part.by_type.items():
            into = total.by_type.setdefault(kind, Kind())
            into.frames += entry.frames
            into.objects += entry.objects
            into.bytes += entry.bytes
    return total


def traffic_report(traffic: Traffic, per_client: Sequence[tuple[int, int, int]]) -> dict[str, Any]:
    """Totals, by type (welcome, presence, message, error first, then any other), and the most and the mean one
    client received. `per_client`: (client index, frames, bytes) of every client."""
    first = ["welcome", "presence", "message", "error"]
    kinds = first + sorted(k for k in traffic.by_type if k not in first)
    by_type: dict[str, dict[str, int]] = {}
    for kind in kinds:
        entry = traffic.by_type.get(kind, Kind())
        by_type[kind] = {"frames": entry.frames, "objects": entry.objects, "bytes": entry.bytes}
    n = len(per_client)
    top_frames = max(per_client, key=lambda c: (c[1], -c[0]), default=None)
    top_bytes = max(per_client, key=lambda c: (c[2], -c[0]), default=None)
    return {
        "frames": traffic.frames,
        "bytes": traffic.bytes,
        "by_type": by_type,
        "per_client_max": {
            "frames": top_frames[1] if top_frames else 0,
            "frames_client": top_frames[0] if top_frames else None,
            "bytes": top_bytes[2] if top_bytes else 0,
            "bytes_client": top_bytes[0] if top_bytes else None,
        },
        "per_client_mean": {
            "frames": round(sum(c[1] for c in per_client) / n, 1) if n else 0,
            "bytes": round(sum(c[2] for c in per_client) / n) if n else 0,
        },
    }


# ---------------------------------------------------------------- reconnects


@dataclass(slots=True)
class Outage:
    """One client's socket closed during the storm, and how it came back."""

    client: int
    down_ns: int  # when the client saw its socket close
    close_code: int | None
    attempts: int = 0  # joins tried, the one that was welcomed included
    up_ns: int | None = None  # when its welcome arrived; None: not back by the deadline
    resumed: bool | None = None  # the welcome's `resumed`
    replica: str = ""  # the replica that welcomed it


def reconnect_report(outages: Sequence[Outage], *, clients: int, restart_ns: int) -> dict[str, Any]:
    """How the clients came back: how many lost their socket, how many were welcomed again, the time from the
    restart until the last of them was (None while one is still out), each outage's length (close seen to
    welcome), attempts, and welcomes that could not resume (`resumed: false`: the client may have missed
    messages, and its history repeats some it had)."""
    back = [o for o in outages if o.up_ns is not None]
    out = [o for o in outages if o.up_ns is None]
    # A client whose last outage is over is live again; one that dropped twice counts once.
    last: dict[int, Outage] = {}
    for o in sorted(outages, key=lambda o: o.down_ns):
        last[o.client] = o
    still_out = sum(1 for o in last.values() if o.up_ns is None)
    ups = [o.up_ns for o in back if o.up_ns is not None]
    downs = [o.down_ns for o in outages]
    lengths = [o.up_ns - o.down_ns for o in back if o.up_ns is not None]
    per_replica: dict[str, int] = {}
    for o in back:
        per_replica[o.replica] = per_replica.get(o.replica, 0) + 1
    stats = latency_stats(lengths)
    return {
        "clients": clients,
        "disconnected": len(last),
        "outages": len(outages),
        "reconnected": len(back),
        "not_back": still_out,
        "outages_unfinished": len(out),
        "first_close_s": _s(min(downs) - restart_ns) if downs else None,
        "last_close_s": _s(max(downs) - restart_ns) if downs else None,
        "all_live_s": _s(max(ups) - restart_ns) if ups and not still_out else None,
        "last_welcome_s": _s(max(ups) - restart_ns) if ups else None,
        "reconnect_ms": {"n": stats.n, "p50": stats.p50, "p99": stats.p99, "max": stats.max, "mean": stats.mean},
        "attempts": sum(o.attempts for o in outages),
        "attempts_max": max((o.attempts for o in outages), default=0),
        "not_resumed": sum(1 for o in back if o.resumed is False),
        "close_codes": _count(str(o.close_code) for o in outages),
        "welcomed_by": dict(sorted(per_replica.items())),
    }


def _s(ns: int) -> float:
    return round(ns / 1e9, 3)


def _count(keys: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------- CPU across a container's restart


def counter_increase(readings: Sequence[int | None]) -> tuple[int, int]:
    """How much a cumulative counter grew over a series of readings, and how often it started again. A container's
    CPU counter (its cgroup's) vanishes when it stops and comes back from zero when it starts: a reading below the
    one before is a new incarnation, counted from zero. Missing readings (None) are skipped; what the old
    incarnation used after its last reading is not seen."""
    total = restarts = 0
    previous: int | None = None
    for value in readings:
        if value is None:
            continue
        if previous is not None:
            if value >= previous:
                total += value - previous
            else:
                total += value
                restarts += 1
        previous = value
    return total, restarts


def settled(*, now_ns: int, live: int, clients: int, last_event_ns: int, quiet_ns: int, restart_done: bool) -> bool:
    """Whether the storm is over: every client live again, the restart command returned, and no presence frame or
    welcome for `quiet_ns` (longer than the server's presence interval, so a coalesced event still due is not
    missed)."""
    return live >= clients and restart_done and now_ns - last_event_ns >= quiet_ns
