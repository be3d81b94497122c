"""Cluster figures with the shared yardstick (exoload.js, floor_relay.py from /work/shared/bench).

A message that crosses brokers against one that stays local, and the total
throughput of 1, 2 and 3 clustered brokers on one host, in exoload.js's own
scenarios and JSON, with the floor relay measured in the same series as the
unit (figures are read as ratios to it).

exoload.js connects every client to one URL; a crossing message needs its
sender on one broker and its receiver on another. bench/exoload_split.patch
adds that to a copy, and nothing else: `--receiver-url URL` (receivers connect
there, senders to --url; the registration wait then asks both brokers'
/config.json for the instances counted over the whole cluster) and
`--cpu-pids P,P,..` (the CPU read over the window is the sum of these
processes: every broker and Valkey). The copy is made at run time in
bench/.work/ (git-ignored): the shared files are copied there, `npm ci`
installs the pinned `ws`, and `patch` writes exoload_split.js, so the patch
fails loudly if the shared exoload.js changes.

    .venv/bin/python bench/cluster_yardstick.py [--reps 3] [--seconds 8] [--series paths totals]

Series (every run starts fresh servers: a new valkey-server with
--appendonly yes --appendfsync always in a temp dir, new brokers):
  paths   rpc1 (-P 1 -C 1 -K 1), rpc16 (-P 2 -C 2 -K 16) and throughput
          (-P 4 -C 4 -W 32), the scenarios of run_anchors.sh, on:
            relay   floor_relay.py
            single  exocom serve without --cluster
            local   brokers a and b clustered; senders and receivers on a
            cross   brokers a and b clustered; senders on a, receivers on b
          Every server process (brokers, Valkey) pinned to CPU 0, the load
          generator to CPU 1, as run_anchors.sh pins them.
  totals  throughput with the relay, with exocom without --cluster, and with
          N = 1, 2, 3 clustered brokers: one exoload.js per broker, each
          running the whole throughput scenario (4 senders, 4 receivers)
          against its own broker only, so every broker has senders and
          receivers and the traffic stays local; all at once. Nothing pinned
          (brokers, Valkey and the N load generators share both CPUs).
          Total msgs/s is the sum over the load generators; CPU per delivery
          is the servers' CPU (the mean of what the N overlapping windows
          read) over the total deliveries.

Before the load, each run reads the servers' CPU for 3 s with no client
connected (idle_cpu_pct: the fixed cost of presence renewals and blocking
stream reads). Each run holds /tmp/exocom-bench.lock (flock) while its servers are up, and
records load1 (/proc/loadavg) before and after. One JSON line per run (the
exoload output plus broker, label, rep, load1) goes to bench/results/
cluster-yardstick-STAMP.jsonl; the end prints the shared summarize.py's
medians with --base relay.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from cluster_bench import Processes, cpu_seconds, free_port, start_cluster

BENCH = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("SHARED", "/work/shared/bench"))
WORK = BENCH / ".work"
SPLIT = WORK / "exoload_split.js"
LOCK = "/tmp/exocom-bench.lock"
SCENARIOS = {
    "rpc1": ["--scenario", "rpc", "-P", "1", "-C", "1", "-K", "1"],
    "rpc16": ["--scenario", "rpc", "-P", "2", "-C", "2", "-K", "16"],
    "throughput": ["--scenario", "throughput", "-P", "4", "-C", "4", "-W", "32"],
}
SERVERS_CPU, LOADGEN_CPU = {0}, {1}
IDLE_S = 3.0


def prepare() -> str:
    """bench/.work: the shared tools, `npm ci`, exoload_split.js; returns the service data (routes)."""
    WORK.mkdir(exist_ok=True)
    for name in ("exoload.js", "floor_relay.py", "summarize.py", "package.json", "package-lock.json"):
        shutil.copyfile(SHARED / name, WORK / name)
    if not (WORK / "node_modules" / "ws").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=WORK, check=True)
    SPLIT.unlink(missing_ok=True)
    subprocess.run(["patch", "--quiet", f"--output={SPLIT}", str(WORK / "exoload.js"),
                    str(BENCH / "exoload_split.patch")], check=True)
    # throughput and rpc have the same routes: web sends ping, users reply pong
    return subprocess.run(["node", str(SPLIT), "--print-service-data", "--scenario", "throughput"],
                          check=True, capture_output=True, text=True).stdout.strip()


@contextmanager
def cpus(mask: set[int] | None):
    """Processes started inside inherit this CPU affinity (None: unchanged)."""
    if mask is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, mask)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/services"


@contextmanager
def servers(kind: str, work: Path, n: int, routes: str, mask: set[int] | None):
    """Yields (broker URLs, PIDs of every server process) for relay, single, or n clustered brokers."""
    with cpus(mask):
        if kind in ("relay", "single"):
            procs, port = Processes(work), free_port()
            args = ([sys.executable, str(WORK / "floor_relay.py")] if kind == "relay" else
                    [sys.executable, "-m", "exocom", "serve", "--host", "127.0.0.1", "--log-format", "json",
                     "--state-dir", str(work / "state")])
            proc = procs.start([*args, "--port", str(port)], kind, port)  # routes from SERVICE_DATA
            urls, pids = [url(port)], [proc.pid]
        else:
            procs, valkey, brokers = start_cluster(work, ["a", "b", "c"][:n], "always", json.loads(routes))
            urls = [url(port) for port, _ in brokers.values()]
            pids = [proc.pid for _, proc in brokers.values()] + [valkey.pid]
    try:
        yield urls, pids, idle_cpu_pct(pids)
    finally:
        procs.stop()


def idle_cpu_pct(pids: list[int]) -> float:
    """The servers' CPU with no client connected (presence renewals, blocking reads), over IDLE_S after 1 s."""
    time.sleep(1.0)
    before = sum(cpu_seconds(p) for p in pids)
    time.sleep(IDLE_S)
    return round((sum(cpu_seconds(p) for p in pids) - before) / IDLE_S * 100, 1)


def exoload(args: list[str], mask: set[int] | None, seconds: float, warmup: float) -> subprocess.Popen:
    with cpus(mask):
        return subprocess.Popen(["node", str(SPLIT), *args, "--seconds", str(seconds), "--warmup", str(warmup)],
                                stdout=subprocess.PIPE, text=True, cwd=WORK)


def result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    return json.loads(out) if proc.returncode == 0 and out.strip() else {"failed": True}


@contextmanager
def valkey_share(kind: str, pids: list[int], into: dict):
    """Valkey's share of the servers' CPU over the whole load run (connect, warm-up, window, drain)."""
    before = [cpu_seconds(p) for p in pids]
    yield
    spent = [cpu_seconds(p) - b for p, b in zip(pids, before)]
    if kind == "cluster" and sum(spent):
        into["valkey_cpu_share"] = round(spent[-1] / sum(spent), 3)


def paths_run(broker: str, label: str, work: Path, routes: str, seconds: float, warmup: float) -> dict:
    kind = broker if broker in ("relay", "single") else "cluster"
    with servers(kind, work, 2, routes, SERVERS_CPU) as (urls, pids, idle):
        if kind == "cluster":
            receiver = urls[0] if broker == "local" else urls[1]
            args = ["--url", urls[0], "--receiver-url", receiver, "--cpu-pids", ",".join(map(str, pids))]
        else:
            args = ["--url", urls[0], "--pid", str(pids[0])]
        out = {"idle_cpu_pct": idle}
        with valkey_share(kind, pids, out):
            out.update(result(exoload([*SCENARIOS[label], *args], LOADGEN_CPU, seconds, warmup)))
        return out


def totals_run(broker: str, work: Path, routes: str, seconds: float, warmup: float) -> dict:
    kind, n = (broker, 1) if broker in ("relay", "single") else ("cluster", int(broker[1:]))
    with servers(kind, work, n, routes, None) as (urls, pids, idle):
        share = {}
        with valkey_share(kind, pids, share):
            procs = [exoload([*SCENARIOS["throughput"], "--url", u, "--cpu-pids", ",".join(map(str, pids))],
                             None, seconds, warmup) for u in urls]
            parts = [result(p) for p in procs]
    if any(p.get("failed") for p in parts):
        return {"failed": True, "parts": parts}
    deliveries = sum(p["deliveries_per_s"] for p in parts)
    cpu_pct = sum(p["broker_cpu_pct"] for p in parts) / len(parts)
    return {"scenario": "throughput", "urls": urls, "idle_cpu_pct": idle, **share, "load_generators": len(parts),
            "msgs_per_s": sum(p["msgs_per_s"] for p in parts), "deliveries_per_s": deliveries,
            "broker_cpu_pct": round(cpu_pct, 1),
            "broker_cpu_us_per_delivery": round(cpu_pct / 100 * 1e6 / deliveries, 2) if deliveries else None,
            "lost": sum(p["lost"] for p in parts), "loadgen_cpu_pct": round(sum(p["loadgen_cpu_pct"] for p in parts), 1),
            "registration_confirmed": all(p["registration_confirmed"] for p in parts),
            "ws_closed_unexpectedly": sum(p["ws_closed_unexpectedly"] for p in parts), "parts": parts}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--series", nargs="*", default=["paths", "totals"], choices=["paths", "totals"])
    parser.add_argument("--labels", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS),
                        help="paths series: which scenarios")
    parser.add_argument("--out", type=Path,
                        default=BENCH / "results" / f"cluster-yardstick-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    args = parser.parse_args()
    routes = prepare()
    os.environ["SERVICE_DATA"] = routes  # the relay and exocom without --cluster read it; brokers get --config
    args.out.parent.mkdir(exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="exocom-yardstick."))
    print(f"# {time.strftime('%Y-%m-%dT%H:%M:%S%z')} nproc={os.cpu_count()} {sys.version.split()[0]} "
          f"node {subprocess.run(['node', '--version'], capture_output=True, text=True).stdout.strip()} "
          f"load {Path('/proc/loadavg').read_text().strip()} -> {args.out}", file=sys.stderr, flush=True)
    runs = []
    for rep in range(1, args.reps + 1):
        for series in args.series:
            labels = args.labels if series == "paths" else ["total"]
            for label in labels:
                order = ["relay", "single", "local", "cross"] if series == "paths" else ["relay", "single", "n1", "n2", "n3"]
                runs += [(series, label, broker, rep) for broker in (order if rep % 2 else order[::-1])]
    try:
        for i, (series, label, broker, rep) in enumerate(runs):
            work = base / f"run{i}"
            work.mkdir()
            with open(LOCK, "a") as lock:
                waited = time.monotonic()
                fcntl.flock(lock, fcntl.LOCK_EX)
                waited = time.monotonic() - waited
                before = load1()
                res = (paths_run(broker, label, work, routes, args.seconds, args.warmup) if series == "paths" else
                       totals_run(broker, work, routes, args.seconds, args.warmup))
                after = load1()
            record = {"broker": broker, "label": label, "rep": rep, "series": series, "load1_before": before,
                      "load1_after": after, "lock_wait_s": round(waited, 1), **res}
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            shown = {k: record.get(k) for k in ("idle_cpu_pct", "valkey_cpu_share", "msgs_per_s", "req_per_s", "p50_us", "p99_us",
                                                "broker_cpu_us_per_delivery", "lost") if record.get(k) is not None}
            print(f"{time.strftime('%H:%M:%S')} {series} {label} {broker} rep{rep} load1 {before}->{after}: "
                  f"{json.dumps(shown)}{' FAILED' if res.get('failed') else ''}", file=sys.stderr, flush=True)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    subprocess.run([sys.executable, str(WORK / "summarize.py"), str(args.out), "--base", "relay"])


if __name__ == "__main__":
    main()
