"""One socket's outbox (connection.py): bounded in objects and in bytes, and a close that cannot be written in time
ends the connection."""

from __future__ import annotations

import asyncio

import pytest

from infinite_chat import connection as connection_module
from infinite_chat.broker import Delivery
from infinite_chat.connection import CLOSE_TRY_AGAIN, Connection, Flusher


class StalledSink:
    """A peer that reads nothing: every write leaves it further behind."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.aborted = asyncio.Event()

    def write(self, payload: bytes) -> bool:
        self.written.append(payload)
        return False

    async def drained(self) -> None:
        await asyncio.Event().wait()

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def abort(self) -> None:
        self.aborted.set()


def live(sink: StalledSink, *, limit: int = 1000, limit_bytes: int = 64 * 1024) -> tuple[Connection, list[Connection]]:
    overflowed: list[Connection] = []
    connection = Connection(
        sink, Flusher(0), outbox_limit=limit, outbox_limit_bytes=limit_bytes, on_overflow=overflowed.append
    )
    connection.start_joining("lobby", "alice")
    connection.go_live(b'{"type":"welcome"}', None)
    return connection, overflowed


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_outbox_over_its_bytes_is_dropped_and_closed_with_1013() -> None:
    sink = StalledSink()
    connection, overflowed = live(sink, limit_bytes=64 * 1024)
    await settle()  # the welcome is written; the peer is now behind
    big = Delivery("lobby", (1, 0), b"x" * 8000)
    for n in range(8):
        connection.post(Delivery("lobby", (1, n), big.frame))
    assert connection.pending_bytes == 64_000
    assert connection.close_code is None
    connection.post(Delivery("lobby", (1, 9), big.frame))  # 72,000 bytes: over
    assert (connection.pending, connection.pending_bytes) == ([], 0)
    assert connection.close_code == CLOSE_TRY_AGAIN
    await settle()
    assert overflowed == [connection]
    connection.release()


async def test_a_close_that_cannot_be_written_in_time_ends_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection_module, "CLOSE_TIMEOUT", 0.05)
    sink = StalledSink()
    connection, _ = live(sink, limit=10)
    await settle()
    for n in range(11):
        connection.post(Delivery("lobby", (1, n), b"{}"))
    await asyncio.wait_for(sink.aborted.wait(), 2)
    assert sink.closed is None  # the close frame never got out: the peer read nothing


async def test_a_socket_that_ends_normally_is_not_aborted_later(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection_module, "CLOSE_TIMEOUT", 0.05)
    sink = StalledSink()
    connection, _ = live(sink)
    connection.close(1012, "replica restarting")
    connection.release()
    await asyncio.sleep(0.1)
    assert not sink.aborted.is_set()
