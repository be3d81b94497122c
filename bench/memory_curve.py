"""Is the broker's RSS flat over a long throughput run? (issue 11, item 2)

For each mode of activity ids -- `fresh` (a new activityId per message),
`pool` (ids reused from a pool of --pool), `none` (no activityId) -- this
starts a real `exocom serve` (fresh EXOCOM_STATE_DIR in a temp dir, a free
port, the throughput routes: `web` sends `ping`, `users` receives it) pinned
to --broker-cpu, drives it with bench/memory_load.js (4 senders -> 4
receivers, at most 32 unacknowledged messages per sender, as the shared
exoload.js throughput scenario) pinned to --loadgen-cpu, and reads the
broker's VmRSS from /proc/PID/status every second. It prints the curve (time,
RSS MB, messages delivered so far), RSS at 60 s and at the end, their ratio,
and PASS when the ratio is at most 1.10. Every sample and a summary per mode
go to a JSON lines file under bench/results/ (git-ignored).

    .venv/bin/python bench/memory_curve.py                       # 3 modes x 180 s
    .venv/bin/python bench/memory_curve.py --modes fresh --seconds 30
    .venv/bin/python bench/memory_curve.py --plot bench/memory_curve.png   # also plot
    .venv/bin/python bench/memory_curve.py --plot-only bench/results/memory-X.jsonl --plot out.png
    git archive REV | tar -x -C /tmp/before      # older code: the broker imports it first
    .venv/bin/python bench/memory_curve.py --checkout /tmp/before --label "before (REV)"

Needs node and `ws` in bench/.work/node_modules (bench/run.sh, or `npm ci`
in a copy of /work/shared/bench there); --plot needs matplotlib
(bench/requirements.txt). The exit status is 1 when a mode fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MODES = ("fresh", "pool", "none")
LIMIT = 1.10
SERVICE_DATA = {  # what `node exoload.js --print-service-data --scenario throughput` prints
    "web": {"sends": ["ping"], "receives": ["pong"]},
    "users": {"receives": ["ping"], "sends": ["pong"]},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def machine(args) -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "exocom"],
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "nproc": os.cpu_count(),
            "cpu": model, "python": platform.python_version(), "commit": commit + ("+dirty" if dirty else ""),
            "load": os.getloadavg(), "checkout": str(args.checkout) if args.checkout else None,
            "label": args.label}


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exocom serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/config.json", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("exocom serve did not answer /config.json")


def run_mode(args, mode: str, out) -> dict:
    exocom = Path(args.exocom)
    port = free_port()
    state = tempfile.mkdtemp(prefix="exocom-memory.")
    env = {**os.environ, "PORT": str(port), "SERVICE_DATA": json.dumps(SERVICE_DATA), "EXOCOM_STATE_DIR": state}
    env.pop("EXOCOM_PORT", None)
    if args.checkout:
        env["PYTHONPATH"] = str(args.checkout)  # before the editable install's path
    if args.tracemalloc:
        env["PYTHONTRACEMALLOC"] = str(args.tracemalloc)
    broker = subprocess.Popen(["taskset", "-c", str(args.broker_cpu), str(exocom), "serve", "--host", "127.0.0.1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load = None
    try:
        wait_ready(port, broker)
        node_env = {**os.environ, "NODE_PATH": str(args.node_modules)}
        load = subprocess.Popen(
            ["taskset", "-c", str(args.loadgen_cpu), "node", str(BENCH / "memory_load.js"),
             "--url", f"ws://127.0.0.1:{port}/services", "--mode", mode, "--pool", str(args.pool),
             "--seconds", str(args.seconds)],
            env=node_env, stdout=subprocess.PIPE, text=True)
        latest: dict = {}
        started = threading.Event()

        def read_load() -> None:
            for line in load.stdout:
                report = json.loads(line)
                latest.update(report)
                if report.get("started"):
                    started.set()

        reader = threading.Thread(target=read_load, daemon=True)
        reader.start()
        if not started.wait(30):
            raise RuntimeError("the load generator did not start")
        t0 = time.monotonic()
        rss0 = rss_kb(broker.pid)
        cpu0 = cpu_s(broker.pid)
        samples = []
        print(f"\n== {mode}: broker pid {broker.pid} port {port}, RSS at start {rss0 / 1024:.1f} MB", flush=True)
        print(f"{'t s':>5} {'RSS MB':>8} {'delivered':>11} {'msgs/s':>8}", flush=True)
        prev = 0
        for k in range(1, args.seconds + 1):
            time.sleep(max(0.0, t0 + k - time.monotonic()))
            rss = rss_kb(broker.pid)
            if rss is None or broker.poll() is not None:
                raise RuntimeError(f"the broker exited during the run ({broker.poll()})")
            if load.poll() is not None and k < args.seconds - 1:
                raise RuntimeError(f"the load generator exited during the run ({load.returncode})")
            delivered = latest.get("delivered", 0)
            sample = {"kind": "sample", "mode": mode, "t": k, "rss_kb": rss, "delivered": delivered,
                      "sent": latest.get("sent", 0)}
            samples.append(sample)
            out.write(json.dumps(sample) + "\n")
            if k % args.print_every == 0 or k == args.seconds:
                print(f"{k:5d} {rss / 1024:8.1f} {delivered:11d} {(delivered - prev) / args.print_every:8.0f}",
                      flush=True)
                prev = delivered
        cpu1 = cpu_s(broker.pid)
        load.wait(timeout=30)
        reader.join(5)
        at = {s["t"]: s["rss_kb"] for s in samples}
        ref_t = min(60, args.seconds)
        ref, end = at[ref_t], at[args.seconds]
        after = [s["rss_kb"] for s in samples if s["t"] >= ref_t]
        summary = {
            "kind": "summary", "mode": mode, "seconds": args.seconds, "pool": args.pool if mode == "pool" else None,
            "rss_start_kb": rss0, "rss_ref_t": ref_t, "rss_ref_kb": ref, "rss_end_kb": end,
            "rss_max_after_ref_kb": max(after), "rss_min_after_ref_kb": min(after),
            "ratio": round(end / ref, 4), "max_ratio": round(max(after) / ref, 4), "pass": end / ref <= LIMIT,
            "delivered": latest.get("delivered"), "sent": latest.get("sent"), "lost": latest.get("lost"),
            "msgs_per_s": round(latest.get("delivered", 0) / args.seconds),
            "broker_cpu_us_per_delivery": round((cpu1 - cpu0) * 1e6 / max(1, latest.get("delivered", 1)), 2),
            # about 100 %: the broker, not the load generator, sets the pace
            "broker_cpu_pct": round((cpu1 - cpu0) * 100 / args.seconds, 1),
            "loadgen_cpu_pct": round(latest.get("loadgen_cpu_s", 0) * 100 / args.seconds, 1),
            "load_closes": latest.get("closes"), "load_errors": latest.get("errors"),
            **machine(args),
        }
        out.write(json.dumps(summary) + "\n")
        out.flush()
        print(f"{mode}: RSS {ref / 1024:.1f} MB at {ref_t} s, {end / 1024:.1f} MB at {args.seconds} s, "
              f"ratio {end / ref:.3f} (max after {ref_t} s: {max(after) / ref:.3f}) -> "
              f"{'PASS' if summary['pass'] else 'FAIL'} (limit {LIMIT:.2f}); "
              f"{summary['msgs_per_s']} msgs/s, lost {summary['lost']}, broker CPU {summary['broker_cpu_pct']} %, "
              f"load generator CPU {summary['loadgen_cpu_pct']} %", flush=True)
        return summary
    finally:
        for p in (load, broker):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(state, ignore_errors=True)


def plot(jsonl: list[Path], png: Path) -> None:
    """One panel per file (e.g. before and after a change), one curve per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(jsonl), figsize=(7 * len(jsonl), 5), sharey=True, squeeze=False)
    for ax, path in zip(axes[0], jsonl):
        curves: dict[str, list] = {}
        summaries: dict[str, dict] = {}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["kind"] == "sample":
                curves.setdefault(row["mode"], []).append(row)
            else:
                summaries[row["mode"]] = row
        for mode, rows in curves.items():
            s = summaries.get(mode)
            label = mode if not s else (f"{mode}: {s['rss_ref_kb'] / 1024:.0f} MB at {s['rss_ref_t']} s, "
                                        f"{s['rss_end_kb'] / 1024:.0f} at {s['seconds']} s, "
                                        f"max after {s['rss_ref_t']} s x{s['max_ratio']:.2f}")
            line, = ax.plot([r["t"] for r in rows], [r["rss_kb"] / 1024 for r in rows], lw=1, label=label)
            if s:
                ax.axhline(s["rss_ref_kb"] * LIMIT / 1024, ls=":", lw=0.8, color=line.get_color())
        ax.axvline(60, color="grey", lw=0.8, ls="--")
        any_s = next(iter(summaries.values()), {})
        ax.set_title(f"{any_s.get('label') or 'commit ' + any_s.get('commit', '?')}, "
                     f"{any_s.get('date', '')[:16].replace('T', ' ')} UTC", fontsize=10)
        ax.set_xlabel("seconds of load")
        top = max([r["rss_kb"] for rows in curves.values() for r in rows]
                  + [s["rss_ref_kb"] * LIMIT for s in summaries.values()])
        ax.set_ylim(0, top / 1024 * 1.05)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("broker RSS (MB)")
    fig.suptitle("exocom serve RSS under the throughput load (4 senders -> 4 receivers, <= 32 unacknowledged each); "
                 "dotted: 1.10 x RSS at 60 s", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    print(f"plot: {png}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: fresh, pool, none")
    p.add_argument("--seconds", type=int, default=180)
    p.add_argument("--pool", type=int, default=1000, help="activity ids in the pool (mode pool)")
    p.add_argument("--broker-cpu", type=int, default=0)
    p.add_argument("--loadgen-cpu", type=int, default=1)
    p.add_argument("--print-every", type=int, default=10, help="print every N-th sample (all are written)")
    p.add_argument("--exocom", default=str(ROOT / ".venv/bin/exocom"))
    p.add_argument("--node-modules", default=str(BENCH / ".work/node_modules"))
    p.add_argument("--out", type=Path, help="JSON lines (default bench/results/memory-STAMP.jsonl)")
    p.add_argument("--plot", type=Path, help="write a PNG of the curves here")
    p.add_argument("--plot-only", type=Path, nargs="+", metavar="JSONL", help="plot these files, run nothing")
    p.add_argument("--checkout", type=Path, help="run the broker on the exocom package in this directory")
    p.add_argument("--label", help="what the code is, for the JSON lines and the plot")
    p.add_argument("--tracemalloc", type=int, default=0, help="PYTHONTRACEMALLOC for the broker (frames)")
    args = p.parse_args(argv)
    if args.plot_only:
        plot(args.plot_only, args.plot or BENCH / "memory_curve.png")
        return 0
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        p.error(f"unknown modes: {', '.join(sorted(unknown))}")
    if not (Path(args.node_modules) / "ws").is_dir():
        p.error(f"no ws in {args.node_modules}: run bench/run.sh once, or npm ci there")
    out_path = args.out or BENCH / "results" / f"memory-{datetime.now().strftime('%Y%m%d-%H%M%S')}.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    m = machine(args)
    print(f"# {m['date']} nproc={m['nproc']} {m['cpu']}, Python {m['python']}, commit {m['commit']}, "
          f"load {m['load'][0]:.2f}; code {args.checkout or ROOT}; {args.seconds} s per mode; samples -> {out_path}", flush=True)
    with out_path.open("a") as out:
        summaries = [run_mode(args, mode, out) for mode in modes]
    print("\n== summary (limit: RSS at the end <= 1.10 x RSS at 60 s)")
    for s in summaries:
        print(f"  {s['mode']:6} {s['rss_ref_kb'] / 1024:7.1f} MB at {s['rss_ref_t']:3d} s  "
              f"{s['rss_end_kb'] / 1024:7.1f} MB at {s['seconds']:3d} s  ratio {s['ratio']:.3f}  "
              f"{'PASS' if s['pass'] else 'FAIL'}  ({s['msgs_per_s']} msgs/s)")
    if args.plot:
        plot([out_path], args.plot)
    return 0 if all(s["pass"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
