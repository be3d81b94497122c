#!/usr/bin/env bash
# bench/profile.sh -- profile `exocom serve` under one exoload.js scenario.
#
#   bench/profile.sh                      # cProfile, throughput, 8 s window
#   PROFILER=py-spy bench/profile.sh      # py-spy sampling (pip install py-spy into .venv)
#   SCENARIO=rpc16 bench/profile.sh
#
# The broker runs pinned to CPU 0 under the profiler, exoload.js pinned to
# CPU 1; after the window the broker is stopped with SIGINT (graceful stop, so
# cProfile writes its file). Prints the top functions by tottime and cumtime.
# Needs bench/.work from bench/run.sh (the copied tools + node_modules).
set -euo pipefail
BENCH="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$BENCH/.." && pwd)"
WORK="$BENCH/.work"
PY="$ROOT/.venv/bin/python"
PROFILER="${PROFILER:-cprofile}"
SCENARIO="${SCENARIO:-throughput}"
WIN="${SECONDS_WINDOW:-8}"
PORT="${PORT:-4372}"
TOP="${TOP:-25}"
OUTDIR="${OUTDIR:-/tmp}"
[ -f "$WORK/node_modules/ws/package.json" ] || { echo "profile.sh: run bench/run.sh once first (npm ci in bench/.work)" >&2; exit 2; }
declare -A ARGS=(
  [throughput]="--scenario throughput -P 4 -C 4 -W 32"
  [rpc1]="--scenario rpc -P 1 -C 1 -K 1"
  [rpc16]="--scenario rpc -P 2 -C 2 -K 16"
  [fanout4]="--scenario fanout -R 4 -W 32"
)
A=${ARGS[$SCENARIO]}
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then echo "profile.sh: port $PORT in use" >&2; exit 2; fi
STATE="$(mktemp -d "${TMPDIR:-/tmp}/exocom-prof.XXXXXX")"
trap 'rm -rf "$STATE"' EXIT
SD=$(cd "$WORK" && node exoload.js --print-service-data $A)

case "$PROFILER" in
  cprofile)
    PROF="$OUTDIR/exocom.prof"
    PORT=$PORT SERVICE_DATA="$SD" EXOCOM_STATE_DIR="$STATE" taskset -c 0 \
      "$PY" -m cProfile -o "$PROF" -m exocom serve >/dev/null 2>"$STATE/stderr" &
    ;;
  py-spy)
    PROF="$OUTDIR/exocom.pyspy.txt"
    # py-spy samples from outside (CPU 1, beside the load generator); --native off.
    PORT=$PORT SERVICE_DATA="$SD" EXOCOM_STATE_DIR="$STATE" taskset -c 0 \
      "$PY" -m exocom serve >/dev/null 2>"$STATE/stderr" &
    ;;
  *) echo "PROFILER is cprofile or py-spy" >&2; exit 2 ;;
esac
BPID=$!
for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
if [ "$PROFILER" = py-spy ]; then
  taskset -c 1 "$ROOT/.venv/bin/py-spy" record --pid "$BPID" --rate 250 --format raw --output "$PROF" \
    --duration $((WIN + 3)) >/dev/null 2>"$STATE/pyspy.err" &
  SPY=$!
fi
RES=$(cd "$WORK" && taskset -c 1 node exoload.js --url "ws://127.0.0.1:$PORT/services" $A --seconds "$WIN" --warmup 2 --pid "$BPID")
echo "exoload: $RES"
[ "$PROFILER" = py-spy ] && wait "$SPY"
kill -INT "$BPID"
wait "$BPID" || true

if [ "$PROFILER" = cprofile ]; then
  "$PY" - "$PROF" "$TOP" <<'PYEOF'
import pstats, sys
path, top = sys.argv[1], int(sys.argv[2])
for key in ("tottime", "cumulative"):
    print(f"\n### top {top} by {key}\n\n```")
    st = pstats.Stats(path)
    st.sort_stats(key).print_stats(top)
    print("```")
PYEOF
else
  "$PY" - "$PROF" "$TOP" <<'PYEOF'
# py-spy --format raw: "frame;frame;... count" (root first). Self and inclusive
# sample shares per function (file:line of the function's frame is dropped).
import re, sys
from collections import Counter
path, top = sys.argv[1], int(sys.argv[2])
self_, incl, total = Counter(), Counter(), 0
for line in open(path):
    stack, _, n = line.rstrip().rpartition(" ")
    n = int(n); total += n
    frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
    self_[frames[-1]] += n
    for f in set(frames):
        incl[f] += n
print(f"{total} samples")
for title, c in (("self", self_), ("inclusive", incl)):
    print(f"\n### top {top} by {title} samples\n\n```")
    for f, n in c.most_common(top):
        print(f"{100 * n / total:6.2f}%  {f}")
    print("```")
PYEOF
fi
