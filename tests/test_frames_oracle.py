"""Our frame decoder against wsproto's, on the same random byte streams.

exocom/frames.py exists for speed; wsproto's FrameProtocol (server side, no
extensions) says what correct is. Both are fed the same stream, cut at random
places: valid messages (fragmented anywhere, also inside a UTF-8 character),
control frames, and every violation the decoder knows. They must produce the
same messages and control frames, and fail with the same close code.

Where wsproto and the RFC disagree, the RFC wins and the case is left out here:
- close code 1014 (Bad Gateway, IANA registry): wsproto's CloseReason lacks it
  and refuses it as reserved; we accept it, as we accept 1012 and 1013.
- a frame over the size limit: wsproto's FrameProtocol has no limit (1009 is
  ours, tests/test_frames.py), so messages stay far below it here.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, ParseFailed

from exocom.server.frames import BINARY, CLOSE, PING, PONG, TEXT, FrameDecoder, ProtocolError, parse_close
from raw_ws import client_frame

CONTINUATION = 0x0
NOT_UTF8 = [b"\xff", b"\x80", b"\xc0\xaf", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"]
CLOSE_CODES = [0, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1011, 1012, 1013, 1015, 1016, 2999,
               3000, 3999, 4000, 4999, 5000, 65535]


def fragments(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(edges, edges[1:])] or [b""]


def message_frames(opcode: int, data: bytes, cuts: list[int]) -> bytes:
    pieces = fragments(data, cuts)
    return b"".join(client_frame(opcode if n == 0 else CONTINUATION, piece, fin=n == len(pieces) - 1)
                    for n, piece in enumerate(pieces))


cuts = st.lists(st.integers(0, 300), max_size=3)
text = st.text(max_size=60).map(str.encode)


@st.composite
def not_utf8(draw) -> bytes:
    data = draw(text)
    at = draw(st.integers(0, len(data)))
    # Inside a character, or before the end: either way the message is not UTF-8.
    return data[:at] + draw(st.sampled_from(NOT_UTF8)) + data[at:]


valid = st.one_of(
    st.builds(message_frames, st.just(TEXT), text, cuts),
    st.builds(message_frames, st.just(BINARY), st.binary(max_size=300), cuts),
    st.builds(client_frame, st.sampled_from([PING, PONG]), st.binary(max_size=125)),
)
closing = st.one_of(
    st.builds(lambda code, reason: client_frame(CLOSE, code.to_bytes(2, "big") + reason),
              st.sampled_from(CLOSE_CODES), st.one_of(text.filter(lambda r: len(r) <= 123), st.sampled_from(NOT_UTF8))),
    st.builds(client_frame, st.just(CLOSE), st.binary(max_size=1)),
)
violation = st.one_of(
    st.builds(message_frames, st.just(TEXT), not_utf8(), cuts),
    st.builds(client_frame, st.sampled_from([TEXT, BINARY, PING]), st.binary(max_size=20), rsv=st.integers(1, 7)),
    st.builds(client_frame, st.sampled_from([TEXT, BINARY, PING]), st.binary(max_size=20), masked=st.just(False)),
    st.builds(client_frame, st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]), st.binary(max_size=20)),
    st.builds(client_frame, st.sampled_from([CLOSE, PING, PONG]), st.binary(min_size=126, max_size=130)),
    st.builds(client_frame, st.sampled_from([PING, PONG]), st.binary(max_size=20), fin=st.just(False)),
    st.builds(client_frame, st.just(CONTINUATION), st.binary(max_size=20)),
    st.builds(lambda a, b: client_frame(TEXT, a, fin=False) + client_frame(BINARY, b),
              st.binary(max_size=20).map(bytes.hex).map(str.encode), st.binary(max_size=20)),
    st.builds(client_frame, st.sampled_from([TEXT, BINARY]), st.binary(max_size=125).map(bytes.hex).map(str.encode),
              length_bytes=st.sampled_from([2, 8])),
    # a 64-bit length with its highest bit set: only the header is ever sent
    st.just(b"\x82\xff" + (1 << 63).to_bytes(8, "big") + b"\x00" * 4),
)


def ours(chunks: list[bytes]) -> tuple[list, int | None]:
    decoder = FrameDecoder(max_message=1 << 20)
    got: list = []
    for chunk in chunks:
        code = None
        try:
            frames = decoder.feed(chunk)
        except ProtocolError as e:
            frames, code = e.frames, e.code
        for opcode, payload in frames:
            if opcode == CLOSE:
                return [*got, (CLOSE, *parse_close(payload))], None
            got.append((opcode, payload))
        if code is not None:
            return got, code
    return got, None


def wsprotos(chunks: list[bytes]) -> tuple[list, int | None]:
    protocol = FrameProtocol(client=False, extensions=[])
    got: list = []
    parts: list = []
    for chunk in chunks:
        protocol.receive_bytes(chunk)
        try:
            for frame in protocol.received_frames():
                if frame.opcode == CLOSE:
                    return [*got, (CLOSE, int(frame.payload[0]), frame.payload[1])], None
                if frame.opcode in (PING, PONG):
                    got.append((int(frame.opcode), frame.payload))
                    continue
                parts.append(frame.payload.encode() if isinstance(frame.payload, str) else frame.payload)
                if frame.message_finished:
                    got.append((int(frame.opcode), b"".join(parts)))
                    parts = []
        except ParseFailed as e:
            return got, int(e.code)
    return got, None


def chunked(stream: bytes, sizes: list[int]) -> list[bytes]:
    chunks, i, k = [], 0, 0
    while i < len(stream):
        chunks.append(stream[i:i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    return chunks


@settings(deadline=None, max_examples=400)
@given(st.lists(st.one_of(valid, valid, closing, violation), max_size=8),
       st.lists(st.integers(1, 80), min_size=1, max_size=8))
def test_same_messages_and_close_code_as_wsproto(frames, sizes):
    chunks = chunked(b"".join(frames), sizes)
    assert ours(chunks) == wsprotos(chunks)


def test_the_oracle_sees_violations():
    """The comparison above is worth something only if both sides fail somewhere."""
    cases = {
        message_frames(TEXT, b"caf\xc3", []): 1007,
        client_frame(CLOSE, b"\x03\xed"): 1002,
        client_frame(TEXT, b"x", length_bytes=2): 1002,
    }
    for stream, code in cases.items():
        assert ours([stream]) == wsprotos([stream]) == ([], code)
