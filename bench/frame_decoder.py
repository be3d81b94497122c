"""Micro-benchmark of FrameDecoder.feed: the per-message cost of frame parsing.

    .venv/bin/python bench/frame_decoder.py

Prints nanoseconds per message for typical client frames (masked, as a
client sends them). A figure, not a test: compare before and after a change
to exocom/server/frames.py on the same machine.
"""

from __future__ import annotations

import json
import timeit

from wsproto.frame_protocol import FrameProtocol, Opcode

from exocom.server.frames import FrameDecoder

MESSAGE = {"name": "users.create", "sender": "web", "id": "6f1c0c2e-9d57-4d5e-a1f4-7e0a3c4b2d11",
           "activityId": "0b6e7c1a-3f7e-4a52-9a3e-5d0c1b2a3f44", "payload": {"name": "Jean", "age": 42}}


def client_frames(text: str, count: int, fragments: int = 1) -> bytes:
    proto = FrameProtocol(client=True, extensions=[])
    out = bytearray()
    step = -(-len(text.encode()) // fragments)
    for _ in range(count):
        data = text.encode()
        if fragments == 1:
            out += proto.send_data(text)
            continue
        pieces = [data[i:i + step] for i in range(0, len(data), step)]
        for n, piece in enumerate(pieces):
            out += proto._serialize_frame(Opcode.TEXT if n == 0 else Opcode.CONTINUATION, piece, fin=n == len(pieces) - 1)
    return bytes(out)


CASES = {
    "ASCII JSON, 1 frame per read": (json.dumps(MESSAGE), 1, 1),
    "ASCII JSON, 50 frames per read": (json.dumps(MESSAGE), 50, 1),
    "non-ASCII JSON, 1 frame per read": (json.dumps({**MESSAGE, "payload": {"name": "Jérôme Müller"}},
                                                    ensure_ascii=False), 1, 1),
    "64 KiB ASCII JSON, 1 frame per read": (json.dumps({**MESSAGE, "payload": "x" * 65000}), 1, 1),
    "ASCII JSON in 4 fragments": (json.dumps(MESSAGE), 1, 4),
}


def main() -> None:
    for name, (text, count, fragments) in CASES.items():
        wire = client_frames(text, count, fragments)
        decoder = FrameDecoder(1 << 20)
        assert len(decoder.feed(wire)) == count
        runs = max(1, 200_000 // count // (1 + len(text) // 4096))
        best = min(timeit.repeat(lambda: decoder.feed(wire), number=runs, repeat=5))
        print(f"{name:40s} {best / runs / count * 1e9:9.0f} ns/message")


if __name__ == "__main__":
    main()
