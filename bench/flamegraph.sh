#!/usr/bin/env bash
# bench/flamegraph.sh -- a py-spy flame graph of a real `exocom serve` under one of
# the shared yardstick's scenarios (bench/PROFILE.md shows the results).
#
#   bench/flamegraph.sh rpc16 bench/profiles/after-rpc16.svg          # this checkout
#   EXOCOM=/other/checkout/.venv/bin/exocom bench/flamegraph.sh rpc1 before-rpc1.svg
#
# Needs py-spy (`.venv/bin/pip install py-spy`, not a project dependency) and
# bench/.work/ set up by bench/run.sh (exoload.js and its node_modules).
# The broker is pinned to CPU 0 and the load generator to CPU 1; py-spy samples
# at 250 Hz for WINDOW seconds (default 8). FORMAT=raw writes collapsed stacks instead.
set -euo pipefail
BENCH="$(cd "$(dirname "$0")" && pwd)"
label=${1:?scenario: rpc1, rpc16, throughput or fanout4}
out=$(realpath -m "${2:?output file}")
EXOCOM="${EXOCOM:-$BENCH/../.venv/bin/exocom}"
PYSPY="${PYSPY:-$BENCH/../.venv/bin/py-spy}"
SECONDS_WINDOW=${WINDOW:-8}
case $label in
  rpc1) args="--scenario rpc -P 1 -C 1 -K 1" ;;
  rpc16) args="--scenario rpc -P 2 -C 2 -K 16" ;;
  throughput) args="--scenario throughput -P 4 -C 4 -W 32" ;;
  fanout4) args="--scenario fanout -R 4 -W 32" ;;
  *) echo "flamegraph.sh: unknown scenario $label" >&2; exit 2 ;;
esac
cd "$BENCH/.work"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
state=$(mktemp -d)
trap 'rm -rf "$state"' EXIT
# shellcheck disable=SC2086
PORT=$port SERVICE_DATA="$(node exoload.js --print-service-data $args)" EXOCOM_STATE_DIR=$state \
  taskset -c 0 "$EXOCOM" serve >/dev/null 2>&1 &
broker=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
"$PYSPY" record --rate 250 --duration $((SECONDS_WINDOW + 1)) ${FORMAT:+--format $FORMAT} -o "$out" --pid $broker >/dev/null 2>&1 &
spy=$!
# shellcheck disable=SC2086
taskset -c 1 node exoload.js --url "ws://127.0.0.1:$port/services" $args --seconds "$SECONDS_WINDOW" --warmup 1 --pid $broker
wait $spy
kill $broker
wait $broker 2>/dev/null || true
echo "flamegraph.sh: $out" >&2
