"""The benchmark's receive path (bench/chatbench/worker.py) on synthetic server frames: deliveries found by the
step's marker without parsing JSON, several objects per frame, warm-up and late deliveries, errors by code."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from chatbench.worker import Client, Connected, Setup, Step, Worker

MS = 1_000_000


def make_worker() -> tuple[Worker, Client]:
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
    )
    conn: Any = None  # the pipe to the runner is not used by the receive path
    worker = Worker(conn, setup)
    client = worker.clients[1]
    client.ready = client.in_step = True
    return worker, client


def message(tag: str, proc: int, idx: int, sent_ns: int) -> bytes:
    text = f"~{tag}:{proc}:{idx}:{sent_ns}~ the quick brown fox"
    return (
        f'{{"type":"message","id":"1-{idx}","ts":1,"room":"t-0","name":"u0","text":"{text}","ref":"r{idx}"}}'
    ).encode()


def presence() -> bytes:
    return b'{"type":"presence","room":"t-0","event":"join","name":"u5","online_count":3}'


def test_frames_before_the_first_step_are_counted_not_searched() -> None:
    worker, client = make_worker()
    worker.on_frame(client, presence())  # fanout.mjs spun forever here: its marker was empty
    worker.on_frame(client, message("old", 0, 1, 5))
    assert worker.frames.total == 2
    assert worker.frames.by_type == {"presence": 1, "message": 1}
    assert worker.frames.foreign == 1
    assert len(client.keys) == 0


def test_several_deliveries_in_one_frame_are_all_recorded() -> None:
    worker, client = make_worker()
    worker.step = Step("abc1", measure_from=1_000 * MS, measure_to=2_000 * MS)
    sent_a, sent_b = 1_100 * MS, 1_200 * MS
    frame = b"\n".join([message("abc1", 0, 7, sent_a), presence(), message("abc1", 3, 8, sent_b)])
    worker.on_frame(client, frame)
    assert list(client.keys) == [0 << 32 | 7, 3 << 32 | 8]
    assert all(latency > 0 for latency in client.latencies)
    assert worker.step.received == 2
    assert worker.frames.message == 2
    assert worker.frames.total == 1


def test_another_steps_marker_is_not_this_steps_delivery() -> None:
    worker, client = make_worker()
    worker.step = Step("abc1", measure_from=0, measure_to=10**18)
    worker.on_frame(client, message("abc10", 0, 1, 5 * MS))  # "~abc1:" is not inside "~abc10:"
    assert len(client.keys) == 0
    assert worker.frames.foreign == 1


def test_warmup_deliveries_are_not_measured() -> None:
    worker, client = make_worker()
    worker.step = Step("s", measure_from=1_000 * MS, measure_to=2_000 * MS)
    worker.on_frame(client, message("s", 0, 1, 999 * MS))
    worker.on_frame(client, message("s", 0, 2, 2_000 * MS))  # the window is half-open
    assert len(client.keys) == 0
    assert worker.frames.message == 2


def test_deliveries_after_the_step_closed_are_late() -> None:
    worker, client = make_worker()
    worker.step = Step("s", measure_from=0, measure_to=10**18)
    worker.step.closed = True
    worker.on_frame(client, message("s", 0, 1, 5 * MS))
    assert len(client.keys) == 0
    assert worker.step.late == 1
    assert worker.step.late_max_ns > 0


def test_an_error_sharing_a_frame_with_deliveries_is_counted_by_code() -> None:
    worker, client = make_worker()
    worker.step = Step("s", measure_from=0, measure_to=10**18)
    error = b'{"type":"error","code":"rate_limited","detail":"Slow down","ref":"r9","retry_after_ms":120}'
    worker.on_frame(client, message("s", 0, 1, 5 * MS) + b"\n" + error)
    assert len(client.keys) == 1
    assert worker.frames.errors == {"rate_limited": 1}
    assert worker.step.errors == {"rate_limited": 1}
    assert worker.frames.error_samples[0]["ref"] == "r9"


def test_a_broken_marker_is_malformed() -> None:
    worker, client = make_worker()
    worker.step = Step("s", measure_from=0, measure_to=10**18)
    worker.on_frame(client, b'{"type":"message","text":"~s:0:x:12~"}')
    worker.on_frame(client, b'{"type":"message","text":"~s:0:1:12')
    assert worker.frames.malformed == 2
    assert len(client.keys) == 0


class StubSocket:
    """The one attribute the join path sets on a connection: where its next frame goes."""

    on_frame: Any = None


async def test_welcome_completes_the_join_names_the_replica_and_counts_from_the_next_frame() -> None:
    worker, client = make_worker()
    worker.step = Step("abc1", measure_from=1_000 * MS, measure_to=2_000 * MS)
    report, socket = Connected(), StubSocket()
    answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    worker.handshake_frame(client, cast(Any, socket), report, answer, presence())
    assert not answer.done()
    welcome = b'{"type":"welcome","replica":"abc123","history":[]}'
    worker.handshake_frame(client, cast(Any, socket), report, answer, welcome)
    assert answer.result() == ""
    assert report.replicas == {1: "abc123"}
    socket.on_frame(message("abc1", 0, 4, 1_100 * MS))  # a delivery in the same read as the welcome
    assert list(client.keys) == [4]


async def test_an_error_instead_of_a_welcome_says_why_the_join_failed() -> None:
    worker, client = make_worker()
    report, socket = Connected(), StubSocket()
    answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    refused = b'{"type":"error","code":"invalid_room","detail":"A room name has 1 to 32 of a-z"}'
    worker.handshake_frame(client, cast(Any, socket), report, answer, refused)
    assert answer.result() == "error invalid_room: A room name has 1 to 32 of a-z"
    assert socket.on_frame is None
