"""`exocom demo --skip-v2` says what happened: one deployment, part 2 skipped,
and the deployment script stopped by the demo (it does not exit by itself)."""

from __future__ import annotations

import subprocess

from test_demo import DEMO, index, lines
from processes import ROOT


def test_the_demo_without_part_two_says_so():
    result = subprocess.run([*DEMO, "--skip-v2"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    out = lines(result.stdout)
    assert out[-1] == ("Done: the todo-search 0.0.1 deployment finished; part 2 (todos 2.0.0) was skipped "
                       "(--skip-v2); nothing was lost on the way.")
    assert "both deployments" not in result.stdout and "todos@2.0.0" not in result.stdout
    stopped = index(out, "the demo stopped the deployment script (Ctrl-C)")
    assert index(out, "deployment todo-search@0.0.1: deployment finished") < stopped
    assert "the deployment script exited" not in result.stdout
