"""Limits and fixes in how Hypercorn reads WebSocket frames: refuse an oversized frame before it is held in memory,
close a client that sends frames faster than allowed, and close with a close frame (not a dropped connection) when
a client sends frames that cannot be parsed.

Hypercorn 0.18 checks `websocket_max_message_size` only after appending each fragment to its buffer, and keeps
appending the rest of an oversized frame after it has sent close 1009: a client could make a replica hold a frame
of any size. This checks the size, in bytes, before appending, so a replica holds at most MAX_FRAME_BYTES per
connection whatever a client sends.

When wsproto cannot parse what a client sent (invalid UTF-8 in a text frame, a reserved opcode, an unmasked
frame), it reports a close with the right code (1007, 1002) but leaves the connection open; Hypercorn answers
with a close frame only when the peer began the close, so it dropped the TCP connection instead and the client saw
1006, indistinguishable from a crash. RFC 6455 7.1.7 says to fail the connection with a close frame; marking the
connection as closed by the peer makes Hypercorn send exactly that. And once this side has sent its close, what
the client still sends is dropped unread, so that its own close frame, behind the rest of a refused frame, ends
the connection at once.

Every frame a client sends takes a token from its connection's bucket (FRAME_RATE_LIMIT per second, bursts of
FRAME_RATE_BURST): data frames and each fragment of one, and the pings and pongs that Hypercorn answers by itself
and the application never sees. That is where it is counted, so a ping flood is as bounded as a message flood; a
client out of tokens gets close 1008 and nothing more it sends is read.

Each fix replaces one thing and checks that what it replaces is the one it knows.
"""

from __future__ import annotations

from collections.abc import Generator
from io import BytesIO, StringIO
from typing import Any

from hypercorn.protocol import ws_stream
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Event, Message, TextMessage

from . import metrics
from .ratelimit import TokenBucket

CLOSE_POLICY = 1008


def _extend_within_limit(self: ws_stream.WebsocketBuffer, event: Message) -> None:  # type: ignore[type-arg]
    # Counted in bytes as sent (Hypercorn counts characters, which let a text frame of 4-byte characters be 64 KiB).
    data = event.data
    size = len(data) if isinstance(data, bytes | bytearray) or data.isascii() else len(data.encode())
    if self.length + size > self.max_length:
        raise ws_stream.FrameTooLargeError()
    if self.value is None:
        self.value = StringIO() if isinstance(event, TextMessage) else BytesIO()
    self.value.write(data)
    self.length += size


class _FrameRate:
    """The per-connection frame rate, set once at start by harden_websocket_reading."""

    rate = 20.0
    burst = 60


class _HardenedConnection(Connection):
    """wsproto's connection, but a frame it cannot parse leaves it as if the client had sent that close, a client
    over its frame rate is closed the same way (1008), and data arriving after this side's close is dropped before
    Hypercorn sees it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._frames = TokenBucket(_FrameRate.rate, _FrameRate.burst)
        self._flooded = False

    def events(self) -> Generator[Event, None, None]:
        for event in super().events():
            if self._flooded and not isinstance(event, CloseConnection):
                continue  # closed for flooding: the rest is read off the socket and dropped, but for the client's close
            if self.state is ConnectionState.OPEN and _whole_frame(event) and self._frames.take() > 0:
                self._flooded = True
                metrics.FLOODS.inc()
                # As for a frame that cannot be parsed: Hypercorn answers with this close and ends the stream.
                self._state = ConnectionState.REMOTE_CLOSING
                yield CloseConnection(code=CLOSE_POLICY, reason="too many frames")
                continue
            if isinstance(event, Message) and self.state is ConnectionState.LOCAL_CLOSING:
                # After our close (1009, 1012, ...) nothing the client says is read (RFC 6455 5.5.1). Hypercorn would
                # hand the rest of an oversized frame to the buffer, which refuses it and ends the pass over the
                # events, so the client's own close behind it was never seen and the socket hung until a timeout.
                continue
            if isinstance(event, CloseConnection) and self.state is ConnectionState.OPEN:
                # Only a parse failure yields a close while OPEN (a client's own close frame moves the state first).
                self._state = ConnectionState.REMOTE_CLOSING
            yield event


def _whole_frame(event: Event) -> bool:
    """A frame the client sent: a ping, a pong, or the end of a data frame (wsproto reports a large frame in pieces
    as its bytes arrive; those pieces are one frame, which the size limit bounds)."""
    if isinstance(event, Message):
        return event.frame_finished
    return not isinstance(event, CloseConnection)


def harden_websocket_reading(frame_rate: float = 20.0, frame_burst: int = 60) -> None:
    """Installs the limits and fixes (idempotent)."""
    _FrameRate.rate, _FrameRate.burst = frame_rate, frame_burst
    if ws_stream.WebsocketBuffer.extend is not _extend_within_limit:
        # The replacement fills the buffer's own fields, which to_message() and clear() read: check they are these.
        if set(vars(ws_stream.WebsocketBuffer(1))) != {"value", "length", "max_length"}:
            raise RuntimeError("hypercorn's WebsocketBuffer changed: review infinite_chat/frame_limit.py")
        ws_stream.WebsocketBuffer.extend = _extend_within_limit  # type: ignore[method-assign]
    # Hypercorn makes each connection through the name it imported: that name is what is replaced.
    current = getattr(ws_stream, "Connection", None)
    if current is not _HardenedConnection:
        if current is not Connection or not hasattr(Connection(ConnectionType.SERVER), "_state"):
            raise RuntimeError("hypercorn's or wsproto's Connection changed: review infinite_chat/frame_limit.py")
        setattr(ws_stream, "Connection", _HardenedConnection)  # noqa: B010
