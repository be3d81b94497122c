"""The issue-11 table from a bench/run.sh series with BEFORE set: medians per
scenario and build, and each as a ratio to the floor relay of the same series.

    .venv/bin/python bench/ab_table.py bench/results/ab-issue11-2.jsonl
"""

import json
import statistics
import sys
from collections import defaultdict

ROWS = [  # (label, scenario, field, target as text)
    ("rpc1 req/s", "rpc1", "req_per_s", "≥ 1.9"),
    ("rpc1 p50 latency", "rpc1", "p50_us", "≤ 0.48"),
    ("rpc1 broker CPU per delivery", "rpc1", "broker_cpu_us_per_delivery", ""),
    ("rpc16 req/s", "rpc16", "req_per_s", "≥ 4.4"),
    ("rpc16 p99 latency", "rpc16", "p99_us", "keep ≤ 0.5"),
    ("rpc16 broker CPU per delivery", "rpc16", "broker_cpu_us_per_delivery", ""),
    ("throughput msgs/s", "throughput", "msgs_per_s", "keep ≥ 5"),
    ("throughput broker CPU per delivery", "throughput", "broker_cpu_us_per_delivery", ""),
    ("fanout4 deliveries/s", "fanout4", "deliveries_per_s", "keep ≥ 7"),
    ("fanout4 broker CPU per delivery", "fanout4", "broker_cpu_us_per_delivery", ""),
    ("RSS per idle connection (conns2000)", "conns2000", "broker_rss_kb_per_conn", "≤ 0.8"),
]


def main(path: str) -> None:
    values = defaultdict(list)
    for line in open(path):
        run = json.loads(line)
        if not run.get("failed"):
            for key, value in run.items():
                if isinstance(value, (int, float)):
                    values[run["label"], run["broker"], key].append(value)
    print("| scenario | floor relay | before | after | before / relay | after / relay | target |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for label, scenario, field, target in ROWS:
        med = {b: statistics.median(values[scenario, b, field]) for b in ("floor", "before", "ours")
               if values[scenario, b, field]}
        if len(med) < 3:
            continue
        fmt = (lambda v: f"{v:,.0f}") if med["floor"] > 100 else (lambda v: f"{v:.2f}")
        print(f"| {label} | {fmt(med['floor'])} | {fmt(med['before'])} | {fmt(med['ours'])} | "
              f"{med['before'] / med['floor']:.2f} | **{med['ours'] / med['floor']:.2f}** | {target} |")


if __name__ == "__main__":
    main(sys.argv[1])
