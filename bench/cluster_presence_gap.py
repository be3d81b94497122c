"""How long after a service registers on one broker of a cluster another broker
sees it (and routes to it): two real `exocom serve --cluster` processes and a
real valkey-server, 10 registrations, timed from the moment the service's
registration completed to the moment the other broker's /config.json lists it.

    .venv/bin/python bench/cluster_presence_gap.py

Run from a checkout with the test extra installed (it uses the tests' process
helpers). The figure includes the polling of /config.json (every 2 ms).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fleet import todos  # noqa: E402
from test_cluster_e2e import cluster_of, holders  # noqa: E402
from valkey_server import Valkey, running  # noqa: E402


async def main(rounds: int = 10) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="exocom-gap-"))
    gaps = []
    with running(Valkey(tmp / "valkey")) as valkey, cluster_of(tmp, valkey, ("a", "c")) as (a, c):
        for _ in range(rounds):
            async with todos(c.url, "1.0.0", []):
                registered = time.perf_counter()
                while "c" not in holders(a, "todos"):
                    await trio.sleep(0.002)
                gaps.append(time.perf_counter() - registered)
            while "c" in holders(a, "todos"):
                await trio.sleep(0.01)
    print(f"seen by the other broker after registration: median {statistics.median(gaps) * 1000:.1f} ms, "
          f"max {max(gaps) * 1000:.1f} ms over {rounds}: {[round(g * 1000) for g in gaps]}")


if __name__ == "__main__":
    trio.run(main)
