"""A stand-in for the far end of one socket, for tests of the outbox and the rooms without a server: it takes what is
written (or, stalled, takes nothing and is always behind until drained)."""

from __future__ import annotations

import asyncio

from infinite_chat.connection import Connection, Flusher


class Peer:
    """A FrameSink that records every frame written to it and how it was closed."""

    def __init__(self, *, stalled: bool = False) -> None:
        self.stalled = stalled
        self.written: list[bytes] = []
        self.closed: tuple[int, str] | None = None
        self.aborted = asyncio.Event()
        self.drain = asyncio.Event()

    @property
    def objects(self) -> list[bytes]:
        """Every object written, one per line of each frame, in order."""
        return [line for frame in self.written for line in frame.split(b"\n")]

    def write(self, payload: bytes) -> bool:
        self.written.append(payload)
        return not self.stalled

    async def drained(self) -> None:
        await self.drain.wait()

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def abort(self) -> None:
        self.aborted.set()

    def stop(self) -> None:
        pass


def outbox(peer: Peer, *, interval: float = 0, limit: int = 1000, limit_bytes: int = 1 << 20) -> Connection:
    """A connection writing to `peer`, flushed at once (or every `interval` seconds when busy)."""
    return Connection(
        peer, Flusher(interval), outbox_limit=limit, outbox_limit_bytes=limit_bytes, on_overflow=lambda _: None
    )


async def settle() -> None:
    """Lets what was just pushed, published or scheduled in this process run: a few passes of the event loop (no
    socket and no Redis is involved, so nothing takes longer)."""
    for _ in range(5):
        await asyncio.sleep(0)
