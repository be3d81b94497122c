"""WebSocket frames on the server side (RFC 6455), without I/O.

wsproto does the opening handshake; after it, this small decoder reads the
client's frames. It exists because the per-message path is dominated by
frame parsing: one pass over the buffer per read, no event object per frame,
unmasking with one big-integer XOR, and the size limit checked from the
header before any payload is buffered. Text payloads are handed on as bytes,
checked for UTF-8 here (RFC 6455 §8.1: fail with 1007) rather than left to the
JSON decoder, which cannot tell bad UTF-8 from bad JSON; a text message in one
ASCII frame, the common case, costs one `isascii` scan.

Its verdicts are checked against wsproto's decoder (tests/test_frames_oracle.py).
"""

from __future__ import annotations

import codecs

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
_CONTINUATION = 0x0
# Fragments of one message, at most: the size limit bounds the bytes, this
# bounds the work (a peer could send empty continuation frames forever).
MAX_FRAGMENTS = 4096
_from_bytes = int.from_bytes


CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_PAYLOAD = 1007
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


class ProtocolError(Exception):
    """The peer broke the protocol; close the connection with `code`.

    `frames` are those complete before the violation in the same `feed`: they
    were sent correctly and are handled before the connection is closed."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.frames: list[tuple[int, bytes]] = []


def sendable_close_code(code: int) -> bool:
    """Whether a peer may put `code` in a close frame (RFC 6455 §7.4, and the
    IANA registry for 1012-1014). 1004, 1005, 1006 and 1015 are reserved or
    meant for local use only."""
    return 1000 <= code <= 1014 and code not in (1004, 1005, 1006) or 3000 <= code <= 4999


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

    __slots__ = ("max_message", "_buffer", "_parts", "_fragments", "_message_opcode", "_text")

    def __init__(self, max_message: int):
        self.max_message = max_message
        self._buffer = bytearray()
        self._parts = bytearray()  # the fragments so far, joined: memory stays within max_message
        self._fragments = 0
        self._message_opcode = 0
        self._text: codecs.IncrementalDecoder | None = None  # checks a fragmented text message's UTF-8, once not ASCII

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer
        buffer += data
        out: list[tuple[int, bytes]] = []
        size = len(buffer)
        i = 0
        try:
            while size - i >= 2:
                b0 = buffer[i]
                b1 = buffer[i + 1]
                if b0 & 0x70:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set: no extension was negotiated")
                if not b1 & 0x80:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
                opcode = b0 & 0x0F
                length = b1 & 0x7F
                header = 6
                if length == 126:
                    if size - i < 8:
                        break
                    length = _from_bytes(buffer[i + 2:i + 4], "big")
                    header = 8
                    if length < 126:
                        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "payload length not in its shortest form")
                elif length == 127:
                    if size - i < 14:
                        break
                    length = _from_bytes(buffer[i + 2:i + 10], "big")
                    header = 14
                    if length < 65536 or length >> 63:
                        raise ProtocolError(CLOSE_PROTOCOL_ERROR,
                                            "payload length not in its shortest form, or its highest bit set")
                if opcode >= 0x8:
                    if length > 125 or not b0 & 0x80:
                        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "control frames must be final and at most 125 bytes")
                elif length + len(self._parts) > self.max_message:
                    raise ProtocolError(1009, f"message larger than {self.max_message} bytes")
                end = i + header + length
                if end > size:
                    break
                payload = unmask(buffer[i + header:end], buffer[i + header - 4:i + header])
                i = end
                if opcode >= 0x8:
                    if opcode == CLOSE:
                        check_close(payload)
                    elif opcode != PING and opcode != PONG:
                        raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown control opcode {opcode}")
                    out.append((opcode, payload))
                    continue
                if opcode == _CONTINUATION:
                    if not self._message_opcode:
                        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation frame without a message to continue")
                elif opcode == TEXT or opcode == BINARY:
                    if self._message_opcode:
                        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message before the previous one finished")
                    if b0 & 0x80:  # the common case: a whole message in one frame
                        if opcode == TEXT and not payload.isascii():
                            _check_utf8(payload)
                        out.append((opcode, payload))
                        continue
                    self._message_opcode = opcode
                else:
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
                # Each fragment as it comes: a bad sequence fails the connection at once (§8.1). While the
                # fragments are ASCII no character can be cut between them: no decoder is needed yet.
                if self._message_opcode == TEXT and (self._text is not None or not payload.isascii()):
                    if self._text is None:
                        self._text = _Utf8Decoder()
                    try:
                        self._text.decode(payload, bool(b0 & 0x80))
                    except UnicodeDecodeError:
                        raise ProtocolError(CLOSE_INVALID_PAYLOAD, _NOT_UTF8) from None
                self._parts += payload
                self._fragments += 1
                if b0 & 0x80:
                    out.append((self._message_opcode, bytes(self._parts)))
                    self._parts = bytearray()
                    self._fragments = 0
                    self._message_opcode = 0
                    self._text = None
                elif self._fragments >= MAX_FRAGMENTS:
                    raise ProtocolError(1008, f"more than {MAX_FRAGMENTS} fragments in one message")
        except ProtocolError as e:
            e.frames = out
            raise
        if i:
            del buffer[:i]
        return out


_NOT_UTF8 = "a text message must be UTF-8; send other data in binary frames"


def _check_utf8(payload: bytes) -> None:
    try:
        payload.decode()
    except UnicodeDecodeError:
        raise ProtocolError(CLOSE_INVALID_PAYLOAD, _NOT_UTF8) from None


def check_close(payload: bytes) -> None:
    """Raise ProtocolError unless `payload` is a valid close frame's (RFC 6455 §5.5.1, §7.4)."""
    if len(payload) == 1:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "a close frame's payload is empty or at least 2 bytes")
    if payload:
        code = _from_bytes(payload[:2], "big")
        if not sendable_close_code(code):
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"close code {code} may not be sent")
        try:
            payload[2:].decode()
        except UnicodeDecodeError:
            raise ProtocolError(CLOSE_INVALID_PAYLOAD, "a close frame's reason must be UTF-8") from None


def parse_close(payload: bytes) -> tuple[int, str]:
    if len(payload) >= 2:
        return _from_bytes(payload[:2], "big"), payload[2:].decode("utf-8", "replace")
    return 1005, ""
