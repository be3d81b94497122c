"""`exocom demo --skip-v2 --skip-rollout` says what happened: one deployment,
parts 2 and 3 skipped, and the deployment script stopped by the demo (it does
not exit by itself)."""

from __future__ import annotations

import subprocess

from test_demo import DEMO, index, lines
from processes import ROOT


def test_the_demo_without_parts_two_and_three_says_so():
    result = subprocess.run([*DEMO, "--skip-v2", "--skip-rollout"], capture_output=True, text=True, timeout=60,
                            cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    out = lines(result.stdout)
    assert out[-1] == ("Done: the todo-search 0.0.1 deployment finished (skipped: --skip-v2, --skip-rollout); "
                       "nothing was lost on the way.")
    assert "=== Part 2" not in result.stdout and "=== Part 3" not in result.stdout
    assert "todos@2.0.0" not in result.stdout and "todo-search@0.0.2" not in result.stdout
    stopped = index(out, "the demo stopped the deployment script (Ctrl-C)")
    assert index(out, "deployment todo-search@0.0.1: deployment finished") < stopped
    assert "the deployment script exited" not in result.stdout
