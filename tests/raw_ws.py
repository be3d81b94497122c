"""A WebSocket client on a raw TCP socket, driven by hand with wsproto.

trio-websocket reads its socket in a background task; the tests here need a
client that reads only when told (a slow consumer), or that vanishes without a
close handshake.
"""

from __future__ import annotations

import json
import socket

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, Request, TextMessage


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
        await client.stream.send_all(client.ws.send(Request(host=f"127.0.0.1:{port}", target="/services")))
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
