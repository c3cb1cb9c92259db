"""The benchmark's typing notices (bench/chatbench, `--typing`): each connected client sends one every period from a
random phase until the window ends, and typing objects received are counted by type and, in the step's window,
with their frames and bytes, also when they share a frame with deliveries."""

from __future__ import annotations

import random
from time import monotonic_ns
from typing import Any, cast

from websockets.exceptions import ConnectionClosed

from chatbench.cli import parser
from chatbench.runner import typing_report
from chatbench.worker import (
    TYPING_NOTICE,
    Client,
    Setup,
    StartStep,
    Step,
    TypingCount,
    Worker,
    typing_objects,
    typing_schedule,
)

MS = 1_000_000
S = 1_000_000_000


def make_worker(clients: int = 2) -> Worker:
    setup = Setup(
        proc=0,
        url="ws://127.0.0.1:1/ws",
        origin="http://127.0.0.1:1",
        clients=[(i, 0) for i in range(clients)],
        room_prefix="t",
        name_prefix="u",
        connect_concurrency=1,
        connect_timeout_s=1,
        size=64,
    )
    conn: Any = None  # the pipe to the runner is not used here
    worker = Worker(conn, setup)
    for client in worker.clients:
        client.ready = client.in_step = True
    return worker


def start(t0: int, measure_from: int, measure_to: int, typing_s: float) -> StartStep:
    return StartStep(
        tag="s",
        slots=[],
        total_slots=0,
        rate_per_sender=0,
        arrival="poisson",
        seed=1,
        t0_ns=t0,
        measure_from_ns=measure_from,
        measure_to_ns=measure_to,
        typing_s=typing_s,
    )


def message(tag: str, idx: int, sent_ns: int) -> bytes:
    text = f"~{tag}:0:{idx}:{sent_ns}~ the quick brown fox"
    return f'{{"type":"message","id":"1-{idx}","ts":1,"room":"t-0","name":"u0","text":"{text}"}}'.encode()


TYPING = b'{"type":"typing","room":"t-0","names":["u3","u1"],"count":2}'


# ---------------------------------------------------------------- receiving


def test_a_frame_counts_its_typing_objects_and_their_bytes() -> None:
    frame = b"\n".join([message("s", 1, 5), TYPING, TYPING])
    assert typing_objects(frame) == (2, 2 * len(TYPING))
    assert typing_objects(message("s", 1, 5)) == (0, 0)


def test_typing_sharing_a_frame_with_deliveries_is_counted_with_them() -> None:
    worker = make_worker()
    client = worker.clients[1]
    worker.step = step = Step("s", measure_from=0, measure_to=10**18)
    worker.on_frame(client, message("s", 1, 5 * MS) + b"\n" + TYPING)
    assert len(client.keys) == 1  # the delivery still counts
    assert worker.frames.by_type == {"typing": 1}
    assert (step.typing.objects, step.typing.frames, step.typing.bytes) == (1, 1, len(TYPING))


def test_a_typing_frame_alone_is_counted_once_by_type() -> None:
    worker = make_worker()
    worker.step = step = Step("s", measure_from=0, measure_to=10**18)
    worker.on_frame(worker.clients[0], TYPING)
    assert worker.frames.by_type == {"typing": 1}
    assert step.typing.objects == 1


def test_typing_outside_the_window_counts_by_type_only() -> None:
    worker = make_worker()
    later = monotonic_ns() + 60 * S
    worker.step = step = Step("s", measure_from=later, measure_to=later + S)
    worker.on_frame(worker.clients[0], TYPING)
    step.closed = True
    worker.step.measure_from = 0  # a closed step takes nothing either
    worker.on_frame(worker.clients[0], TYPING)
    assert worker.frames.by_type == {"typing": 2}
    assert step.typing == TypingCount()


# ---------------------------------------------------------------- sending


def test_first_notices_are_spread_over_one_period() -> None:
    t0 = 1_000 * S
    firsts = [at for at, _ in typing_schedule(list(range(50)), start(t0, t0, t0 + 10 * S, 3), random.Random(1))]
    assert all(t0 <= at < t0 + 3 * S for at in firsts)
    assert max(firsts) - min(firsts) > 2 * S  # not aligned


class StubSocket:
    def __init__(self, closed: bool = False) -> None:
        self.closed = closed
        self.sent: list[tuple[int, str]] = []

    async def send(self, text: str) -> None:
        if self.closed:
            raise ConnectionClosed(None, None)
        self.sent.append((monotonic_ns(), text))


async def test_each_client_sends_a_notice_every_period_until_the_window_ends() -> None:
    worker = make_worker(clients=3)
    sockets = [StubSocket(), StubSocket(), StubSocket(closed=True)]
    for client, socket in zip(worker.clients, sockets, strict=True):
        client.ws = cast(Any, socket)
    gone = Client(9, 0, "u9")  # not connected: sends nothing
    worker.clients.append(gone)
    worker.by_index[9] = gone
    t0 = monotonic_ns()
    command = start(t0, t0 + 40 * MS, t0 + 100 * MS, typing_s=0.02)
    step = Step("s", command.measure_from_ns, command.measure_to_ns)
    await worker.typing_loop(step, command)
    for socket in sockets[:2]:
        assert len(socket.sent) == 5  # at its phase, then every 20 ms, before 100 ms
        assert {text for _, text in socket.sent} == {TYPING_NOTICE}
    in_window = [t for s in sockets for t, _ in s.sent if command.measure_from_ns <= t < command.measure_to_ns]
    assert step.typing.sent == len(in_window)
    assert step.send_failures == 5  # the closed socket's


def test_typing_is_off_unless_asked_and_takes_seconds() -> None:
    assert parser().parse_args(["room"]).typing == 0
    assert parser().parse_args(["room", "--typing", "3"]).typing == 3.0


def test_typing_received_per_member_per_second() -> None:
    counts = [TypingCount(sent=300, objects=1_000, frames=900, bytes=80_000), TypingCount(objects=1_000, bytes=80_000)]
    report = typing_report(counts, every_s=3, members=200, duration_s=10)
    assert report["sent"] == 300
    assert report["received_objects"] == 2_000
    assert report["per_member_per_s"] == {"objects": 1.0, "frames": 0.45, "bytes": 80.0}
