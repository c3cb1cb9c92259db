"""The named scenarios of issue 6, all through nginx with the production defaults (the per-connection rate
limit of 5 msg/s, burst 10, stays on, so load is spread over enough senders to stay under it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    about: str
    clients: int
    rooms: int
    senders: int | None  # None: every client sends
    rate: float  # msgs/s per sender
    total_rate: float | None = None  # msgs/s in all, whatever the number of senders (then `rate` is unused)
    warmup_s: float = 2
    duration_s: float = 10
    grace_s: float = 3
    arrival: str = "poisson"
    size: int = 64
    # find-max: raise the offered load by step_factor after each step that held, then bisect (fanout.mjs --find-max)
    find_max: bool = False
    start_rate: float = 0  # first step's total msgs/s; 0: senders x rate
    step_factor: float = 1.5
    refine: int = 2
    max_steps: int = 12
    max_time_s: float = 150
    p99_bound_ms: float = 250
    memory_per_connection: bool = False
    # storm: once every client is live and quiet, restart one replica (`storm_replica`, as named in the results)
    # and measure until every client it held is welcomed again and presence has been quiet for `storm_quiet_s`,
    # at most `storm_deadline_s` after the restart. Senders start `warmup_s` before the restart and go on for
    # `duration_s` after it.
    storm: bool = False
    storm_replica: str = "web-1"
    storm_quiet_s: float = 3
    storm_deadline_s: float = 60
    # the target, checked in the tables: p99 bound in ms, deliveries/s, or KB of memory per connection
    target_p99_ms: float | None = None
    target_deliveries_per_s: float | None = None
    target_kb_per_connection: float | None = None

    def sender_count(self) -> int:
        return self.clients if self.senders is None else min(self.senders, self.clients)

    def sender_rate(self) -> float:
        """msgs/s per sender."""
        if self.total_rate is not None:
            return self.total_rate / max(1, self.sender_count())
        return self.rate


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "idle",
            "2,000 connected clients in 20 rooms, 1 msg/s in all: replica memory per connection",
            clients=2000,
            rooms=20,
            senders=20,
            rate=0.05,
            total_rate=1,
            warmup_s=2,
            duration_s=20,
            memory_per_connection=True,
            target_kb_per_connection=50,
        ),
        Scenario(
            "room",
            "200 clients in 1 room, 20 senders x 2.5 msg/s",
            clients=200,
            rooms=1,
            senders=20,
            rate=2.5,
            target_p99_ms=50,
        ),
        Scenario(
            "broadcast",
            "1,000 clients in 1 room, 10 senders x 2 msg/s",
            clients=1000,
            rooms=1,
            senders=10,
            rate=2,
            target_p99_ms=100,
        ),
        Scenario(
            "rooms",
            "100 rooms x 10 clients, 1 sender x 2 msg/s in each room",
            clients=1000,
            rooms=100,
            senders=100,
            rate=2,
        ),
        Scenario(
            "max",
            "200 clients in 1 room, every one a sender; offered load raised in steps until p99 > 250 ms or a loss",
            clients=200,
            rooms=1,
            senders=None,
            rate=0.5,
            warmup_s=1,
            duration_s=5,
            grace_s=2,
            find_max=True,
            target_deliveries_per_s=94_000,
        ),
        Scenario(
            "storm",
            "2,000 clients in 1 room; one replica restarts and every client it held reconnects at once; "
            "2 senders x 0.5 msg/s on the other replicas throughout",
            clients=2000,
            rooms=1,
            senders=2,
            rate=0.5,
            arrival="uniform",
            warmup_s=2,
            duration_s=10,
            grace_s=5,
            storm=True,
        ),
    )
}

# `all` runs idle first: its memory baseline is cleanest before the other scenarios have grown the replicas' heaps.
# `storm` restarts a replica and is run only when named.
ALL = ["idle", "room", "broadcast", "rooms", "max"]


def pick_senders(senders: int, rooms: int, open_clients: Sequence[tuple[int, int]]) -> list[int]:
    """Sender slot k sits in room k mod R, on that room's member floor(k/R) mod members (by client index), as
    fanout.mjs does. A client holds several slots when there are more slots than members."""
    members: dict[int, list[int]] = {}
    for index, room in sorted(open_clients):
        members.setdefault(room, []).append(index)
    slots: list[int] = []
    for k in range(senders):
        room_members = members.get(k % rooms, [])
        if room_members:
            slots.append(room_members[(k // rooms) % len(room_members)])
    return slots
