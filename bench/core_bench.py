"""The core's share of the per-message cost, without sockets: N messages
through `Broker.frame_received` (decode, route, encode). Prints microseconds
per message. Deterministic enough to run under `valgrind --tool=callgrind`
(instructions, not seconds) when the machine is busy.

    .venv/bin/python bench/core_bench.py [N] [SCENARIO]

Scenarios (the shared load generator's shapes, one sender):
  throughput  one receiving role with four instances (the default)
  fanout4     four receiving roles with one instance each
  declared    throughput, with a rollout declared for a version that is not connected
  ramping     throughput, with the receivers' new version ramping at 50 % (two of the four instances)
  rpc         request/reply: each request (fresh activity) is answered with `responseTo` by one of two
              receivers; the figure is per message (a request and its reply are two)
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

ROLLOUT = {"steps": [50, 100], "interval": 3600, "gates": {"minSamples": 10, "maxErrorRate": 0.5}}
SCENARIOS = {
    "throughput": ({"sender": {"sends": ["ping"]}, "receiver": {"receives": ["ping"]}}, ["receiver"] * 4),
    "fanout4": ({"sender": {"sends": ["ping"]}, **{f"r{i}": {"receives": ["ping"]} for i in range(4)}},
                [f"r{i}" for i in range(4)]),
    "declared": ({"sender": {"sends": ["ping"]}, "receiver": {"receives": ["ping"]},
                  "deploy": {"deploys": "receiver@9.9.9", "rollout": ROLLOUT}}, ["receiver"] * 4),
    "rpc": ({"sender": {"sends": ["ping"], "receives": ["pong"]}, "receiver": {"receives": ["ping"], "sends": ["pong"]}},
            ["receiver"] * 2),
    "ramping": ({"sender": {"sends": ["ping"]}, "receiver": {"receives": ["ping"]},
                 "deploy": {"deploys": "receiver@2.0.0", "rollout": ROLLOUT}}, ["receiver"] * 4),
}


def register(broker: Broker, conn: int, role: str, version: str | None = None) -> list:
    broker.connected(conn, "bench")
    frame = {"name": "exocom.register-service", "sender": role, **({"payload": {"version": version}} if version else {})}
    return broker.frame_received(conn, orjson.dumps(frame), 0.0)


def main(n: int, scenario: str) -> None:
    routes, receivers = SCENARIOS[scenario]
    broker = Broker(parse_service_data(routes, "bench"))
    register(broker, 1, "sender")
    for conn, role in enumerate(receivers, start=2):
        register(broker, conn, role, ("2.0.0" if conn % 2 else "1.0.0") if scenario == "ramping" else None)
    if scenario == "ramping":  # the deployment script answers the offline step: 2.0.0 ramps at 50 %
        actions = register(broker, 99, "deploy")
        while actions:
            action = actions.pop(0)
            if type(action).__name__ == "WriteRecord":
                actions += broker.record_written(action.record, 0.0)
            elif type(action).__name__ == "Deliver" and b"offline-start" in action.data:
                start = orjson.loads(action.data)
                actions += broker.frame_received(99, orjson.dumps(
                    {"name": start["name"].replace("-start", "-done"), "activityId": start["activityId"]}), 0.0)
        assert [d["state"] for d in broker.deployments_json()] == ["ramping"]
    frames = [orjson.dumps({"name": "ping", "sender": "sender", "id": f"m{i}", "activityId": f"a{i}",
                            "payload": {"n": i, "text": "x" * 60}}) for i in range(n)]
    per_message = len(set(receivers))
    if scenario == "rpc":
        return rpc(broker, frames)
    started = time.perf_counter()
    delivered = 0
    for i, data in enumerate(frames):
        delivered += len(broker.frame_received(1, data, 1.0 + i * 1e-6))
    elapsed = time.perf_counter() - started
    assert delivered == n * per_message, delivered
    print(f"{scenario}: {n} messages, {elapsed / n * 1e6:.2f} us per message in the core")


def rpc(broker: Broker, requests: list[bytes]) -> None:
    n = len(requests)
    started = time.perf_counter()
    for i, data in enumerate(requests):
        now = 1.0 + i * 1e-6
        (deliver,) = broker.frame_received(1, data, now)
        # The receiver answers at once, as exoload's rpc scenario does.
        (reply,) = broker.frame_received(deliver.conn, b'{"name":"pong","sender":"receiver","id":"r%d","activityId":"a%d",'
                                         b'"responseTo":"m%d","payload":{"ok":true}}' % (i, i, i), now)
        assert reply.conn == 1
    elapsed = time.perf_counter() - started
    print(f"rpc: {n} round trips, {elapsed / (2 * n) * 1e6:.2f} us per message in the core")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000, sys.argv[2] if len(sys.argv) > 2 else "throughput")
