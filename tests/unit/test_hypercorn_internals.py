"""Everything that leans on Hypercorn's and wsproto's insides (hypercorn_internals.py): the exact versions are
checked before the replica starts; a client over its frame rate is closed with 1008, pings and fragments included;
a frame over the limit is refused before it is held; a frame that cannot be parsed gets a close frame; nothing is
read after this side's close; server frame headers are RFC 6455's."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypercorn.protocol import ws_stream
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Event, Message, Ping

from infinite_chat import hypercorn_internals, server
from infinite_chat.hypercorn_internals import InternalsChanged, check_versions, frame_header, harden_websocket_reading


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
    connection = hypercorn_internals._HardenedConnection(ConnectionType.SERVER)
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
    connection = hypercorn_internals._HardenedConnection(ConnectionType.SERVER)
    frame = client_frame(0x1, b"x" * 4000)
    seen: list[Event] = []
    for start in range(0, len(frame), 100):  # 41 pieces, as a slow network would deliver them
        connection.receive_data(frame[start : start + 100])
        seen.extend(connection.events())
    assert not any(isinstance(e, CloseConnection) for e in seen)
    assert sum(len(e.data) for e in seen if isinstance(e, Message)) == 4000


def test_the_installed_versions_are_the_pinned_ones() -> None:
    check_versions()  # the image and .venv install exactly what the module was written for


def test_another_version_refuses_to_start_naming_the_module_to_review(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(hypercorn_internals.PINNED, "hypercorn", "0.17.0")
    with pytest.raises(InternalsChanged, match=re.escape("hypercorn 0.18.0 (written for 0.17.0)")):
        check_versions()
    with pytest.raises(SystemExit) as stopped:
        server.main()
    assert stopped.value.code == 3
    error = capsys.readouterr().err
    assert "refusing to start" in error
    assert "infinite_chat/hypercorn_internals.py" in error


def test_a_frame_over_the_limit_is_refused_before_it_is_buffered() -> None:
    harden_websocket_reading()
    connection = hypercorn_internals._HardenedConnection(ConnectionType.SERVER)
    buffer = ws_stream.WebsocketBuffer(1024)
    connection.receive_data(client_frame(0x1, "€".encode() * 400))  # 400 characters, 1,200 bytes
    [message] = [e for e in connection.events() if isinstance(e, Message)]
    with pytest.raises(ws_stream.FrameTooLargeError):
        buffer.extend(message)
    assert buffer.value is None  # nothing of it held


def test_a_frame_that_cannot_be_parsed_gets_a_close_as_if_the_client_began_it() -> None:
    connection = hypercorn_internals._HardenedConnection(ConnectionType.SERVER)
    connection.receive_data(client_frame(0x1, b"\xff\xfe"))  # not UTF-8
    [close] = list(connection.events())
    assert isinstance(close, CloseConnection)
    assert close.code == 1007
    assert connection.state is ConnectionState.REMOTE_CLOSING  # so Hypercorn answers with a close frame


def test_after_this_sides_close_data_is_dropped_and_the_clients_close_still_seen() -> None:
    connection = hypercorn_internals._HardenedConnection(ConnectionType.SERVER)
    connection.send(CloseConnection(code=1009))
    connection.receive_data(client_frame(0x1, b"rest of a refused frame") + client_frame(0x8, b"\x03\xe8"))
    events = list(connection.events())
    assert [type(e) for e in events] == [CloseConnection]


def test_server_frame_headers_use_the_shortest_length_encoding() -> None:
    assert frame_header(0) == b"\x81\x00"
    assert frame_header(125) == b"\x81\x7d"
    assert frame_header(126) == b"\x81\x7e\x00\x7e"
    assert frame_header(65535) == b"\x81\x7e\xff\xff"
    assert frame_header(65536) == b"\x81\x7f" + (65536).to_bytes(8, "big")


def test_pyproject_and_requirements_pin_exactly_the_versions_checked() -> None:
    web = Path(__file__).resolve().parents[2] / "services" / "web"
    pyproject = (web / "pyproject.toml").read_text()
    requirements = (web / "requirements.txt").read_text().lower()
    for name, version in hypercorn_internals.PINNED.items():
        assert f'"{name}=={version}"' in pyproject
        assert f"\n{name}=={version}\n" in requirements


def test_compression_offered_by_a_client_is_declined() -> None:
    # An ALB passes a browser's offer on (nginx strips it): the replica must answer without the extension, or
    # wsproto would inflate each compressed frame whole before any size limit sees it.
    harden_websocket_reading()
    offer = b"permessage-deflate; client_max_window_bits"
    handshake = ws_stream.Handshake(
        [
            (b"connection", b"upgrade"),
            (b"upgrade", b"websocket"),
            (b"sec-websocket-version", b"13"),
            (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            (b"sec-websocket-extensions", offer),
        ],
        "1.1",
    )
    status, headers, connection = handshake.accept(None, [])
    assert status == 101
    assert b"sec-websocket-extensions" not in {name for name, _ in headers}
    # And a compressed frame (RSV1 set) from a client that compresses anyway is a protocol error, not inflated.
    connection.receive_data(bytes([0xC1, 0x80 | 4]) + b"\x00\x00\x00\x00" + b"abcd")
    [event] = list(connection.events())
    assert isinstance(event, CloseConnection)
    assert event.code == 1002
