"""`exocom demo`, end to end: a subprocess that starts the broker and the
example services as processes of their own and tells what happens."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from processes import ROOT, wait_for

DEMO = [sys.executable, "-m", "exocom", "demo"]


def processes_using(path: str) -> list[str]:
    """Command lines of running processes that run in `path` or name it (Linux /proc)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            cwd = str((proc / "cwd").readlink())
        except OSError:
            continue
        if cwd.startswith(path) or any(path.encode() in a for a in args):
            found.append(b" ".join(args).decode(errors="replace"))
    return found


def workdir_of(output: str) -> str:
    return re.search(r"work directory (\S+)\)", output).group(1)


def lines(output: str) -> list[str]:
    """The output without the elapsed-time prefixes."""
    return [re.sub(r"^\[\s*[\d.]+s\] ", "", line) for line in output.splitlines()]


def index(lines_: list[str], prefix: str) -> int:
    matches = [i for i, line in enumerate(lines_) if line.startswith(prefix)]
    assert matches, f"no line starts with {prefix!r}"
    return matches[0]


def answer(lines_: list[str], prefix: str):
    """Who answered the first `web.py ...  ->  answered by X: ...` line that
    starts with `prefix`, and the answer: inline JSON, or for a list
    "N todos" and one JSON line per todo."""
    i = index(lines_, prefix)
    by, rest = re.match(r".*  ->  answered by (\S+): (.*)$", lines_[i]).groups()
    count = re.fullmatch(r"(\d+) todos?", rest)
    if count is None:
        return by, json.loads(rest)
    items = [json.loads(line) for line in lines_[i + 1:i + 1 + int(count.group(1))]]
    return by, items


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="checks leftover processes through /proc")
def test_the_demo_walks_through_all_three_parts_and_stops_everything():
    result = subprocess.run([*DEMO, "--pause", "0.5"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    out = lines(result.stdout)
    check_parts_one_and_two(out)
    check_part_three(out[index(out, "=== Part 3"):])

    assert out[-1].startswith("Done:") and "everything stopped" in out
    workdir = workdir_of(result.stdout)
    assert not Path(workdir).exists()
    assert processes_using(workdir) == []


def check_parts_one_and_two(out: list[str]) -> None:
    # Part 1: todo-search 0.0.1 is held, its deployment runs, then search finds the old todos.
    held = index(out, "todo-search@0.0.1 registered: held")
    no_answer = index(out, "web.py search milk  ->  no answer")
    assert "no live version of 'todo-search'" in out[no_answer + 1]
    assert held < no_answer < index(out, "the held search found nothing")
    part1 = [index(out, f"deployment todo-search@0.0.1: {event}") for event in (
        "offline step started", "offline step done", "version live", "online step started", "online step done",
        "deployment finished")]
    assert part1 == sorted(part1) and no_answer < part1[0]
    assert answer(out, "web.py search milk  ->  answered") == ("todo-search@0.0.1", [{"id": 1, "title": "buy milk"}])
    by, found = answer(out, "web.py search *")
    assert by == "todo-search@0.0.1" and len(found) == 3
    assert "search finds the old todos: buy milk, walk the dog, water the plants" in out

    # Part 2: todos 2.0.0 next to 1.0.0.
    assert any(line.startswith("todos@1.0.0 registered again") for line in out)
    assert "todo-search@0.0.1 registered again (its relay reconnected by itself): live" in out
    v2_held = index(out, "todos@2.0.0 registered: held")
    part2 = [index(out, f"deployment todos@2.0.0: {event}") for event in (
        "offline step started", "offline step done", "version live", "online step started", "online step done",
        "deployment finished")]
    assert part2 == sorted(part2) and v2_held < part2[0]
    while_held = index(out, "web.py list  ->  answered by")
    assert v2_held < while_held < part2[0] and out[while_held].startswith("web.py list  ->  answered by todos@1.0.0")
    # During the offline step, production traffic still goes to 1.0.0 ...
    during = index(out, "    production traffic: web --[ todos.create ]-> todos@1.0.0")
    assert part2[0] < during < part2[1]
    assert out[index(out, 'web.py add "call mum"')].startswith(
        'web.py add "call mum" (while the offline step ran)  ->  answered by todos@1.0.0')
    imports = [i for i, line in enumerate(out) if line == "    todos-v2-deployment --[ todos.import ]-> todos@2.0.0"]
    assert len(imports) == 4 and part2[0] < min(imports) and max(imports) < part2[1]
    # ... afterwards it goes to 2.0.0, which has every todo in its new schema ...
    by, todos_v2 = answer(out, "web.py list  ->  answered by todos@2.0.0")
    assert sorted(t["title"] for t in todos_v2) == ["buy milk", "call mum", "walk the dog", "water the plants"]
    assert all(t["done"] is False and t["created_at"] for t in todos_v2)
    assert index(out, "web.py list  ->  answered by todos@2.0.0") > part2[-1]
    # ... and requests pinned to "1" still reach 1.0.0.
    by, todos_v1 = answer(out, "web.py list --pin 1")
    assert by == "todos@1.0.0" and "created_at" not in todos_v1[0]
    assert answer(out, 'web.py add "book the dentist"')[0] == "todos@2.0.0"


CHART_LINE = re.compile(r"\s+todo-search@(\S+)\s+(\w+)\s+share\s+([\d.]+)% \|([#.]{20})\|"
                        r"\s+answered\s+([\d.]+)% \|([= ]{20})\|\s+(\d+)")


def chart_frames(lines_: list[str]) -> list[tuple[int, dict[str, dict]]]:
    """Each frame of the chart: its line index and, per version, its state,
    share and answers (percent, count)."""
    frames = []
    for i, line in enumerate(lines_):
        if line.startswith("todo-search: share of new activities (#)"):
            frame = {}
            for row in lines_[i + 1:]:
                match = CHART_LINE.fullmatch(row)
                if match is None:
                    break
                version, state, share, share_bar, percent, answered_bar, count = match.groups()
                assert share_bar.count("#") == round(float(share) * 20 / 100)
                assert answered_bar.count("=") == round(float(percent) * 20 / 100)
                frame[version] = {"state": state, "share": float(share), "answered": float(percent),
                                  "count": int(count)}
            frames.append((i, frame))
    return frames


def check_part_three(out: list[str]) -> None:
    """todo-search 0.0.2 ramps 10 -> 50 -> 100 % under steady searches; the
    faulty 0.0.3 is aborted at its first step by the error-rate gate."""
    assert "todo-search@0.0.2 registered: held (its deployment declares a rollout)" in out
    ramp = [index(out, f"deployment todo-search@0.0.2: {what}") for what in (
        "offline step done", "rollout started: 10 % of new production activities go to it",
        "rollout stepped up to 50 %, the gates held", "rollout stepped up to 100 %, the gates held",
        "rollout finished at 100 %")]
    assert ramp == sorted(ramp)
    assert re.fullmatch(r"\s+figures since the ramp began: replies \d+, errors 0, error rate 0\.0, .*", out[ramp[2] + 1])
    replies = int(re.search(r"replies (\d+)", out[ramp[2] + 1]).group(1))
    assert replies >= 10  # minSamples: no step up without evidence
    assert ramp[2] < index(out, "todo-search@0.0.1: version draining") < ramp[-1] + 2

    frames = chart_frames(out)
    during = {share: [f["0.0.2"] for i, f in frames if ramp[1] < i < ramp[-1] and f["0.0.2"]["share"] == share]
              for share in (10.0, 50.0)}
    # The chart shows each step while it lasts, and 0.0.2 answered searches at each one.
    assert during[10.0] and during[50.0], frames
    assert all(row["state"] == "ramping" for rows in during.values() for row in rows)
    assert sum(row["count"] for row in during[10.0]) >= 1 and sum(row["count"] for row in during[50.0]) >= 1
    assert sum(row["answered"] for row in during[50.0]) / len(during[50.0]) > 20
    live = next(f for i, f in frames if i > ramp[-1])
    assert live["0.0.2"]["state"] == "live" and live["0.0.2"]["share"] == 100.0
    assert live["0.0.1"]["state"] == "draining" and live["0.0.1"]["share"] == 0.0
    assert answer(out, "web.py search milk")[0] == "todo-search@0.0.2"

    # The faulty 0.0.3: aborted by the error-rate gate at its first step, with the figures that decided it.
    started = index(out, "deployment todo-search@0.0.3: rollout started: 10 %")
    aborted = index(out, "deployment todo-search@0.0.3: rollout aborted at step 1 of its ramp: gate errorRate failed: "
                         "error rate 1.000 (10 of 10 replies) above maxErrorRate 0.2; its share is 0 now")
    assert started < aborted
    assert out[aborted + 1].startswith("         deciding figures: replies 10, errors 10, error rate 1.0, ")
    assert not any("todo-search@0.0.3: rollout stepped up" in line for line in out)
    ramping = [f for i, f in frames if started < i < aborted]
    assert ramping and all(f["0.0.3"]["state"] == "ramping" and f["0.0.3"]["share"] == 10.0 and
                           f["0.0.2"]["share"] == 90.0 for f in ramping)
    after = [f for i, f in frames if i > aborted]
    assert after and all(f["0.0.3"]["state"] == "failed" and f["0.0.3"]["share"] == 0.0 and
                         f["0.0.2"]["share"] == 100.0 for f in after)
    assert after[-1]["0.0.2"]["answered"] >= 90
    assert ("GET /deployments: todo-search@0.0.3 is failed, share 0 %, recorded as stopped: "
            "gate errorRate failed: error rate 1.000 (10 of 10 replies) above maxErrorRate 0.2") in out
    assert answer(out[aborted:], "web.py search milk")[0] == "todo-search@0.0.2"
    steady = out[index(out, "web's steady searches:")]
    assert re.fullmatch(r"web's steady searches: \d+ answered \(\d+ todo-search.failed, \d+ todo-search.results\), "
                        r"0 unanswered", steady), steady
    assert out[index(out, "web's steady searches:") + 1].strip().startswith("todo-search.failed came from 0.0.3 (")


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="checks leftover processes through /proc")
def test_ctrl_c_stops_every_process_of_the_demo():
    demo = subprocess.Popen([*DEMO, "--keep"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    output = []
    try:
        for line in demo.stdout:
            output.append(line)
            if "todo-search@0.0.1 registered: held" in line:
                break
        workdir = workdir_of("".join(output))
        running = processes_using(workdir)
        assert len(running) >= 3, running  # the broker, todos, todo-search (and maybe web.py)
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=30)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    try:
        check_stopped(workdir, demo.returncode, "".join(output) + rest)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def check_stopped(workdir: str, returncode: int, rest: str) -> None:
    assert returncode == 130, rest
    assert "interrupted: stopping everything" in rest
    wait_for(lambda: not processes_using(workdir), timeout=5, what="the demo's processes to exit")
    # The services were stopped (Ctrl-C, no traceback anywhere) before the broker.
    logs = {p.name: p.read_text() for p in Path(workdir).glob("*.log")}
    assert not [name for name, text in logs.items() if "Traceback" in text]
    events = [json.loads(line) for line in logs["broker.log"].splitlines() if line.startswith("{")]
    services = [i for i, e in enumerate(events) if e["event"] == "service deregistered"
                and e["role"] in ("todos", "todo-search")]
    assert len(services) == 2
    assert [e["event"] for e in events].index("broker stopping") > max(services)


@pytest.mark.skipif(importlib.util.find_spec("trustme") is None, reason="--secure needs trustme (pip install trustme)")
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="checks leftover processes through /proc")
def test_the_secure_demo_runs_every_part_with_tokens_and_tls():
    before = {p.name: p.read_bytes() for p in (ROOT / "config").glob("*.yml")}
    result = subprocess.run([*DEMO, "--secure", "--keep", "--pause", "0.5"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    workdir = Path(workdir_of(result.stdout))
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        out = lines(result.stdout)
        assert out[1].startswith("Auth and TLS are on (--secure): the broker runs with --require-auth")
        assert re.fullmatch(r"broker listening on wss://127\.0\.0\.1:\d+/services", out[index(out, "broker listening")])
        check_parts_one_and_two(out)
        check_part_three(out[index(out, "=== Part 3"):])
        assert "everything stopped" in out and out[-2].startswith("Done:")

        events = [json.loads(line) for line in (workdir / "broker.log").read_text().splitlines()
                  if line.startswith("{")]
        listening = [e for e in events if e["event"] == "broker listening"]
        assert len(listening) == 3  # one per part
        assert all(e["tls"] == "client certificates required" and e["open_roles"] == [] for e in listening)
        assert [Path(e["config_source"]).parent for e in listening] == [workdir / "secure"] * 3
        # Every role has a tokenSha256 in the copies; config/ is unchanged.
        copies = [yaml.safe_load(p.read_text())
                  for p in (workdir / "secure").glob("*.yml")]
        assert len(copies) == 3 and all("tokenSha256" in entry for c in copies for entry in c.values())
        assert {p.name: p.read_bytes() for p in (ROOT / "config").glob("*.yml")} == before
        # Nothing was refused on the way: every service and the demo's https calls had their credentials.
        assert not [e for e in events if e["event"] in (
            "registration refused", "tls handshake failed", "operator request refused")]
        assert processes_using(str(workdir)) == []
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_the_demo_says_where_it_looked_for_the_examples(tmp_path):
    result = subprocess.run([*DEMO, "--root", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "needs the examples of a source checkout" in result.stderr and str(tmp_path) in result.stderr


def test_secure_without_trustme_says_how_to_install_it():
    code = ("import sys; sys.modules['trustme'] = None; from exocom.cli.demo import run; "
            "sys.exit(run(['--secure']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2 and "pip install trustme" in result.stderr
    assert "work directory" not in result.stdout
