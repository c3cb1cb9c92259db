"""One client's socket as the rest of the replica sees it: an ordered, bounded outbox, written by the replica's
flusher. Its one job is getting frames to the socket, in order, or giving up on a client that does not take them;
what the client is (a member of a room, joining or live) is rooms.py's business.

Fan-out never awaits a socket: it appends the shared `Delivery` to each recipient's outbox and moves on. The
`Flusher` then writes every outbox that has something waiting as one frame (objects separated by newlines, as
protocol v1 allows). When the replica has been quiet it flushes at the end of the current loop iteration, so a lone
message goes out at once; under load it flushes at most once per `interval`, so that each frame carries several
messages and the per-frame cost (here, in nginx and in the client) is paid once for all of them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import metrics
from .protocol import FRAME_SEPARATOR, CloseCode, MessageId

log = logging.getLogger(__name__)

# A close that cannot be written within this long (the client does not read, so the close frame waits behind what
# it has not read) ends the TCP connection instead: what the replica held for it is freed.
CLOSE_TIMEOUT = 10.0
# A socket that takes nothing of what is written to it for this long (every buffer on the way is full) is gone as
# far as the chat is concerned, like a peer that stops reading for nginx's send_timeout: it is dropped.
STALL_TIMEOUT = 60.0


class FrameSink(Protocol):
    """Where a connection's frames go: hypercorn_internals.DirectFrames, or websocket.AsgiFrames."""

    def write(self, payload: bytes) -> bool:
        """Writes one text frame now; False when the peer is behind and `drained` should be awaited."""

    async def drained(self) -> None:
        """Returns once the peer has taken what was written (or the socket is gone)."""

    async def close(self, code: int, reason: str) -> None:
        """Starts the close handshake, after everything written so far."""

    def abort(self) -> None:
        """Ends the connection at once, dropping whatever is still buffered for it."""

    def stop(self) -> None:
        """The socket has ended: release what writing needed."""


class Outgoing(Protocol):
    """What an outbox holds: a frame, and the id of the message it is, when it is one (for the latency metric)."""

    @property
    def frame(self) -> bytes: ...

    @property
    def id(self) -> MessageId | None: ...


@dataclass(frozen=True, slots=True)
class Reply:
    """A frame for this client only (a welcome, an error)."""

    frame: bytes
    id: None = None


class Flusher:
    """Writes the outboxes that have something waiting, all in one pass. One per replica."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._dirty: list[Connection] = []
        self._scheduled = False
        self._last = 0.0

    def mark(self, connection: Connection) -> None:
        self._dirty.append(connection)
        if self._scheduled:
            return
        self._scheduled = True
        loop = asyncio.get_running_loop()
        wait = self._last + self.interval - loop.time()
        if wait > 0:
            loop.call_later(wait, self.flush)
        else:
            # Still after everything this loop iteration delivers: one read from Redis, one frame.
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        self._last = asyncio.get_running_loop().time()
        dirty, self._dirty = self._dirty, []
        for connection in dirty:
            try:
                connection.flush()
            except Exception:
                # One broken socket must not leave the others unwritten.
                log.exception("flush failed", extra={"event": "flush_failed", "connection": connection.id})


class Connection:
    __slots__ = (
        "_abort_timer",
        "_blocked",
        "_close_sent",
        "_flusher",
        "_sink",
        "close_code",
        "close_reason",
        "closing",
        "id",
        "limit",
        "limit_bytes",
        "on_overflow",
        "pending",
        "pending_bytes",
    )

    def __init__(
        self,
        sink: FrameSink,
        flusher: Flusher,
        *,
        outbox_limit: int,
        outbox_limit_bytes: int,
        on_overflow: Callable[[Connection], object],
    ) -> None:
        self.id = secrets.token_hex(6)
        self.pending: list[Outgoing] = []
        # Bytes of the frames in `pending`: the outbox is bounded in both objects and bytes.
        self.pending_bytes = 0
        self.limit = outbox_limit
        self.limit_bytes = outbox_limit_bytes
        self.closing = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.on_overflow = on_overflow
        self._sink = sink
        self._flusher = flusher
        self._blocked = False
        self._close_sent = False
        self._abort_timer: asyncio.TimerHandle | None = None

    def push(self, item: Outgoing) -> None:
        """Called by the fan-out for every recipient of every message: keep it short."""
        if self.closing:
            return
        pending = self.pending
        pending.append(item)
        self.pending_bytes += len(item.frame)
        if len(pending) == 1:
            self._flusher.mark(self)
        elif len(pending) > self.limit or self.pending_bytes > self.limit_bytes:
            self.overflow()

    def reply(self, frame: bytes) -> None:
        """A frame for this client only, in order with everything else it receives."""
        self.push(Reply(frame))

    def fits(self, count: int, size: int) -> bool:
        """Whether this many more objects and bytes, on top of what waits, stay within the outbox's bounds (what a
        room holds for a joining member counts against them too)."""
        return len(self.pending) + count <= self.limit and self.pending_bytes + size <= self.limit_bytes

    def close(self, code: int, reason: str = "") -> None:
        """Closes once what is already in the outbox has been written (a replica restarting: 1012)."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        if not self.closing:
            self.closing = True
            self._abort_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._sink.abort)
        self._flusher.mark(self)

    def release(self) -> None:
        """The socket has ended: nothing more is written, and nothing is held for it."""
        self.closing = True
        self._close_sent = True
        self.pending = []
        self.pending_bytes = 0
        self._sink.stop()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None

    def overflow(self) -> None:
        """Too far behind to catch up: drop what it has not read, and tell it to come back with `since`. Memory
        stays bounded whatever the client does."""
        self.pending = []
        self.pending_bytes = 0
        metrics.SLOW_CONSUMERS.inc()
        self.close(CloseCode.TRY_AGAIN, "too slow: reconnect with since")
        # Not now: this runs inside the fan-out's loop over the room's members, and taking a member out of that set
        # mid-loop broke the loop and lost the message for everyone after it. Until then, `closing` drops pushes.
        asyncio.get_running_loop().call_soon(self.on_overflow, self)

    def flush(self) -> None:
        """Called by the flusher: everything waiting, as one frame; then the close, if one was asked for."""
        if self._blocked:
            return  # the drain waiter marks this connection again
        batch = self.pending
        if batch:
            self.pending = []
            self.pending_bytes = 0
            if not self._sink.write(FRAME_SEPARATOR.join([item.frame for item in batch])):
                self._blocked = True
                asyncio.get_running_loop().create_task(self._wait_drained())
            _record_write(batch)
        if self.close_code is not None and not self._blocked and not self._close_sent:
            self._close_sent = True
            asyncio.get_running_loop().create_task(self._sink.close(self.close_code, self.close_reason))

    async def _wait_drained(self) -> None:
        try:
            await asyncio.wait_for(self._sink.drained(), STALL_TIMEOUT)
        except TimeoutError:
            metrics.SLOW_CONSUMERS.inc()
            self._sink.abort()
            return
        self._blocked = False
        if self.pending or self.close_code is not None:
            self._flusher.mark(self)


def _record_write(batch: list[Outgoing]) -> None:
    for item in batch:
        if item.id is not None:
            # Ids carry Redis's clock at acceptance: that is where a message's latency starts.
            metrics.SEND_PATH.wrote(len(batch), max(0.0, time.time() - item.id[0] / 1000))
            return
    metrics.SEND_PATH.wrote(len(batch), None)
