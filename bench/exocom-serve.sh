#!/usr/bin/env bash
# exocom-serve.sh -- start `exocom serve` for a benchmark run with a fresh,
# empty state directory (the ledger), so every run starts from the same state.
#
# run_anchors.sh starts the broker as `taskset -c N <command>` and measures the
# process by its PID, so this wrapper must `exec` (same PID as the broker).
# The temp dir is created under $EXOCOM_BENCH_STATE_ROOT when set (bench/run.sh
# sets it and removes it at the end), else under $TMPDIR or /tmp.
# PORT and SERVICE_DATA come from the environment, as with `exocom serve`.
set -eu
HERE="$(cd "$(dirname "$0")" && pwd)"
EXOCOM="${EXOCOM:-$HERE/../.venv/bin/exocom}"
ROOT="${EXOCOM_BENCH_STATE_ROOT:-${TMPDIR:-/tmp}}"
EXOCOM_STATE_DIR="$(mktemp -d "$ROOT/exocom-state.XXXXXX")"
export EXOCOM_STATE_DIR
exec "$EXOCOM" serve "$@"
