"""A WebSocket client on a raw TCP socket, driven by hand with wsproto.

trio-websocket reads its socket in a background task; the tests here need a
client that reads only when told (a slow consumer), or that vanishes without a
close handshake.
"""

from __future__ import annotations

import json
import socket

import auth_mode
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, Request, TextMessage


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, masked: bool = True,
                 length_bytes: int | None = None) -> bytes:
    """One client frame, exactly as told: also the wrong ones (reserved bits,
    no mask, a length not in its shortest form) that wsproto will not write."""
    n = len(payload)
    if length_bytes is None:
        length_bytes = 0 if n < 126 else 2 if n < 65536 else 8
    mask_bit = 0x80 if masked else 0
    if length_bytes == 0:
        header = bytes((fin << 7 | rsv << 4 | opcode, mask_bit | n))
    else:
        header = bytes((fin << 7 | rsv << 4 | opcode, mask_bit | (126 if length_bytes == 2 else 127)))
        header += n.to_bytes(length_bytes, "big")
    if not masked:
        return header + payload
    key = bytes((0x37, 0xFA, 0x21, 0x3D))
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawClient:
    """A WebSocket client on a raw TCP socket, read only when the test says so
    (trio-websocket reads in a background task, which a slow consumer must not)."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection):
        self.stream = stream
        self.ws = ws

    @classmethod
    async def connect(cls, port: int, receive_buffer: int | None = None) -> "RawClient":
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port))
        client = cls(trio.SocketStream(sock), WSConnection(ConnectionType.CLIENT))
        await client.stream.send_all(client.ws.send(Request(host=f"127.0.0.1:{port}", target="/services",
                                                                   extra_headers=auth_mode.HEADERS)))
        with trio.fail_after(5):
            while True:
                client.ws.receive_data(await client.stream.receive_some(65536))
                for event in client.ws.events():
                    if isinstance(event, AcceptConnection):
                        return client
                    if isinstance(event, RejectConnection):
                        raise AssertionError(f"handshake rejected: {event}")

    async def send_json(self, frame: dict) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(data=json.dumps(frame))))

    async def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        await self.stream.send_all(client_frame(opcode, payload, fin=fin))

    async def close_code(self, timeout: float = 5.0) -> int:
        """Read until the broker's close frame; its code. A reset fails (BrokenResourceError).
        Frames are read by hand: wsproto's client refuses code 1014, which the broker may echo."""
        data = bytearray()
        with trio.fail_after(timeout):
            while True:
                chunk = await self.stream.receive_some(1 << 20)
                if not chunk:
                    raise AssertionError("the broker closed the connection without a close frame")
                data += chunk
                while len(data) >= 2:
                    length = data[1] & 0x7F
                    start = 2 + {126: 2, 127: 8}.get(length, 0)
                    if length >= 126 and len(data) >= start:
                        length = int.from_bytes(data[2:start], "big")
                    if len(data) < start + length:
                        break
                    if data[0] & 0x0F == 0x8:
                        return int.from_bytes(data[start:start + 2], "big")
                    del data[:start + length]

    async def drain(self, timeout: float = 10.0) -> tuple[int, bool]:
        """Read until the broker drops the connection: (text frames received, close frame seen)."""
        frames, close_seen = 0, False
        with trio.fail_after(timeout):
            while True:
                try:
                    data = await self.stream.receive_some(1 << 20)
                except trio.BrokenResourceError:  # reset by the broker
                    data = b""
                if not data:
                    return frames, close_seen
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, TextMessage) and event.message_finished:
                        frames += 1
                    elif isinstance(event, CloseConnection):
                        close_seen = True

    async def receive_until_quiet(self, quiet: float = 0.5, timeout: float = 20.0) -> list[dict]:
        """Read every message that arrives until none came for `quiet` seconds."""
        messages, partial = [], ""
        with trio.fail_after(timeout):
            while True:
                with trio.move_on_after(quiet):
                    data = await self.stream.receive_some(1 << 20)
                    if not data:
                        return messages
                    self.ws.receive_data(data)
                    for event in self.ws.events():
                        if isinstance(event, TextMessage):
                            partial += event.data
                            if event.message_finished:
                                messages.append(json.loads(partial))
                                partial = ""
                    continue
                return messages

    async def aclose(self) -> None:
        await self.stream.aclose()
