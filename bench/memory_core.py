"""Where the broker core's memory goes over a long run, without sockets:
`Broker.frame_received` fed RATE messages per simulated second (one sender,
one receiving role with four instances), `Broker.tick` once per simulated
second, under tracemalloc. Prints, every 10 s, the traced memory and the
entries the activity and message-id memories hold; then the traced memory at
60 s and at the end, and the 12 lines whose allocations grew most between the
two snapshots (a leak shows there). The cap is scaled down with the rate
(default 5,000 msgs/s with an 11,000 cap: a generation fills in 2.2 s, as
100,000 does at about 45,000 msgs/s on the wire; a cap that divides 60 s of
messages would line the rotations up with the clock's).

    .venv/bin/python bench/memory_core.py [--mode fresh|pool|none] [--seconds 180] [--rate 5000]
"""

from __future__ import annotations

import argparse
import tracemalloc

import exocom
from exocom.core.broker import Broker
from exocom.core.config import parse_service_data

ROUTES = {"web": {"sends": ["ping"]}, "users": {"receives": ["ping"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("fresh", "pool", "none"), default="fresh")
    p.add_argument("--seconds", type=int, default=180)
    p.add_argument("--rate", type=int, default=5000, help="messages per simulated second")
    p.add_argument("--max-activities", type=int, default=11_000)
    p.add_argument("--pool", type=int, default=1000)
    p.add_argument("--frames", type=int, default=10, help="tracemalloc frames per allocation")
    args = p.parse_args()

    now = 1000.0
    broker = Broker(parse_service_data(ROUTES, "bench"), max_activities=args.max_activities, now=now)
    for conn, role in enumerate(["web"] + ["users"] * 4, start=1):
        broker.connected(conn, "bench", now)
        broker.frame_received(conn, b'{"name":"exocom.register-service","sender":"%s"}' % role.encode(), now)
    pad = "x" * 60
    if args.mode == "fresh":
        def activity(n: int) -> str:
            return f',"activityId":"a{n}"'
    elif args.mode == "pool":
        def activity(n: int) -> str:
            return f',"activityId":"p{n % args.pool}"'
    else:
        def activity(n: int) -> str:
            return ""

    print(f"exocom from {exocom.__path__[0]}; {args.mode} activity ids, {args.rate} msgs/s, "
          f"max_activities {args.max_activities}")
    tracemalloc.start(args.frames)
    n = 0
    ref = min(60, args.seconds)
    at_ref = None
    traced = {}
    print(f"{'t s':>5} {'traced MB':>10} {'activities':>11} {'message ids':>12}")
    for second in range(1, args.seconds + 1):
        for i in range(args.rate):
            n += 1
            t = now + (second - 1) + i / args.rate
            broker.frame_received(1, f'{{"name":"ping","id":"m{n}"{activity(n)},"payload":{{"s":1,"pad":"{pad}"}}}}'
                                  .encode(), t)
        broker.tick(now + second)
        traced[second] = tracemalloc.get_traced_memory()[0]
        if second % 10 == 0:
            print(f"{second:5d} {traced[second] / 2**20:10.1f} {len(broker.activities):11d} "
                  f"{len(broker.commands):12d}", flush=True)
        if second == ref:
            at_ref = tracemalloc.take_snapshot()
    end = tracemalloc.take_snapshot()
    after = [traced[s] for s in traced if s >= ref]
    print(f"\ntraced {traced[ref] / 2**20:.1f} MB at {ref} s, {traced[args.seconds] / 2**20:.1f} MB at {args.seconds} s "
          f"(ratio {traced[args.seconds] / traced[ref]:.3f}); from {ref} s on: min {min(after) / 2**20:.1f}, "
          f"max {max(after) / 2**20:.1f} MB")
    print(f"\ntop growth from {ref} s to {args.seconds} s (by line):")
    for stat in end.compare_to(at_ref, "lineno")[:12]:
        print(f"  {stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks  {stat.traceback[0]}")


if __name__ == "__main__":
    main()
