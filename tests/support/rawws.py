"""A WebSocket client written on a bare socket, for the tests that need what a library will not do: stop reading
with a tiny receive buffer (a stalled client), or stream a frame far larger than the server allows."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
from typing import Any

from .addresses import forwarded

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


class HandshakeRefused(Exception):
    def __init__(self, status: int, response: bytes) -> None:
        super().__init__(f"upgrade refused with {status}")
        self.status = status
        self.response = response


def frame_header(opcode: int, length: int, *, fin: bool = True) -> bytes:
    """A client frame's header, masked (RFC 6455 5.2); the 4-byte mask key follows it."""
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return bytes((first, 0x80 | length))
    if length < 65536:
        return bytes((first, 0x80 | 126)) + struct.pack("!H", length)
    return bytes((first, 0x80 | 127)) + struct.pack("!Q", length)


def mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


class RawSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.close_code: int | None = None

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        path: str = "/ws",
        headers: dict[str, str] | None = None,
        receive_buffer: int | None = None,
        read_limit: int = 64 * 1024,
    ) -> RawSocket:
        """Connects and upgrades. `receive_buffer` sets SO_RCVBUF before connecting (so the window starts small);
        `read_limit` bounds what asyncio reads ahead of the test (it stops reading at twice this)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=read_limit)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in (forwarded() | (headers or {})).items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        status = int(response.split(b" ", 2)[1])
        if status != 101:
            writer.close()
            raise HandshakeRefused(status, response)
        return cls(reader, writer)

    def write_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        key = os.urandom(4)
        self.writer.write(frame_header(opcode, len(payload), fin=fin) + key + mask(payload, key))

    async def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        self.write_frame(opcode, payload, fin=fin)
        await self.writer.drain()

    async def send_json(self, obj: dict[str, Any]) -> None:
        await self.send_frame(OP_TEXT, json.dumps(obj, ensure_ascii=False).encode())

    async def read_frame(self) -> tuple[int, bytes]:
        """The next whole frame as (opcode, payload); pings are answered on the way. Raises EOFError when the
        connection ends without a close frame."""
        while True:
            try:
                head = await self.reader.readexactly(2)
                length = head[1] & 0x7F
                if length == 126:
                    length = struct.unpack("!H", await self.reader.readexactly(2))[0]
                elif length == 127:
                    length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
                payload = await self.reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError) as error:
                raise EOFError("connection ended without a close frame") from error
            opcode = head[0] & 0x0F
            if opcode == OP_PING:
                with contextlib.suppress(ConnectionError):  # the server may be gone already: read on to the end
                    await self.send_frame(OP_PONG, payload)
                continue
            if opcode == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            return opcode, payload

    async def read_objects(self) -> list[dict[str, Any]]:
        """The objects of the next text frame (a server frame holds one per line); [] for a close frame."""
        opcode, payload = await self.read_frame()
        if opcode in (OP_CLOSE, OP_PONG):
            return []
        return [json.loads(line) for line in payload.decode().split("\n")]

    async def read_until_closed(self, timeout: float) -> list[dict[str, Any]]:
        """Everything the server sends until its close frame; the close code is then in `close_code`."""
        objects: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while self.close_code is None:
                objects.extend(await self.read_objects())
        return objects

    async def read_until_end(self, timeout: float) -> list[dict[str, Any]]:
        """Everything the server sends until its close frame (the code is then in `close_code`) or until it ends the
        connection without one (`close_code` stays None)."""
        objects: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while self.close_code is None:
                try:
                    objects.extend(await self.read_objects())
                except EOFError:
                    break
        return objects

    def abort(self) -> None:
        self.writer.transport.abort()

    async def close(self) -> None:
        if self.close_code is None and not self.writer.is_closing():
            with contextlib.suppress(ConnectionError):
                await self.send_frame(OP_CLOSE, struct.pack("!H", 1000))
        self.writer.close()
