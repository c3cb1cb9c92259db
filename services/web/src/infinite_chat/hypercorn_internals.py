"""Everything in this replica that depends on Hypercorn's or wsproto's internals, in one place: installed by the
server's entry point (`install`), which first checks that the installed versions are exactly the ones this module
was written against and refuses to start otherwise. After an upgrade of either, review this module, then change
PINNED (and the pins in pyproject.toml and requirements.txt) together.

**Reading frames.** Hypercorn 0.18 checks `websocket_max_message_size` only after appending each fragment to its
buffer, and keeps appending the rest of an oversized frame after it has sent close 1009: a client could make a
replica hold a frame of any size. This checks the size, in bytes, before appending, so a replica holds at most
MAX_FRAME_BYTES per connection whatever a client sends.

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

**Writing frames.** The send path is where a chat spends its time (one frame per recipient), and Hypercorn's ASGI
send adds an event object, wsproto and a lock to each frame. Under Hypercorn's HTTP/1.1 server, `direct_frames`
finds the connection's transport behind the ASGI send, once per connection, and `DirectFrames` writes whole
frames to it; the handshake, pings, reading and closing stay Hypercorn's. Where that walk fails (another server,
Quart's test client, or a Hypercorn whose insides moved) the caller falls back to the plain ASGI send, and says so:
the `chat_send_path_total{path}` counter and a warning in the log. Figures: docs/performance.md.

Each replacement checks that what it replaces is the one it knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Generator
from importlib import metadata
from io import BytesIO, StringIO
from typing import Any

from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.protocol import ws_stream
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.typing import ASGISendCallable
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Event, Message, TextMessage
from wsproto.extensions import PerMessageDeflate

from . import metrics
from .config import Settings
from .protocol import CloseCode
from .ratelimit import TokenBucket

log = logging.getLogger(__name__)

# The exact versions this module was written against (and pyproject.toml and requirements.txt pin).
PINNED = {"hypercorn": "0.18.0", "wsproto": "1.3.2"}


class InternalsChanged(RuntimeError):
    """Hypercorn or wsproto is not what this module was written for: the replica must not start."""


def check_versions(installed: Callable[[str], str] = metadata.version) -> None:
    wrong = {name: installed(name) for name in PINNED if installed(name) != PINNED[name]}
    if wrong:
        found = ", ".join(f"{name} {version} (written for {PINNED[name]})" for name, version in wrong.items())
        raise InternalsChanged(
            f"{found}: review infinite_chat/hypercorn_internals.py against the new version, then update PINNED there"
        )


def install(frame_rate: float, frame_burst: int) -> None:
    """Checks the versions, then installs the reading limits and fixes (idempotent)."""
    check_versions()
    harden_websocket_reading(frame_rate, frame_burst)


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
    """The per-connection frame rate, set once at start by install."""

    rate = Settings.frame_rate
    burst = Settings.frame_burst


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
                yield CloseConnection(code=CloseCode.TOO_MANY_FRAMES, reason="too many frames")
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


class _Declined(PerMessageDeflate):
    """permessage-deflate, declined whatever the offer: the handshake answers without the extension."""

    def accept(self, offer: str) -> None:
        return None


def harden_websocket_reading(frame_rate: float = Settings.frame_rate, frame_burst: int = Settings.frame_burst) -> None:
    """Installs the limits and fixes (idempotent)."""
    _FrameRate.rate, _FrameRate.burst = frame_rate, frame_burst
    if ws_stream.WebsocketBuffer.extend is not _extend_within_limit:
        # The replacement fills the buffer's own fields, which to_message() and clear() read: check they are these.
        if set(vars(ws_stream.WebsocketBuffer(1))) != {"value", "length", "max_length"}:
            raise InternalsChanged("hypercorn's WebsocketBuffer changed: review infinite_chat/hypercorn_internals.py")
        ws_stream.WebsocketBuffer.extend = _extend_within_limit  # type: ignore[method-assign]
    # Compression is never agreed to. nginx strips the offer, but an ALB passes a browser's on, and wsproto would
    # inflate each compressed client frame whole before any limit sees it (a 16 KiB frame can inflate to megabytes);
    # DirectFrames also writes frames as if no extension were agreed. Hypercorn names the extension it offers
    # through the name it imported: that name is what is replaced.
    if getattr(ws_stream, "PerMessageDeflate", None) is not _Declined:
        if getattr(ws_stream, "PerMessageDeflate", None) is not PerMessageDeflate:
            raise InternalsChanged("hypercorn's extensions changed: review infinite_chat/hypercorn_internals.py")
        setattr(ws_stream, "PerMessageDeflate", _Declined)  # noqa: B010
    # Hypercorn makes each connection through the name it imported: that name is what is replaced.
    current = getattr(ws_stream, "Connection", None)
    if current is not _HardenedConnection:
        if current is not Connection or not hasattr(Connection(ConnectionType.SERVER), "_state"):
            raise InternalsChanged(
                "hypercorn's or wsproto's Connection changed: review infinite_chat/hypercorn_internals.py"
            )
        setattr(ws_stream, "Connection", _HardenedConnection)  # noqa: B010


# ---- writing ----------------------------------------------------------------------------------------------------

# Above this many bytes waiting in the transport (the asyncio default high-water mark) the peer counts as behind.
WRITE_BUFFER_HIGH = 64 * 1024


class DirectFrames:
    """Writes text frames to the socket under Hypercorn's WebSocket stream, as Hypercorn would but without its
    per-frame layers. A server frame is a 2-10 byte header and the payload (RFC 6455 5.2: servers do not mask, and
    no extension is negotiated: nginx strips the offer, and the replica declines it, `_Declined`). Each write is a
    whole frame, so frames never interleave with Hypercorn's own (pings, close); nothing is written once the close
    handshake has begun, and the close itself goes through Hypercorn."""

    __slots__ = ("asgi_send", "stream", "transport", "writer")

    def __init__(self, stream: WSStream, writer: asyncio.StreamWriter, asgi_send: ASGISendCallable) -> None:
        self.stream = stream
        self.writer = writer
        self.transport = writer.transport
        self.asgi_send = asgi_send

    def write(self, payload: bytes) -> bool:
        transport = self.transport
        if self.stream.connection.state is not ConnectionState.OPEN or transport.is_closing():
            return True  # the socket is going away: nothing to wait for
        transport.write(frame_header(len(payload)) + payload)
        return transport.get_write_buffer_size() <= WRITE_BUFFER_HIGH

    async def drained(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def close(self, code: int, reason: str) -> None:
        await self.asgi_send({"type": "websocket.close", "code": code, "reason": reason})

    def abort(self) -> None:
        # Hypercorn sees the connection lost and ends the stream: the receive loop gets its disconnect.
        self.transport.abort()

    def stop(self) -> None:
        pass


def direct_frames(send: ASGISendCallable) -> DirectFrames | None:
    """The direct writer for this ASGI send, when it is Hypercorn's HTTP/1.1 WebSocket stream; else None (and the
    fallback is counted and logged)."""
    stream = getattr(send, "__self__", None)
    protocol = getattr(getattr(stream, "send", None), "__self__", None)
    server = getattr(getattr(protocol, "send", None), "__self__", None)
    if isinstance(stream, WSStream) and isinstance(protocol, H11Protocol) and isinstance(server, TCPServer):
        metrics.SEND_PATHS.labels("direct").inc()
        return DirectFrames(stream, server.writer, send)
    metrics.SEND_PATHS.labels("asgi").inc()
    log.warning(
        "the direct send path is not available: frames go through the ASGI send",
        extra={"event": "send_path_fallback", "send": type(getattr(send, "__self__", send)).__name__},
    )
    return None


def frame_header(length: int) -> bytes:
    """FIN + text opcode, then the payload length in the shortest of its three encodings."""
    if length < 126:
        return bytes((0x81, length))
    if length < 65536:
        return b"\x81\x7e" + length.to_bytes(2, "big")
    return b"\x81\x7f" + length.to_bytes(8, "big")
