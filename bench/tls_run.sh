#!/usr/bin/env bash
# tls_run.sh -- the throughput scenario over ws:// and over wss:// in one run,
# alternating, so that both see the same machine (issue 10: the cost of TLS).
#
#   REPS=3 SECONDS_WINDOW=5 bench/tls_run.sh
#
# The shared load generator speaks wss:// (node's `ws`; it trusts the test CA
# through NODE_EXTRA_CA_CERTS). Its registration check reads /config.json over
# plain http, which the TLS port refuses: it then falls back to its fixed
# pause (registration_confirmed: false), which changes nothing to the window.
# Broker on CPU 0, load generator on CPU 1; certificates made with trustme.
set -euo pipefail
BENCH="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$BENCH/.." && pwd)"
PYTHON="$ROOT/.venv/bin/python"
WORK="$BENCH/.work"
mkdir -p "$WORK"
for f in exoload.js package.json package-lock.json; do install -m 0755 "/work/shared/bench/$f" "$WORK/$f"; done
[ -d "$WORK/node_modules/ws" ] || (cd "$WORK" && npm ci --no-audit --no-fund --loglevel=error)
REPS="${REPS:-3}" SECONDS_WINDOW="${SECONDS_WINDOW:-5}" PORT="${PORT:-4372}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/exocom-tls-bench.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
"$PYTHON" -c '
import sys, trustme
ca = trustme.CA(); cert = ca.issue_cert("127.0.0.1")
ca.cert_pem.write_to_path(sys.argv[1] + "/ca.pem")
cert.cert_chain_pems[0].write_to_path(sys.argv[1] + "/cert.pem"); cert.private_key_pem.write_to_path(sys.argv[1] + "/key.pem")' "$TMP"
SERVICE_DATA="$(node "$WORK/exoload.js" --scenario throughput --print-service-data)"
export SERVICE_DATA
run() {  # run MODE: one window; prints the load generator's JSON line
  local mode="$1" scheme=ws tls=()
  if [ "$mode" = tls ]; then scheme=wss; tls=(--tls-cert "$TMP/cert.pem" --tls-key "$TMP/key.pem"); fi
  EXOCOM_STATE_DIR="$(mktemp -d "$TMP/state.XXXXXX")" taskset -c 0 "$ROOT/.venv/bin/exocom" serve --port "$PORT" \
    --host 127.0.0.1 "${tls[@]}" >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
  NODE_EXTRA_CA_CERTS="$TMP/ca.pem" taskset -c 1 node "$WORK/exoload.js" --url "$scheme://127.0.0.1:$PORT/services" \
    --scenario throughput --seconds "$SECONDS_WINDOW" --pid "$pid" | tail -1 | sed "s/^/{\"mode\": \"$mode\", \"r\": /; s/\$/}/"
  kill "$pid"; wait "$pid" || true
}
for rep in $(seq "$REPS"); do
  if [ $((rep % 2)) = 1 ]; then run plain; run tls; else run tls; run plain; fi
done
