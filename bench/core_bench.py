"""The core's share of the per-message cost, without sockets: one sender, a
receiving role with four instances, N messages through
`Broker.frame_received` (decode, route, encode). Prints microseconds per
message. Deterministic enough to run under `valgrind --tool=callgrind`
(instructions, not seconds) when the machine is busy.

    .venv/bin/python bench/core_bench.py [N]
"""

import sys
import time

import orjson

try:
    from exocom.core.broker import Broker
    from exocom.core.config import parse_service_data
except ImportError:  # the flat layout before 2026-12-01, to compare against
    from exocom.broker import Broker
    from exocom.config import parse_service_data

CONFIG = {"sender": {"sends": ["ping"]}, "receiver": {"receives": ["ping"]}}


def main(n: int) -> None:
    broker = Broker(parse_service_data(CONFIG, "bench"))
    broker.connected(1, "bench")
    broker.frame_received(1, orjson.dumps({"name": "exocom.register-service", "sender": "sender"}), 0.0)
    for conn in range(2, 6):
        broker.connected(conn, "bench")
        broker.frame_received(conn, orjson.dumps({"name": "exocom.register-service", "sender": "receiver"}), 0.0)
    frames = [orjson.dumps({"name": "ping", "sender": "sender", "id": f"m{i}", "activityId": f"a{i}",
                            "payload": {"n": i, "text": "x" * 60}}) for i in range(n)]
    started = time.perf_counter()
    delivered = 0
    for i, data in enumerate(frames):
        delivered += len(broker.frame_received(1, data, 1.0 + i * 1e-6))
    elapsed = time.perf_counter() - started
    assert delivered == n, delivered
    print(f"{n} messages, {elapsed / n * 1e6:.2f} us per message in the core")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
