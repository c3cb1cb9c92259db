"""What the replica reads of a client (frame_limit.py): a client over its frame rate is closed with 1008, pings and
fragments included, and a large frame arriving in pieces is one frame."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from wsproto.connection import ConnectionType
from wsproto.events import CloseConnection, Event, Message, Ping

from infinite_chat import frame_limit
from infinite_chat.frame_limit import harden_websocket_reading


@pytest.fixture(autouse=True)
def default_rate() -> Iterator[None]:
    yield
    harden_websocket_reading()  # the defaults again, for whatever runs next


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    key = b"\x01\x02\x03\x04"
    masked = bytes(byte ^ key[i % 4] for i, byte in enumerate(payload))
    length = len(payload)
    header = bytes(((0x80 if fin else 0) | opcode,))
    if length < 126:
        header += bytes((0x80 | length,))
    else:
        header += bytes((0x80 | 126,)) + length.to_bytes(2, "big")
    return header + key + masked


def events_of(data: bytes) -> list[Event]:
    harden_websocket_reading(frame_rate=1, frame_burst=5)
    connection = frame_limit._HardenedConnection(ConnectionType.SERVER)
    connection.receive_data(data)
    return list(connection.events())


def test_pings_past_the_burst_end_in_a_close_1008() -> None:
    events = events_of(client_frame(0x9, b"p") * 20)
    assert [type(e) for e in events] == [Ping] * 5 + [CloseConnection]
    close = events[-1]
    assert isinstance(close, CloseConnection)
    assert close.code == 1008


def test_fragments_count_one_each() -> None:
    data = client_frame(0x1, b"a", fin=False) + b"".join(client_frame(0x0, b"b", fin=False) for _ in range(10))
    events = events_of(data)
    assert sum(isinstance(e, Message) for e in events) == 5
    assert isinstance(events[-1], CloseConnection)


def test_a_large_frame_arriving_in_pieces_is_one_frame() -> None:
    harden_websocket_reading(frame_rate=1, frame_burst=2)
    connection = frame_limit._HardenedConnection(ConnectionType.SERVER)
    frame = client_frame(0x1, b"x" * 4000)
    seen: list[Event] = []
    for start in range(0, len(frame), 100):  # 41 pieces, as a slow network would deliver them
        connection.receive_data(frame[start : start + 100])
        seen.extend(connection.events())
    assert not any(isinstance(e, CloseConnection) for e in seen)
    assert sum(len(e.data) for e in seen if isinstance(e, Message)) == 4000
