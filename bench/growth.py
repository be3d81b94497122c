"""How the broker's cost per message grows with the number of connected
instances and of configured roles (issue 11, item 3).

For every point of the grid it starts a real `exocom serve` (pinned to CPU 0)
with a generated routing file of R roles -- "web" and "users", which trade
ping/pong, and R-2 idle roles i0..i{R-3}, each of which sends one message
name and receives the next one's, so that the routing table has R roles and
R message names -- connects N idle registered instances spread round robin
over the idle roles, then drives request/reply between one "web" and one
"users" instance at a fixed rate (open loop, `bench/growth_load.js` pinned to
CPU 1). It reports the broker's CPU time per delivery over the window
(utime+stime from /proc/PID/stat; 2 deliveries per request), the reply latency
the load generator sees (p50/p99) and the broker's RSS.

    .venv/bin/python bench/growth.py                      # the whole grid, 3 reps
    .venv/bin/python bench/growth.py --reps 1 --axis instances
    .venv/bin/python bench/growth.py --point 10000x10     # one point: N x R
    .venv/bin/python bench/growth.py --table bench/results/growth-*.jsonl --plot bench/growth.png

Grid: instances 100 / 1,000 / 10,000 at R = 10, and roles 10 / 100 / 1,000 at
N = 1,000 (so that every role has an instance at R = 1,000); the point
N = 1,000, R = 10 is on both axes. The whole series (about two minutes per
repetition) holds the shared benchmark lock
(/tmp/exocom-bench.lock, flock(2), the lock `flock(1)` takes) so that runs of
different people on this machine never overlap. Raw results: one JSON line
per run in bench/results/growth-<stamp>.jsonl (git-ignored).

Needs node and `ws` in bench/.work/node_modules (bench/run.sh installs it).
Benchmarks are not tests: this prints figures and never fails a build.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
EXOCOM = ROOT / ".venv" / "bin" / "exocom"
NODE_MODULES = BENCH / ".work" / "node_modules"
INSTANCES_AXIS = [(100, 10), (1000, 10), (10000, 10)]
ROLES_AXIS = [(1000, 10), (1000, 100), (1000, 1000)]


def routing(roles: int) -> dict:
    """R roles: web and users trade ping/pong; every idle role sends one name and receives the next one's."""
    idle = roles - 2
    routes = {"web": {"sends": ["ping"], "receives": ["pong"]}, "users": {"receives": ["ping"], "sends": ["pong"]}}
    for k in range(idle):
        routes[f"i{k}"] = {"sends": [f"m{k}"], "receives": [f"m{(k + 1) % idle}"]}
    return routes


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def bench_lock(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as f:
        waited = time.monotonic()
        fcntl.flock(f, fcntl.LOCK_EX)
        waited = time.monotonic() - waited
        if waited > 1:
            print(f"# waited {waited:.0f} s for {path}", file=sys.stderr)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# Loaded by the broker through PYTHONPATH (bench only, the broker's code is unchanged): every garbage
# collection as [wall time, generation, seconds, objects collected], written to $GROWTH_GC_LOG at exit.
GC_HOOK = """
import atexit, gc, json, os, time
_log, _started = [], [0.0]
def _hook(phase, info):
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        _log.append([time.time(), info["generation"], time.perf_counter() - _started[0], info["collected"]])
gc.callbacks.append(_hook)
atexit.register(lambda: json.dump(_log, open(os.environ["GROWTH_GC_LOG"], "w")))
"""


def gc_in_window(path: Path, window: list[float]) -> dict:
    """Collections per generation within the load generator's window: count and milliseconds in total and at most."""
    out = {}
    with contextlib.suppress(OSError, ValueError):
        for t, generation, seconds, _ in json.loads(path.read_text()):
            if window[0] <= t <= window[1]:
                g = out.setdefault(f"gen{generation}", {"count": 0, "ms": 0.0, "max_ms": 0.0})
                g["count"] += 1
                g["ms"] = round(g["ms"] + seconds * 1e3, 3)
                g["max_ms"] = round(max(g["max_ms"], seconds * 1e3), 3)
    return out


def start_broker(config: Path, state_dir: Path, broker_cpu: str) -> tuple[subprocess.Popen, int]:
    """`exocom serve --port 0` pinned to `broker_cpu`; the port it got, from its 'broker listening' log line."""
    hook = state_dir.parent / "gc_hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(GC_HOOK)
    env = {**os.environ, "PYTHONPATH": str(hook), "GROWTH_GC_LOG": str(state_dir.parent / "gc.json")}
    proc = subprocess.Popen(
        ["taskset", "-c", broker_cpu, str(EXOCOM), "serve", "--config", str(config), "--state-dir", str(state_dir),
         "--host", "127.0.0.1", "--port", "0", "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, preexec_fn=raise_fd_limit, text=True, env=env)
    deadline = time.monotonic() + 30
    for line in proc.stdout:
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "broker listening":
                port = event["port"]
                break
        if time.monotonic() > deadline:
            break
    else:
        proc.kill()
        raise RuntimeError("the broker did not start")
    # From now on its log goes nowhere (a pipe nobody reads would fill and block it).
    drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)
    proc.stdout.close()
    proc.drain = drain
    return proc, port


def attach(pid: int, n: int, r: int, args) -> list[subprocess.Popen]:
    """Profilers that watch the broker for the warm-up and the window, once the load has started."""
    seconds = str(int(args.warmup + args.seconds))
    out = []
    if args.profile:
        out.append(subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "py-spy"), "record", "--native", "--rate", "250", "--duration", seconds, "--output",
             args.profile.replace("{N}", str(n)).replace("{R}", str(r)), "--pid", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    if args.strace:
        out.append(subprocess.Popen(
            ["timeout", "-s", "INT", seconds, "strace", "-c", "-f", "-o",
             args.strace.replace("{N}", str(n)).replace("{R}", str(r)), "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return out


def run_point(n: int, r: int, args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="exocom-growth."))
    try:
        config = work / "routes.json"
        config.write_text(json.dumps(routing(r)))
        broker, port = start_broker(config, work / "state", args.broker_cpu)
        try:
            cmd = ["taskset", "-c", args.loadgen_cpu, "node", str(BENCH / "growth_load.js"),
                   "--url", f"ws://127.0.0.1:{port}/services", "--idle-roles", str(r - 2), "--instances", str(n),
                   "--users", str(args.users), "--rate", str(args.rate), "--seconds", str(args.seconds),
                   "--warmup", str(args.warmup), "--pid", str(broker.pid)]
            env = {**os.environ, "NODE_PATH": str(NODE_MODULES)}
            load = subprocess.Popen(cmd, env=env, preexec_fn=raise_fd_limit, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            stderr = []
            for line in load.stderr:  # connecting; then the load starts
                stderr.append(line)
                if line.startswith("# load started"):
                    attached = attach(broker.pid, n, r, args)
                    break
            else:
                attached = []
            stdout, rest = load.communicate(timeout=600)
            stderr.append(rest)
            for proc in attached:
                proc.wait(timeout=60)
        finally:
            broker.terminate()
            try:
                broker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait()
            broker.drain.wait()
        if load.returncode != 0 or not stdout.strip():
            return {"instances": n, "roles": r, "failed": True, "stderr": "".join(stderr)[-2000:]}
        result = json.loads(stdout.strip().splitlines()[-1])
        result["roles"] = r
        result["gc"] = gc_in_window(work / "gc.json", result["window_wall"])
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def git_commit() -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    return "?"


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "?")
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "commit": git_commit(),
            "load1": os.getloadavg()[0]}


# ------------------------------------------------------------------- report

def load(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        for line in open(path):
            row = json.loads(line)
            if "machine" not in row and not row.get("failed"):
                rows.append({**row, "series": path})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Median [min-max] per (N, R), in grid order."""
    points: dict[tuple[int, int], list[dict]] = {}
    for row in rows:
        points.setdefault((row["instances"], row["roles"]), []).append(row)
    out = []
    for (n, r), runs in sorted(points.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        def stat(key):
            values = [run[key] for run in runs if run.get(key) is not None]
            return (statistics.median(values), min(values), max(values)) if values else (None, None, None)
        out.append({"instances": n, "roles": r, "reps": len(runs), "cpu": stat("broker_cpu_us_per_delivery"),
                    "p50": stat("p50_us"), "p99": stat("p99_us"), "rss": stat("broker_rss_kb"),
                    "rss_idle": stat("broker_rss_idle_kb"), "req": stat("req_per_s"), "load1": stat("load1"),
                    "lost": sum(run.get("lost", 0) for run in runs)})
    return out


def paired(rows: list[dict], base: tuple[int, int] = (100, 10)) -> str:
    """CPU per delivery of each point over the base point's in the same repetition of the same series (run
    minutes apart, so under a similar load): median [min-max] of those ratios."""
    base_of = {(row["series"], row["rep"]): row["broker_cpu_us_per_delivery"] for row in rows
               if (row["instances"], row["roles"]) == base}
    ratios: dict[tuple[int, int], list[float]] = {}
    for row in rows:
        b = base_of.get((row["series"], row["rep"]))
        if b and (row["instances"], row["roles"]) != base:
            ratios.setdefault((row["instances"], row["roles"]), []).append(row["broker_cpu_us_per_delivery"] / b)
    lines = [f"| N | R | CPU per delivery / the same repetition's N = {base[0]:,}, R = {base[1]:,} | pairs |",
             "|---:|---:|---|---:|"]
    for (n, r), values in sorted(ratios.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"| {n:,} | {r:,} | {statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}] "
                     f"| {len(values)} |")
    return "\n".join(lines)


def table(summary: list[dict]) -> str:
    def fmt(s, scale=1.0, digits=0):
        med, lo, hi = s
        if med is None:
            return "–"
        f = f"{{:,.{digits}f}}"
        return f"{f.format(med * scale)} [{f.format(lo * scale)}–{f.format(hi * scale)}]"
    lines = ["| instances N | roles R | reps | req/s | broker CPU µs per delivery | p50 µs | p99 µs | RSS MB (idle → end) "
             "| lost | load1 after the runs |",
             "|---:|---:|---:|---:|---|---|---|---|---:|---|"]
    for p in summary:
        lines.append(f"| {p['instances']:,} | {p['roles']:,} | {p['reps']} | {p['req'][0]:,.0f} | {fmt(p['cpu'], digits=1)} "
                     f"| {fmt(p['p50'])} | {fmt(p['p99'])} | {p['rss_idle'][0] / 1024:,.0f} → {p['rss'][0] / 1024:,.0f} "
                     f"| {p['lost']} | {p['load1'][1]:.1f}–{p['load1'][2]:.1f} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_def = [("instances", "connected instances N (R = 10)", lambda p: p["roles"] == 10),
                ("roles", "configured roles R (N = 1,000)", lambda p: p["instances"] == 1000)]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharey="row")
    for col, (key, label, keep) in enumerate(axes_def):
        points = sorted((p for p in summary if keep(p)), key=lambda p: p[key])
        xs = [p[key] for p in points]
        for row, (metric, ylabel, series) in enumerate([
            ("cpu", "broker CPU µs per delivery", [("cpu", "CPU per delivery", "tab:blue")]),
            ("lat", "reply latency µs", [("p50", "p50", "tab:green"), ("p99", "p99", "tab:red")]),
        ]):
            ax = axes[row][col]
            for skey, slabel, color in series:
                med = [p[skey][0] for p in points]
                err = [[p[skey][0] - p[skey][1] for p in points], [p[skey][2] - p[skey][0] for p in points]]
                ax.errorbar(xs, med, yerr=err, marker="o", capsize=4, label=slabel, color=color)
            ax.set_xscale("log")
            if metric == "lat":
                ax.set_yscale("log")  # a tail of preemptions by other work on a shared machine spans decades
            else:
                ax.set_ylim(bottom=0)
            ax.grid(True, which="both", alpha=0.3)
            if row == 1:
                ax.set_xlabel(label)
            if col == 0:
                ax.set_ylabel(ylabel)
            ax.legend(loc="lower left")
    fig.suptitle(title.replace("; ", "\n", 1), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"# plot: {path}", file=sys.stderr)


def run_and_record(n: int, r: int, rep: int, args, out: Path) -> None:
    started = time.monotonic()
    result = run_point(n, r, args)
    result.update(rep=rep, load1=os.getloadavg()[0], wall_s=round(time.monotonic() - started, 1))
    with out.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"{time.strftime('%H:%M:%S')} N={n} R={r} rep {rep}: " + (
        "FAILED " + result.get("stderr", "") if result.get("failed") else
        f"{result['broker_cpu_us_per_delivery']} µs CPU/delivery, p50 {result['p50_us']} p99 "
        f"{result['p99_us']} µs, {result['req_per_s']} req/s, RSS {result['broker_rss_kb'] / 1024:.0f} MB, "
        f"connect {result['connect_s']} s, lost {result['lost']}, {result['wall_s']} s"), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--axis", choices=["instances", "roles", "both"], default="both")
    parser.add_argument("--point", action="append", default=[], help="NxR, e.g. 10000x10 (repeatable)")
    parser.add_argument("--rate", type=int, default=1000, help="requests per second (2 deliveries each)")
    parser.add_argument("--users", type=int, default=1, help="instances of the replying role")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--broker-cpu", default="0")
    parser.add_argument("--loadgen-cpu", default="1")
    parser.add_argument("--lock", default="/tmp/exocom-bench.lock", help="flock(2)ed around the whole series; '' for none")
    parser.add_argument("--profile", help="py-spy record the broker under load (warm-up and window) into this SVG "
                                          "({N} and {R} are replaced); the figures of such a run are not comparable")
    parser.add_argument("--strace", help="count the broker's system calls under load (strace -c) into this file "
                                         "({N} and {R} are replaced); the figures of such a run are not comparable")
    parser.add_argument("--out", help="JSON lines (default bench/results/growth-<stamp>.jsonl)")
    parser.add_argument("--table", nargs="*", help="only summarize these JSONL files (no runs)")
    parser.add_argument("--plot", help="write a PNG plot of the summary here")
    args = parser.parse_args()

    if args.table is not None:
        paths = [p for pattern in args.table for p in sorted(glob.glob(pattern))]
        rows = load(paths)
        summary = summarize(rows)
        print(table(summary))
        print()
        print(paired(rows))
        if args.plot:
            metas = [json.loads(line)["machine"] for path in paths for line in open(path) if '"machine"' in line]
            commits = ", ".join(dict.fromkeys(m["commit"] for m in metas))
            meta = metas[0] if metas else {}
            plot(summary, args.plot, f"exocom growth at {commits}: {meta.get('rate', '')} req/s rpc, medians [min–max] "
                                     f"of {min(p['reps'] for p in summary)}–{max(p['reps'] for p in summary)} runs; {meta.get('cpu', '')}, "
                                     f"nproc {meta.get('nproc', '')}")
        return

    for tool in ("node", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"growth.py: {tool} is needed")
    if not (NODE_MODULES / "ws").is_dir():
        sys.exit(f"growth.py: {NODE_MODULES}/ws not found: run bench/run.sh once, or copy /work/shared/bench/"
                 "package*.json into bench/.work and run npm ci there")
    raise_fd_limit()
    points = [tuple(int(x) for x in p.split("x")) for p in args.point] or (
        INSTANCES_AXIS if args.axis == "instances" else ROLES_AXIS if args.axis == "roles"
        else INSTANCES_AXIS + [p for p in ROLES_AXIS if p not in INSTANCES_AXIS])
    out = Path(args.out or BENCH / "results" / f"growth-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**machine(), "rate": args.rate, "users": args.users, "seconds": args.seconds, "warmup": args.warmup,
            "reps": args.reps, "points": points}
    with out.open("a") as f:
        f.write(json.dumps({"machine": meta}) + "\n")
    print(f"# {meta}", file=sys.stderr)
    with bench_lock(args.lock):
        for rep in range(1, args.reps + 1):
            for n, r in points:
                run_and_record(n, r, rep, args, out)
    print(f"# raw: {out}", file=sys.stderr)
    summary = summarize(load([str(out)]))
    print(table(summary))
    if args.plot:
        plot(summary, args.plot, f"exocom growth at {meta['commit']}: {args.rate} req/s rpc, medians [min–max]; "
                                 f"{meta['cpu']}, nproc {meta['nproc']}")


if __name__ == "__main__":
    main()
