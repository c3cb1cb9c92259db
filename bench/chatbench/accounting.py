"""The figures of one step, from what was sent and what each client received: expected, received, lost,
duplicated, same order, latency percentiles. Pure functions, defined exactly like ../shared/bench/fanout.mjs."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

NS_PER_MS = 1_000_000


@dataclass(frozen=True, slots=True)
class Message:
    """One message the generator sent in a step. `key` names it in every client's log."""

    key: int
    room: int
    sender: int  # client index
    sent_ns: int  # time.monotonic_ns() when it was sent
    measured: bool  # sent inside the measured window


@dataclass(slots=True)
class ClientLog:
    """One client that was open when the step began, and the measured messages it received, in arrival order
    (duplicates included), with each one's latency."""

    index: int
    room: int
    keys: Sequence[int]
    latencies_ns: Sequence[int]
    closed_ns: int | None = None  # when the server closed it during the step


@dataclass(slots=True)
class Latency:
    n: int = 0
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None
    mean: float | None = None


@dataclass(slots=True)
class Order:
    rooms: int = 0
    common_msgs: int = 0
    same_order: bool = True
    max_distinct_orders_in_a_room: int = 0
    clients_compared: int = 0
    clients_off_majority: int = 0
    disagreeing_client_pairs: int = 0
    client_pairs: int = 0
    inverted_msg_pairs_max: int = 0
    inverted_msg_pairs_total: int = 0


@dataclass(slots=True)
class Deliveries:
    sent_msgs: int = 0
    accepted_msgs: int = 0
    expected_deliveries: int = 0
    received_deliveries: int = 0
    lost: int = 0
    duplicated: int = 0
    msgs_incomplete: int = 0
    msgs_undelivered: int = 0
    unknown_deliveries: int = 0  # carried this step's marker but name no message it sent: a generator bug
    deliveries_per_s: int = 0
    latency_ms: Latency = field(default_factory=Latency)
    echo_latency_ms: Latency = field(default_factory=Latency)
    order: Order = field(default_factory=Order)


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted values (fanout.mjs `pct`): the smallest value with at least q of all
    values at or below it."""
    if not ordered:
        return None
    rank = math.ceil(q * len(ordered)) - 1
    return ordered[min(len(ordered) - 1, max(0, rank))]


def latency_stats(values_ns: Sequence[int]) -> Latency:
    """n, p50, p90, p99, max and mean in milliseconds, rounded to 0.01 ms."""
    values = np.sort(np.asarray(values_ns, dtype=np.int64))
    if values.size == 0:
        return Latency()
    ms: list[float] = (values / NS_PER_MS).tolist()
    return Latency(
        n=len(ms),
        p50=_r2(percentile(ms, 0.5)),
        p90=_r2(percentile(ms, 0.9)),
        p99=_r2(percentile(ms, 0.99)),
        max=_r2(ms[-1]),
        mean=_r2(float(values.mean()) / NS_PER_MS),
    )


def _r2(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def inversions(sequence: Sequence[int]) -> int:
    """How many pairs appear in the opposite order to sorted order (Kendall tau distance), by merge sort."""
    items = list(sequence)
    count = 0
    width = 1
    n = len(items)
    while width < n:
        merged: list[int] = []
        for lo in range(0, n, 2 * width):
            mid, hi = min(lo + width, n), min(lo + 2 * width, n)
            i, j = lo, mid
            while i < mid and j < hi:
                if items[i] <= items[j]:
                    merged.append(items[i])
                    i += 1
                else:
                    merged.append(items[j])
                    j += 1
                    count += mid - i
            merged.extend(items[i:mid])
            merged.extend(items[j:hi])
        items = merged
        width *= 2
    return count


def analyse(messages: Sequence[Message], clients: Sequence[ClientLog], *, rooms: int, duration_s: float) -> Deliveries:
    """Every figure of a step. `clients` are those open when the step began; closing during it ends a client's
    share of the expected deliveries from then on."""
    measured = {m.key: m for m in messages if m.measured}
    members: dict[int, list[ClientLog]] = {}
    for client in sorted(clients, key=lambda c: c.index):
        members.setdefault(client.room, []).append(client)

    # Expected: for each measured message, the clients of its room still open when it was sent.
    closed = {room: sorted(c.closed_ns for c in cs if c.closed_ns is not None) for room, cs in members.items()}
    expected_for: dict[int, int] = {}
    for key, message in measured.items():
        gone = bisect.bisect_right(closed.get(message.room, []), message.sent_ns)
        expected_for[key] = len(members.get(message.room, [])) - gone

    received_by = dict.fromkeys(measured, 0)
    unique: dict[int, list[int]] = {}
    duplicated = unknown = 0
    latencies: list[int] = []  # every measured delivery, duplicates included (as fanout.mjs)
    echo_ns: dict[int, int] = {}
    for client in clients:
        seen: set[int] = set()
        in_order: list[int] = []
        for key, latency in zip(client.keys, client.latencies_ns, strict=True):
            sent = measured.get(key)
            if sent is None:
                unknown += 1
                continue
            latencies.append(latency)
            if key in seen:
                duplicated += 1
                continue
            seen.add(key)
            in_order.append(key)
            received_by[key] += 1
            if sent.sender == client.index:
                echo_ns[key] = latency
        unique[client.index] = in_order

    received = sum(received_by.values())
    expected = sum(expected_for.values())
    return Deliveries(
        sent_msgs=len(measured),
        accepted_msgs=len(echo_ns),
        expected_deliveries=expected,
        received_deliveries=received,
        lost=max(0, expected - received),
        duplicated=duplicated,
        msgs_incomplete=sum(1 for key, n in received_by.items() if n < expected_for[key]),
        msgs_undelivered=sum(1 for n in received_by.values() if n == 0),
        unknown_deliveries=unknown,
        deliveries_per_s=round(received / duration_s) if duration_s > 0 else 0,
        latency_ms=latency_stats(latencies),
        echo_latency_ms=latency_stats(list(echo_ns.values())),
        order=order_of(measured, members, unique, received_by, rooms=rooms),
    )


def order_of(
    measured: dict[int, Message],
    members: dict[int, list[ClientLog]],
    unique: dict[int, list[int]],
    received_by: dict[int, int],
    *,
    rooms: int,
) -> Order:
    """Per room, each client's sequence restricted to the messages every member received (so a loss is not
    disorder). Clients with identical sequences form a group; the biggest (first on a tie) is the majority."""
    order = Order(rooms=rooms)
    for room, clients in sorted(members.items()):
        if len(clients) < 2:
            continue
        common = {key for key, m in measured.items() if m.room == room and received_by.get(key, 0) >= len(clients)}
        order.common_msgs += len(common)
        groups: dict[tuple[int, ...], list[int]] = {}
        filtered: dict[int, tuple[int, ...]] = {}
        for client in clients:
            sequence = tuple(key for key in unique.get(client.index, []) if key in common)
            filtered[client.index] = sequence
            groups.setdefault(sequence, []).append(client.index)
        majority = max(groups.values(), key=len)  # max() keeps the first of equals, like fanout.mjs
        position = {key: k for k, key in enumerate(filtered[majority[0]])}
        pairs = len(clients) * (len(clients) - 1) // 2
        same_pairs = sum(len(g) * (len(g) - 1) // 2 for g in groups.values())
        order.max_distinct_orders_in_a_room = max(order.max_distinct_orders_in_a_room, len(groups))
        order.clients_compared += len(clients)
        order.client_pairs += pairs
        order.disagreeing_client_pairs += pairs - same_pairs
        in_majority = set(majority)
        for client in clients:
            if client.index in in_majority:
                continue
            order.clients_off_majority += 1
            count = inversions([position[key] for key in filtered[client.index]])
            order.inverted_msg_pairs_total += count
            order.inverted_msg_pairs_max = max(order.inverted_msg_pairs_max, count)
    order.same_order = order.disagreeing_client_pairs == 0
    return order
