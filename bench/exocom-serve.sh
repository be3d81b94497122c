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
if [ -n "${EXOCOM_BENCH_ROLLOUT:-}" ]; then
  # "With a rollout declared": every receiving role gets a deployment with a
  # rollout for a version that never connects (it stays held), so the broker
  # runs with its rollout machinery armed while the load is unchanged.
  SERVICE_DATA="$("$HERE/../.venv/bin/python" -c '
import json, os
routes = json.loads(os.environ["SERVICE_DATA"])
for role in [r for r, e in routes.items() if e.get("receives")]:
    routes[f"{role}-rollout"] = {"deploys": f"{role}@9.9.9", "rollout": {"steps": [10, 50, 100], "interval": 60,
        "gates": {"minSamples": 50, "maxErrorRate": 0.01, "maxReplyTimeRatio": 1.5, "maxDisconnects": 3}}}
print(json.dumps(routes))')"
  export SERVICE_DATA
fi
exec "$EXOCOM" serve "$@"
