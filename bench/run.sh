#!/usr/bin/env bash
# bench/run.sh -- our broker against the floor relay with the shared yardstick
# (/work/shared/bench: exoload.js, floor_relay.py, run_anchors.sh, summarize.py).
#
#   bench/run.sh                                  # all scenarios, REPS=3, 10 s windows
#   REPS=3 SECONDS_WINDOW=8 bench/run.sh          # what RESULTS.md was made with
#   REPS=1 bench/run.sh throughput rpc1           # a subset of scenarios
#
# The shared tools are copied (read-only there, and run_anchors.sh runs
# `node exoload.js` from its own directory, so node_modules must sit next to
# it) into bench/.work/, which is git-ignored, and `npm ci` installs the
# pinned `ws` there. Results are appended to bench/results/run-<stamp>.jsonl
# (git-ignored) and summarized with --base floor.
#
# Environment: SHARED (default /work/shared/bench), REPS, SECONDS_WINDOW,
# WARMUP, PORT (default 4371, must be free), BROKER_CPU, LOADGEN_CPU,
# OUT (jsonl path), PYTHON (for floor_relay.py), SKIP_NPM=1 (reuse node_modules),
# BEFORE (another build's exocom, measured as "before" in the same series).
set -euo pipefail
BENCH="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$BENCH/.." && pwd)"
SHARED="${SHARED:-/work/shared/bench}"
WORK="$BENCH/.work"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
EXOCOM_BIN="$ROOT/.venv/bin/exocom"

for f in "$PYTHON" "$EXOCOM_BIN"; do
  [ -x "$f" ] || { echo "run.sh: $f not found; create the venv: python3 -m venv .venv && .venv/bin/pip install -e ." >&2; exit 2; }
done
command -v node >/dev/null && command -v npm >/dev/null || { echo "run.sh: node and npm are needed" >&2; exit 2; }
command -v taskset >/dev/null || { echo "run.sh: taskset (util-linux) is needed" >&2; exit 2; }

# 1. a private, git-ignored copy of the shared tools + npm ci
mkdir -p "$WORK" "$BENCH/results"
for f in exoload.js floor_relay.py run_anchors.sh summarize.py package.json package-lock.json; do
  install -m 0755 "$SHARED/$f" "$WORK/$f"
done
if [ "${SKIP_NPM:-0}" != 1 ] || [ ! -d "$WORK/node_modules/ws" ]; then
  (cd "$WORK" && npm ci --no-audit --no-fund --loglevel=error)
fi

# 2. a free port (other people may be benchmarking on this machine too)
export PORT="${PORT:-4371}"
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  echo "run.sh: port $PORT is already in use; pass another PORT=" >&2
  exit 2
fi

# 3. fresh state dirs for every broker start, removed at the end
export EXOCOM_BENCH_STATE_ROOT="$(mktemp -d "${TMPDIR:-/tmp}/exocom-bench.XXXXXX")"
trap 'rm -rf "$EXOCOM_BENCH_STATE_ROOT"' EXIT

export REPS="${REPS:-3}" SECONDS_WINDOW="${SECONDS_WINDOW:-10}"
export OUT="${OUT:-$BENCH/results/run-$(date +%Y%m%d-%H%M%S).jsonl}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac  # run_anchors.sh cd's to its own dir
# '@' stands for a space in run_anchors.sh's broker commands.
export BROKERS="ours=$BENCH/exocom-serve.sh floor=$PYTHON@$WORK/floor_relay.py"
# BEFORE=/path/to/another/checkout/.venv/bin/exocom adds that build as "before", for an A/B series
# (env execs, so the measured PID is still the broker's).
[ -n "${BEFORE:-}" ] && BROKERS="$BROKERS before=env@EXOCOM=$BEFORE@$BENCH/exocom-serve.sh"
[ $# -eq 0 ] && set -- throughput rpc1 rpc16 fanout4 conns2000

{
  echo "# $(date -Is) on $(hostname): nproc=$(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'),"
  echo "#   $("$PYTHON" -V 2>&1), node $(node --version), exocom $("$EXOCOM_BIN" --version 2>&1 | cut -d' ' -f2), load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# REPS=$REPS SECONDS_WINDOW=$SECONDS_WINDOW PORT=$PORT OUT=$OUT"
  echo "# BROKERS=$BROKERS"
  echo "# scenarios: $*"
} >&2

"$WORK/run_anchors.sh" "$@"

echo "# $(date -Is) done, load $(cut -d' ' -f1-3 /proc/loadavg); summary of $OUT:" >&2
"$PYTHON" "$WORK/summarize.py" "$OUT" --base floor
