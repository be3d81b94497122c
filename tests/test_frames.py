"""The server-side frame decoder against frames made by wsproto's client."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol

from exocom.server.frames import (BINARY, CLOSE, MAX_FRAGMENTS, PING, TEXT, FrameDecoder, ProtocolError, close_frame,
                           parse_close)


def client_frames(messages, fragment_size):
    proto = FrameProtocol(client=True, extensions=[])
    out = b""
    for kind, data in messages:
        if kind == PING:
            out += proto.ping(data)
            continue
        pieces = [data[i:i + fragment_size] for i in range(0, len(data), fragment_size)] or [b""]
        for n, piece in enumerate(pieces):
            out += proto.send_data(piece, fin=n == len(pieces) - 1)
    return out


message = st.one_of(
    st.tuples(st.just(BINARY), st.binary(max_size=70_000)),
    st.tuples(st.just(PING), st.binary(max_size=125)),
)


# Fragments of at least 20 bytes: a 70,000-byte message stays within MAX_FRAGMENTS.
@given(st.lists(message, max_size=6), st.integers(20, 80_000), st.lists(st.integers(1, 9000), min_size=1, max_size=20))
def test_round_trip_with_any_fragmentation_and_chunking(messages, fragment_size, chunk_sizes):
    wire = client_frames(messages, fragment_size)
    decoder = FrameDecoder(max_message=1 << 20)
    got = []
    i = 0
    k = 0
    while i < len(wire):
        n = chunk_sizes[k % len(chunk_sizes)]
        got += decoder.feed(wire[i:i + n])
        i += n
        k += 1
    assert got == [(kind, data) for kind, data in messages]


def test_text_frames_are_bytes():
    proto = FrameProtocol(client=True, extensions=[])
    wire = proto.send_data('{"name": "é"}')
    assert FrameDecoder(100).feed(wire) == [(TEXT, '{"name": "é"}'.encode())]


def test_size_limit_is_checked_from_the_header():
    proto = FrameProtocol(client=True, extensions=[])
    wire = proto.send_data(b"x" * 5000)
    decoder = FrameDecoder(max_message=4096)
    with pytest.raises(ProtocolError) as e:
        decoder.feed(wire[:20])  # only the header and a little payload have arrived
    assert e.value.code == 1009


def test_fragmented_message_over_limit():
    proto = FrameProtocol(client=True, extensions=[])
    wire = proto.send_data(b"x" * 3000, fin=False) + proto.send_data(b"x" * 3000, fin=True)
    with pytest.raises(ProtocolError) as e:
        FrameDecoder(max_message=4096).feed(wire)
    assert e.value.code == 1009


def test_a_message_of_endless_empty_fragments_is_closed_with_1008():
    proto = FrameProtocol(client=True, extensions=[])
    decoder = FrameDecoder(max_message=4096)
    decoder.feed(proto.send_data(b"x", fin=False))
    empty = proto.send_data(b"", fin=False)  # a continuation frame
    for _ in range(MAX_FRAGMENTS - 2):
        assert decoder.feed(empty) == []
    with pytest.raises(ProtocolError) as e:
        decoder.feed(empty)
    assert e.value.code == 1008


def test_unmasked_client_frame_is_a_protocol_error():
    with pytest.raises(ProtocolError) as e:
        FrameDecoder(100).feed(b"\x81\x02hi")
    assert e.value.code == 1002


def test_close_frames():
    proto = FrameProtocol(client=True, extensions=[])
    [(opcode, payload)] = FrameDecoder(100).feed(bytes(proto.close(1000, "bye")))
    assert opcode == CLOSE and parse_close(payload) == (1000, "bye")
    frame = close_frame(4001, "é" * 100)
    assert len(frame) <= 127 and frame[:2] == b"\x88" + bytes([len(frame) - 2])
    frame[4:].decode()  # never cuts a character in half
