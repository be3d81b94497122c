"""Where the broker's busy time goes, from py-spy's raw (collapsed) stacks.

    .venv/bin/python bench/profile_table.py before.txt after.txt

Each sample is charged to its innermost frame, and frames to a few groups.
Idle time (trio waiting in epoll with nothing to do, the idle worker thread
of the ledger writer) is left out, so the shares are of the time the broker
was busy.
"""

import sys
from collections import Counter

GROUPS = [  # (group, test on "function (file)")
    ("idle: waiting in epoll / idle worker thread", lambda f, p: f in ("get_events", "_work")),
    ("system call: write (in flush, or in trio's send)", lambda f, p: f == "flush"
     or f == "_nonblocking_helper" and "send_all" in p),
    ("system call: read", lambda f, p: f == "receive" or f == "_nonblocking_helper" and "receive_some" in p),
    ("trio: epoll registration (one epoll_ctl per wait)", lambda f, p: f in ("_update_registrations", "_epoll_wait")),
    ("trio: scheduler, task switches, events", lambda f, p: "trio/" in p.split(" ")[0] or "outcome" in p.split(" ")[0]
     or "<attrs" in f or "contextlib" in p.split(" ")[0]),
    ("frame decoding (frames.py)", lambda f, p: "frames.py" in p.split(" ")[0]),
    ("broker core (exocom/core)", lambda f, p: "/core/" in p.split(" ")[0]),
    ("shell: reader, apply, flush logic (listener.py)", lambda f, p: "listener.py" in p.split(" ")[0]),
]


def table(path: str) -> tuple[Counter, int]:
    groups: Counter = Counter()
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        frames = [f for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        leaf = frames[-1]
        function, _, where = leaf.partition(" (")
        function = function.rsplit(".", 1)[-1]  # py-spy writes Class.method
        path_ = where + " " + ";".join(frames[-4:-1])  # the file, and the callers that tell a send from a read
        for name, test in GROUPS:
            if test(function, path_):
                groups[name] += int(n)
                break
        else:
            groups["other"] += int(n)
    busy = sum(v for k, v in groups.items() if not k.startswith("idle"))
    return groups, busy


def main() -> None:
    tables = [table(p) for p in sys.argv[1:]]
    print("| group | " + " | ".join(sys.argv[1:]) + " |")
    print("|---|" + "---:|" * len(tables))
    for name in [g for g, _ in GROUPS if not g.startswith("idle")] + ["other"]:
        print(f"| {name} | " + " | ".join(f"{100 * t[name] / busy:.1f} %" for t, busy in tables) + " |")
    print("| samples while busy | " + " | ".join(str(busy) for _, busy in tables) + " |")


if __name__ == "__main__":
    main()
