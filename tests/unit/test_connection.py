"""One socket's outbox (connection.py): ordered, bounded in objects and in bytes, written as one frame per flush,
and given up on when the client does not take it."""

from __future__ import annotations

import asyncio
import time

import pytest

from infinite_chat import connection as connection_module
from infinite_chat.broker import Delivery
from infinite_chat.connection import Connection, Flusher
from infinite_chat.protocol import CloseCode
from support.chat import eventually
from support.peer import Peer, outbox, settle


def message(n: int, size: int = 10) -> Delivery:
    return Delivery("lobby", (1, n), b"x" * size)


async def test_what_waits_goes_out_in_order_as_one_frame_per_flush() -> None:
    sink = Peer()
    connection = outbox(sink)
    connection.reply(b"welcome")
    for n in range(3):
        connection.push(Delivery("lobby", (1, n), f"m{n}".encode()))
    await settle()
    assert sink.written == [b"welcome\nm0\nm1\nm2"]


async def test_under_load_a_connection_is_written_at_most_once_per_interval() -> None:
    sink = Peer()
    flusher = Flusher(0.05)
    connection = Connection(sink, flusher, outbox_limit=1000, outbox_limit_bytes=1 << 20, on_overflow=lambda _: None)
    connection.push(message(0))
    await settle()
    assert len(sink.written) == 1  # quiet: at once
    quiet_write = time.monotonic()
    connection.push(message(1))
    connection.push(message(2))
    await settle()
    assert len(sink.written) == 1  # busy: waits for the interval...
    await eventually(lambda: len(sink.written) == 2, timeout=5, what="the flush after the interval")
    assert time.monotonic() - quiet_write >= 0.04  # ...not before it...
    assert len(sink.written) == 2  # ...then both in one frame
    assert sink.written[1] == b"x" * 10 + b"\n" + b"x" * 10


async def test_an_outbox_over_its_objects_or_bytes_is_dropped_and_closed_with_1013() -> None:
    for limit, limit_bytes, size, fits in ((5, 1 << 20, 10, 5), (1000, 64 * 1024, 8000, 8)):
        sink = Peer(stalled=True)
        gone: list[Connection] = []
        connection = Connection(
            sink, Flusher(0), outbox_limit=limit, outbox_limit_bytes=limit_bytes, on_overflow=gone.append
        )
        connection.reply(b"w")
        await settle()  # written: the peer is now behind, and nothing more is written until it drains
        for n in range(fits):
            connection.push(message(n, size))
        assert connection.close_code is None
        connection.push(message(fits, size))
        assert (connection.pending, connection.pending_bytes) == ([], 0)
        assert connection.close_code == CloseCode.TRY_AGAIN
        await settle()
        assert gone == [connection]
        connection.release()


async def test_a_close_that_cannot_be_written_in_time_ends_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection_module, "CLOSE_TIMEOUT", 0.05)
    sink = Peer(stalled=True)
    connection = outbox(sink, limit=10)
    connection.reply(b"w")
    await settle()
    for n in range(11):
        connection.push(message(n))
    await asyncio.wait_for(sink.aborted.wait(), 2)
    assert sink.closed is None  # the close frame never got out: the peer read nothing


async def test_a_peer_that_takes_nothing_for_the_stall_timeout_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection_module, "STALL_TIMEOUT", 0.05)
    sink = Peer(stalled=True)
    connection = outbox(sink)
    connection.reply(b"w")
    await asyncio.wait_for(sink.aborted.wait(), 2)


async def test_once_drained_what_waited_goes_out_and_the_close_after_it() -> None:
    sink = Peer(stalled=True)
    connection = outbox(sink)
    connection.reply(b"w")
    await settle()
    connection.push(message(1))
    connection.close(CloseCode.RESTARTING, "replica restarting")
    await settle()
    assert sink.closed is None  # behind: the close waits for what is before it
    sink.stalled = False
    sink.drain.set()
    await settle()
    assert sink.written[-1] == b"x" * 10
    assert sink.closed == (1012, "replica restarting")
    connection.release()


async def test_a_socket_that_ends_normally_is_not_aborted_later(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection_module, "CLOSE_TIMEOUT", 0.05)
    sink = Peer()
    connection = outbox(sink)
    connection.close(CloseCode.RESTARTING, "replica restarting")
    connection.release()
    await asyncio.sleep(0.1)
    assert not sink.aborted.is_set()
    connection.push(message(1))  # after the end: dropped
    assert connection.pending == []
