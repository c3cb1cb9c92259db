"""The storm scenario's accounting (bench/chatbench/storm.py) and the generator's side of it (worker.py): the web
client's backoff, traffic by object type whatever the presence events carry, reconnect times, CPU counters that
start again with their container, resumed histories counted as deliveries, and the reconnect loop itself."""

from __future__ import annotations

import asyncio
import random
from typing import Any, cast

import orjson
import pytest

from chatbench import worker as worker_module
from chatbench.storm import (
    Outage,
    Traffic,
    counter_increase,
    merge_traffic,
    object_type,
    reconnect_delay_s,
    reconnect_report,
    settled,
    tally,
    traffic_report,
)
from chatbench.worker import Client, Connected, FrameCallbackConnection, Setup, Step, StormArm, Worker

MS = 1_000_000
S = 1_000_000_000


# ---------------------------------------------------------------- the web client's backoff


def test_after_a_restart_the_first_attempt_goes_within_half_a_second() -> None:
    rng = random.Random(1)
    delays = [reconnect_delay_s(0, 1012, rng) for _ in range(200)]
    assert all(0.1 <= d <= 0.5 for d in delays)
    assert max(delays) - min(delays) > 0.3  # jittered, so a crowd spreads out


def test_later_attempts_back_off_exponentially_with_jitter_up_to_five_seconds() -> None:
    rng = random.Random(2)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        delays = [reconnect_delay_s(attempt, 1012, rng) for _ in range(100)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
    # a close that is not a restart gets no head start
    assert all(0.25 <= reconnect_delay_s(0, 1006, rng) <= 0.5 for _ in range(100))


# ---------------------------------------------------------------- traffic by type


PRESENCE_FULL = b'{"type":"presence","event":"join","name":"u5","online":["u1","u5"],"online_count":2}'
PRESENCE_DELTA = b'{"type":"presence","joined":["u5"],"left":[],"online_count":2}'
MESSAGE = b'{"type":"message","id":"17-0","ts":"2026-12-02T00:00:00.000Z","room":"r","name":"u1","text":"hi"}'


def test_an_objects_type_is_read_from_its_first_bytes_or_parsed() -> None:
    assert object_type(MESSAGE) == "message"
    assert object_type(PRESENCE_DELTA) == "presence"
    assert object_type(b'{"online_count":2,"type":"presence"}') == "presence"  # type not first: parsed
    assert object_type(b"[1,2]") == "non_object"
    assert object_type(b"{not json") == "malformed"


def test_a_frame_of_several_objects_counts_under_each_type_it_holds() -> None:
    traffic = Traffic()
    frame = b"\n".join([MESSAGE, PRESENCE_FULL, MESSAGE])
    assert tally(traffic, frame) == ["message", "presence", "message"]
    assert (traffic.frames, traffic.bytes) == (1, len(frame))
    message, presence = traffic.by_type["message"], traffic.by_type["presence"]
    assert (message.frames, message.objects, message.bytes) == (1, 2, 2 * len(MESSAGE))
    assert (presence.frames, presence.objects, presence.bytes) == (1, 1, len(PRESENCE_FULL))


def test_both_shapes_of_presence_event_are_counted_alike_and_only_by_their_size() -> None:
    full, delta = Traffic(), Traffic()
    tally(full, PRESENCE_FULL)
    tally(delta, PRESENCE_DELTA)
    assert full.by_type["presence"].objects == delta.by_type["presence"].objects == 1
    assert full.by_type["presence"].bytes == len(PRESENCE_FULL)
    assert delta.by_type["presence"].bytes == len(PRESENCE_DELTA)


def test_traffic_merges_over_processes_and_reports_the_busiest_client() -> None:
    a, b = Traffic(), Traffic()
    tally(a, MESSAGE)
    tally(b, PRESENCE_DELTA)
    tally(b, MESSAGE)
    total = merge_traffic([a, b])
    assert (total.frames, total.by_type["message"].objects, total.by_type["presence"].objects) == (3, 2, 1)
    report = traffic_report(total, [(0, 1, 100), (1, 2, 300), (2, 2, 50)])
    assert list(report["by_type"])[:4] == ["welcome", "presence", "message", "error"]
    assert report["by_type"]["welcome"] == {"frames": 0, "objects": 0, "bytes": 0}
    assert report["per_client_max"] == {"frames": 2, "frames_client": 1, "bytes": 300, "bytes_client": 1}
    assert report["per_client_mean"] == {"frames": 1.7, "bytes": 150}


# ---------------------------------------------------------------- reconnects


def test_reconnect_times_run_from_the_close_to_the_welcome() -> None:
    restart = 100 * S
    outages = [
        Outage(client=k, down_ns=restart + S, close_code=1012, attempts=1, up_ns=restart + S + (k + 1) * 100 * MS)
        for k in range(10)
    ]
    outages[3].resumed = False
    report = reconnect_report(outages, clients=20, restart_ns=restart)
    assert (report["disconnected"], report["reconnected"], report["not_back"]) == (10, 10, 0)
    assert report["all_live_s"] == 2.0
    assert report["first_close_s"] == 1.0
    assert report["reconnect_ms"]["p50"] == 500
    assert report["reconnect_ms"]["max"] == 1000
    assert report["not_resumed"] == 1
    assert report["close_codes"] == {"1012": 10}


def test_a_client_still_out_means_not_all_live() -> None:
    restart = 0
    outages = [
        Outage(client=1, down_ns=S, close_code=1012, attempts=1, up_ns=2 * S),
        Outage(client=2, down_ns=S, close_code=1012, attempts=7, up_ns=None),
    ]
    report = reconnect_report(outages, clients=2, restart_ns=restart)
    assert report["not_back"] == 1
    assert report["all_live_s"] is None
    assert report["last_welcome_s"] == 2.0
    assert report["attempts_max"] == 7


def test_a_client_that_dropped_twice_is_one_client_and_live_once_its_last_outage_ends() -> None:
    outages = [
        Outage(client=1, down_ns=S, close_code=1012, attempts=1, up_ns=2 * S),
        Outage(client=1, down_ns=3 * S, close_code=1006, attempts=2, up_ns=5 * S),
    ]
    report = reconnect_report(outages, clients=1, restart_ns=0)
    assert (report["disconnected"], report["outages"], report["not_back"]) == (1, 2, 0)
    assert report["all_live_s"] == 5.0


# ---------------------------------------------------------------- CPU across a restart, and the end of the storm


def test_a_counter_that_starts_again_from_zero_is_a_new_incarnation() -> None:
    assert counter_increase([10, 15, 30]) == (20, 0)
    # the restarted container's cgroup: gone between stop and start, then from zero
    assert counter_increase([100, 180, None, None, 5, 40]) == (80 + 40, 1)
    assert counter_increase([None, 7, None]) == (0, 0)
    assert counter_increase([]) == (0, 0)


def test_the_storm_settles_only_when_all_are_live_the_restart_returned_and_presence_is_quiet() -> None:
    base = {"now_ns": 10 * S, "live": 5, "clients": 5, "last_event_ns": 6 * S, "quiet_ns": 3 * S}
    assert settled(**base, restart_done=True)
    assert not settled(**base, restart_done=False)
    assert not settled(**{**base, "live": 4}, restart_done=True)
    assert not settled(**{**base, "last_event_ns": 8 * S}, restart_done=True)


# ---------------------------------------------------------------- the generator's side


def make_worker(*, track_ids: bool = True) -> tuple[Worker, Client]:
    setup = Setup(
        proc=0,
        url="ws://127.0.0.1:1/ws",
        origin="http://127.0.0.1:1",
        clients=[(0, 0), (1, 0)],
        room_prefix="t",
        name_prefix="u",
        connect_concurrency=1,
        connect_timeout_s=1,
        size=64,
        track_ids=track_ids,
    )
    conn: Any = None
    worker = Worker(conn, setup)
    client = worker.clients[1]
    client.ready = client.in_step = True
    return worker, client


def marked(tag: str, idx: int, sent_ns: int) -> dict[str, Any]:
    return {"type": "message", "id": f"9-{idx}", "room": "t-0", "name": "u0", "text": f"~{tag}:0:{idx}:{sent_ns}~"}


class StubSocket:
    on_frame: Any = None


async def test_a_resumed_welcome_brings_the_missed_messages_as_deliveries_and_the_newest_id() -> None:
    worker, client = make_worker()
    worker.step = Step("st1", measure_from=0, measure_to=10**18)
    welcome = {
        "type": "welcome",
        "replica": "r2",
        "history": [marked("st1", 3, 5 * MS), marked("st1", 4, 6 * MS)],
        "online": ["u0", "u1"],
        "online_count": 2,
        "resumed": True,
    }
    report, socket = Connected(), StubSocket()
    answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    worker.handshake_frame(client, cast(Any, socket), report, answer, orjson.dumps(welcome))
    assert answer.result() == ""
    assert list(client.keys) == [3, 4]
    assert client.last_id == b"9-4"
    assert report.resumed == {1: True}


def test_the_newest_id_of_a_frame_is_remembered_for_since_and_traffic_is_counted_while_armed() -> None:
    worker, client = make_worker()
    worker.arm(StormArm(deadline_ns=10**18, seed=1))
    frame = orjson.dumps(marked("x", 1, 1)) + b"\n" + orjson.dumps(marked("x", 2, 2))
    worker.on_frame(client, frame)
    assert client.last_id == b"9-2"
    worker.on_frame(client, PRESENCE_DELTA)
    assert (client.rx_frames, client.rx_bytes) == (2, len(frame) + len(PRESENCE_DELTA))
    assert worker.traffic.by_type["presence"].objects == 1
    assert worker.last_presence_ns > 0
    progress = worker.storm_progress()
    assert (progress.frames, progress.presence, progress.live) == (2, 1, 1)


def test_without_tracking_the_hot_path_looks_for_no_id() -> None:
    worker, client = make_worker(track_ids=False)
    worker.on_frame(client, MESSAGE)
    assert client.last_id is None
    assert worker.traffic.frames == 0  # not armed: nothing counted


async def test_a_closed_client_reconnects_with_since_after_a_failed_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    worker, client = make_worker()
    client.last_id = b"9-7"
    monkeypatch.setattr(worker_module, "reconnect_delay_s", lambda attempt, code, rng: 0.0)
    asked: list[tuple[bytes | None, float]] = []

    async def open_joined(
        c: Client, report: Connected, since: bytes | None, timeout_s: float
    ) -> FrameCallbackConnection:
        asked.append((since, timeout_s))
        if len(asked) == 1:
            raise TimeoutError
        report.replicas[c.index] = "r2"
        report.resumed[c.index] = True
        return cast(FrameCallbackConnection, StubSocket())

    adopted: list[Any] = []
    monkeypatch.setattr(worker, "open_joined", open_joined)
    monkeypatch.setattr(worker, "adopt", lambda c, ws: adopted.append((c.index, ws)))
    worker.arm(StormArm(deadline_ns=10**30, seed=1))
    await worker.reconnect(client, 1012, down_ns=1)
    [outage] = worker.outages
    assert asked == [(b"9-7", 15.0), (b"9-7", 15.0)]  # the web client's welcome timeout
    assert (outage.attempts, outage.resumed, outage.replica) == (2, True, "r2")
    assert outage.up_ns is not None
    assert worker.reconnect_errors == {"timeout": 1}
    assert [index for index, _ in adopted] == [1]


async def test_no_attempt_starts_after_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    worker, client = make_worker()
    monkeypatch.setattr(worker_module, "reconnect_delay_s", lambda attempt, code, rng: 5.0)
    worker.arm(StormArm(deadline_ns=0, seed=1))  # long past
    await worker.reconnect(client, 1012, down_ns=1)
    [outage] = worker.outages
    assert (outage.attempts, outage.up_ns) == (0, None)


class ClosedSocket:
    close_code = 1012

    async def wait_closed(self) -> None:
        return None


async def test_a_socket_closed_in_the_storm_reconnects_and_its_client_stays_expected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker, client = make_worker()
    started: list[tuple[int, int | None]] = []

    async def reconnect(c: Client, code: int | None, down_ns: int) -> None:
        started.append((c.index, code))

    monkeypatch.setattr(worker, "reconnect", reconnect)
    worker.arm(StormArm(deadline_ns=10**30, seed=1))
    socket = cast(FrameCallbackConnection, ClosedSocket())
    client.ws = socket
    await worker.watch(client, socket)
    await asyncio.sleep(0)
    assert started == [(1, 1012)]
    assert not client.ready
    assert client.closed_ns is None  # the step still expects every message at this client
    assert worker.disconnects == 1


async def test_outside_a_storm_a_closed_client_is_not_expected_afterwards() -> None:
    worker, client = make_worker()
    socket = cast(FrameCallbackConnection, ClosedSocket())
    client.ws = socket
    await worker.watch(client, socket)
    assert client.closed_ns is not None
    assert not worker.reconnects
