"""Closing a TCP connection without losing what the peer should read last.

Closing a socket that still has unread data makes the kernel send a reset,
which may destroy the peer's copy of our close frame or HTTP response before
it reads it: a lingering close reads and drops what the peer still sends
first, within bounds.
"""

from __future__ import annotations

import trio

from .frames import CLOSE, FrameDecoder, ProtocolError

RECEIVE_SIZE = 65536
CLOSE_TIMEOUT = 2.0
# A lingering close reads and drops at most this much of what a peer still
# sends after the broker's close frame or HTTP response (and for at most
# CLOSE_TIMEOUT): enough for a client that is in the middle of an oversized
# frame to finish it and read why it was closed; past it, the socket is reset.
LINGER_BYTES = 8 * 1024 * 1024


async def receive_or_eof(stream: trio.SocketStream) -> bytes:
    """The next bytes from the peer; b"" once it closed or reset the connection."""
    try:
        return await stream.receive_some(RECEIVE_SIZE)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""


async def discard_until_eof(stream: trio.SocketStream, decoder: FrameDecoder | None = None, data: bytes = b"") -> None:
    """A lingering close: read and drop what the peer still sends (starting
    with `data`) until it closes its side or, while `decoder` can still read
    its frames, until its close frame ends the close handshake; bounded by
    LINGER_BYTES and CLOSE_TIMEOUT. Closing a socket with unread data makes
    the kernel send a reset, which may destroy the peer's copy of our close
    frame or HTTP response before it reads it."""
    discarded = len(data)
    with trio.move_on_after(CLOSE_TIMEOUT):
        while discarded < LINGER_BYTES:
            if decoder is not None and data:
                try:
                    frames = decoder.feed(data)
                except ProtocolError as e:
                    frames, decoder = e.frames, None  # its framing is lost: read until it closes
                if any(opcode == CLOSE for opcode, _ in frames):
                    return
            data = await receive_or_eof(stream)
            if not data:
                return
            discarded += len(data)
