"""What one idle registered connection costs the broker, and where each byte goes.

    .venv/bin/python bench/connection_memory.py [N]          # default 2000
    .venv/bin/python bench/connection_memory.py --checkout /other/checkout [N]   # another build's exocom

Runs the broker's server in this process (its defaults, no ledger) with
tracemalloc on, opens N WebSocket connections from a child process that
registers each under its own role and then idles, and compares the Python
heap before and after: bytes per connection, by the line that allocated them.
Then the same again without tracemalloc, for the RSS per connection that the
shared yardstick's conns2000 scenario reports. Prints figures; it is not a
test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc

import trio

if len(sys.argv) > 2 and sys.argv[1] == "--checkout":
    # The editable install's import hook would win over sys.path: drop it, then put the checkout first.
    sys.meta_path = [finder for finder in sys.meta_path if "editable" not in repr(finder).lower()]
    sys.path.insert(0, sys.argv[2])
    del sys.argv[1:3]

from exocom.core.broker import Broker  # noqa: E402 (after --checkout)
from exocom.core.config import parse_service_data  # noqa: E402
from exocom.logs import configure  # noqa: E402
from exocom.server.listener import Server  # noqa: E402

# The child: N raw sockets, a handshake and a register frame each, then idle until stdin closes.
CLIENT = textwrap.dedent("""
    import json, os, socket, sys
    port, n = int(sys.argv[1]), int(sys.argv[2])
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /services HTTP/1.1\\r\\nHost: x\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\nSec-WebSocket-Version: 13\\r\\n\\r\\n")
        head = b""
        while b"\\r\\n\\r\\n" not in head:
            head += s.recv(4096)
        payload = json.dumps({"name": "exocom.register-service", "sender": f"role{i % 10}", "id": str(i)}).encode()
        mask = os.urandom(4)
        s.sendall(bytes((0x81, 0x80 | len(payload))) + mask + bytes(b ^ mask[j % 4] for j, b in enumerate(payload)))
        socks.append(s)
    print("ready", flush=True)
    sys.stdin.read()
""")


# Where an allocation's file says what it is part of.
GROUPS = [
    ("h11/", "h11: the HTTP parser (connection state, buffers, the request and its headers)"),
    ("wsproto/", "wsproto: the WebSocket handshake"),
    ("trio/_core/_io_epoll", "trio: the reader's wait for readability (epoll waiters)"),
    ("trio/", "trio: tasks, nursery, cancel scopes, events"),
    ("<attrs generated methods trio", "trio: tasks, nursery, cancel scopes, events"),
    ("exocom/server/", "exocom shell: coroutine frames of the connection's tasks, Peer"),
    ("exocom/core/", "exocom core: the registered instance, registry and stats entries"),
    ("exocom/", "exocom, other"),
]


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def measure(n: int, traced: bool) -> None:
    routes = {f"role{i}": {"receives": ["ping"], "sends": ["pong"]} for i in range(10)}
    broker = Broker(parse_service_data(routes, "bench"))
    server = Server(broker, None, handle_signals=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, "127.0.0.1", 0)
        await trio.sleep(0.2)
        if traced:
            tracemalloc.start(1)
        before = tracemalloc.take_snapshot() if traced else None
        rss_before = rss_kb()
        child = await trio.lowlevel.open_process(
            [sys.executable, "-c", CLIENT, str(server.port), str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        with trio.fail_after(120):
            while len(broker.registry.by_conn) < n:
                await trio.sleep(0.1)
            await trio.sleep(0.5)
        after = tracemalloc.take_snapshot() if traced else None
        rss_after = rss_kb()
        if traced:
            stats = after.compare_to(before, "lineno")
            total = sum(s.size_diff for s in stats)
            print(f"\n== Python heap per idle registered connection (tracemalloc, {n} connections): "
                  f"{total / n / 1024:.2f} KB")
            groups: dict[str, int] = {}
            for stat in stats:
                name = stat.traceback[0].filename
                group = next((label for part, label in GROUPS if part in name), "other (stdlib: sockets, dicts, ...)")
                groups[group] = groups.get(group, 0) + stat.size_diff
            for group, size in sorted(groups.items(), key=lambda item: -item[1]):
                print(f"  {size / n:8.0f} B  {group}")
            print("  by the line that allocated them:")
            for stat in stats[:22]:
                if stat.size_diff / n < 16:
                    break
                frame = stat.traceback[0]
                where = f"{frame.filename.split('site-packages/')[-1].split('/work/main/')[-1]}:{frame.lineno}"
                print(f"  {stat.size_diff / n:8.0f} B  {stat.count_diff / n:5.1f} blocks  {where}")
            tracemalloc.stop()
        else:
            print(f"\n== RSS per idle registered connection (no tracemalloc, {n} connections): "
                  f"{(rss_after - rss_before) / n:.2f} KB ({rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MB)")
        await child.stdin.aclose()
        await child.wait()
        nursery.cancel_scope.cancel()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    configure("json", "warning")  # as in a benchmark run, nothing is logged per connection at info
    import exocom

    print(f"python {sys.version.split()[0]}, pid {os.getpid()}, exocom from {os.path.dirname(exocom.__file__)}")
    trio.run(measure, n, False)  # first: a fresh process's RSS, not one with the freed heap of a run before
    trio.run(measure, n, True)


if __name__ == "__main__":
    main()
