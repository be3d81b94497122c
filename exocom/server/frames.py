"""WebSocket frames on the server side (RFC 6455), without I/O.

wsproto does the opening handshake; after it, this small decoder reads the
client's frames. It exists because the per-message path is dominated by
frame parsing: one pass over the buffer per read, no event object per frame,
unmasking with one big-integer XOR, and the size limit checked from the
header before any payload is buffered. Text payloads are handed on as bytes:
the JSON decoder validates UTF-8 itself.
"""

from __future__ import annotations

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
_CONTINUATION = 0x0
# Fragments of one message, at most: the size limit bounds the bytes, this
# bounds the work (a peer could send empty continuation frames forever).
MAX_FRAGMENTS = 4096
_from_bytes = int.from_bytes


class ProtocolError(Exception):
    """The peer broke the protocol; close the connection with `code`."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def unmask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    n = len(payload)
    if n == 0:
        return b""
    key = (bytes(mask) * (n // 4 + 1))[:n]
    return (_from_bytes(payload, "little") ^ _from_bytes(key, "little")).to_bytes(n, "little")


def frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked, final frame (server to client)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return header + payload


def text_header(n: int) -> bytes:
    """The header of an unmasked, final text frame of `n` bytes."""
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big")
    return b"\x81\x7f" + n.to_bytes(8, "big")


def close_frame(code: int, reason: str = "") -> bytes:
    data = reason.encode()[:123]
    while data:  # do not cut a UTF-8 sequence in half
        try:
            data.decode()
            break
        except UnicodeDecodeError:
            data = data[:-1]
    return frame(CLOSE, code.to_bytes(2, "big") + data)


class FrameDecoder:
    """Feed bytes, get complete messages and control frames as (opcode, payload)."""

    __slots__ = ("max_message", "_buffer", "_parts", "_fragments", "_message_opcode")

    def __init__(self, max_message: int):
        self.max_message = max_message
        self._buffer = bytearray()
        self._parts = bytearray()  # the fragments so far, joined: memory stays within max_message
        self._fragments = 0
        self._message_opcode = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer
        buffer += data
        out: list[tuple[int, bytes]] = []
        size = len(buffer)
        i = 0
        while size - i >= 2:
            b0 = buffer[i]
            b1 = buffer[i + 1]
            if b0 & 0x70:
                raise ProtocolError(1002, "reserved bits set: no extension was negotiated")
            if not b1 & 0x80:
                raise ProtocolError(1002, "client frames must be masked")
            opcode = b0 & 0x0F
            length = b1 & 0x7F
            header = 6
            if length == 126:
                if size - i < 8:
                    break
                length = _from_bytes(buffer[i + 2:i + 4], "big")
                header = 8
            elif length == 127:
                if size - i < 14:
                    break
                length = _from_bytes(buffer[i + 2:i + 10], "big")
                header = 14
            if opcode >= 0x8:
                if length > 125 or not b0 & 0x80:
                    raise ProtocolError(1002, "control frames must be final and at most 125 bytes")
            elif length + len(self._parts) > self.max_message:
                raise ProtocolError(1009, f"message larger than {self.max_message} bytes")
            end = i + header + length
            if end > size:
                break
            payload = unmask(buffer[i + header:end], buffer[i + header - 4:i + header])
            i = end
            if opcode >= 0x8:
                if opcode not in (CLOSE, PING, PONG):
                    raise ProtocolError(1002, f"unknown control opcode {opcode}")
                out.append((opcode, payload))
                continue
            if opcode == _CONTINUATION:
                if not self._message_opcode:
                    raise ProtocolError(1002, "continuation frame without a message to continue")
            elif opcode in (TEXT, BINARY):
                if self._message_opcode:
                    raise ProtocolError(1002, "new message before the previous one finished")
                if b0 & 0x80:
                    out.append((opcode, payload))  # the common case: a whole message in one frame
                    continue
                self._message_opcode = opcode
            else:
                raise ProtocolError(1002, f"unknown opcode {opcode}")
            self._parts += payload
            self._fragments += 1
            if b0 & 0x80:
                out.append((self._message_opcode, bytes(self._parts)))
                self._parts = bytearray()
                self._fragments = 0
                self._message_opcode = 0
            elif self._fragments >= MAX_FRAGMENTS:
                raise ProtocolError(1008, f"more than {MAX_FRAGMENTS} fragments in one message")
        if i:
            del buffer[:i]
        return out


def parse_close(payload: bytes) -> tuple[int, str]:
    if len(payload) >= 2:
        return _from_bytes(payload[:2], "big"), payload[2:].decode("utf-8", "replace")
    return 1005, ""
