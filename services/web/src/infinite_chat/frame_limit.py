"""Refuse an oversized WebSocket frame before it is held in memory.

Hypercorn 0.18 checks `websocket_max_message_size` only after appending each fragment to its buffer, and keeps
appending the rest of an oversized frame after it has sent close 1009: a client could make a replica hold a frame
of any size. This checks the size before appending, so a replica holds at most MAX_FRAME_BYTES per connection
whatever a client sends. It replaces one method and checks that the method it replaces is the one it knows.
"""

from __future__ import annotations

from hypercorn.protocol import ws_stream
from wsproto.events import Message

_original_extend = ws_stream.WebsocketBuffer.extend


def _extend_within_limit(self: ws_stream.WebsocketBuffer, event: Message) -> None:  # type: ignore[type-arg]
    if self.length + len(event.data) > self.max_length:
        raise ws_stream.FrameTooLargeError()
    _original_extend(self, event)


def refuse_oversized_frames_early() -> None:
    if ws_stream.WebsocketBuffer.extend is _extend_within_limit:
        return
    if _original_extend.__code__.co_varnames[:2] != ("self", "event"):
        raise RuntimeError("hypercorn's WebsocketBuffer changed: review infinite_chat/frame_limit.py")
    ws_stream.WebsocketBuffer.extend = _extend_within_limit  # type: ignore[method-assign]
