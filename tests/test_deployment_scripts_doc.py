"""The documentation's code runs as written. docs/DEPLOYMENT_SCRIPTS.md shows
the wire frames of a deployment script for people who write one in another
language: replay them against the real broker, in order, and check that the
broker sends what the page says. The README's service, client and deployment
script run as processes next to a real broker and the services the README
says to start; the ledger is then reset as docs/OPERATING.md says."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
import yaml

from exocom.relay import open_relay
from processes import ROOT, BrokerProcess, wait_for
from wire import running_broker

DOC = ROOT / "docs" / "DEPLOYMENT_SCRIPTS.md"
SCRIPT = "todo-search-deployment"


def documented_frames() -> list[dict]:
    section = DOC.read_text().split("## The same script on the wire", 1)[1]
    frames = [json.loads(block) for block in re.findall(r"```json\n(.*?)\n```", section, re.S)]
    # The -failed frame is the alternative to the -done above it, not part of the sequence.
    return [f for f in frames if not f["name"].endswith("-failed")]


def test_the_documented_frames_are_a_whole_deployment_in_order():
    names = [f["name"] for f in documented_frames()]
    prefix = "deployment-todo-search-0.0.1"
    assert names == ["exocom.register-service", f"{prefix}-offline-start", f"{prefix}-offline-done",
                     f"{prefix}-online-start", "todos.list", "todos.listing", "todo-search.add",
                     "todo-search.added", f"{prefix}-online-done"]


async def test_replaying_the_script_frames_gets_the_documented_broker_frames(tmp_path):
    routes = yaml.safe_load((ROOT / "config" / "todo-app.yml").read_text())
    async with running_broker(routes, tmp_path) as broker:
        async def answering(role, version, name, answer, *, task_status=trio.TASK_STATUS_IGNORED):
            async with open_relay(broker.url, role, version) as relay:
                @relay.handler(name)
                async def handle(message):
                    await message.reply(*answer(message))
                task_status.started()
                await trio.sleep_forever()

        async with trio.open_nursery() as services:
            await services.start(answering, "todos", "1.0.0", "todos.list",
                                 lambda m: ("todos.listing", [{"id": 1, "title": "buy milk"}]))
            await services.start(answering, "todo-search", "0.0.1", "todo-search.add",
                                 lambda m: ("todo-search.added", {"id": m.payload["id"]}))
            async with broker.service(SCRIPT, register=False) as script:
                actual: dict[str, str] = {}  # documented id -> the id the broker used
                for frame in documented_frames():
                    if frame.get("sender") == SCRIPT:
                        out = {k: actual.get(v, v) if k in ("activityId", "responseTo") else v
                               for k, v in frame.items()}
                        await script.send_raw(json.dumps(out))
                        continue
                    got = await script.receive()
                    assert got["name"] == frame["name"]
                    assert set(got) == set(frame), f"{frame['name']}: fields {sorted(got)} != {sorted(frame)}"
                    assert got["payload"] == frame["payload"] and got["sender"] == frame["sender"]
                    if "responseTo" in frame:
                        assert got["responseTo"] == frame["responseTo"]  # the id the script chose
                    if frame["activityId"] not in actual:
                        actual[frame["activityId"]] = got["activityId"]
                    assert got["activityId"] == actual[frame["activityId"]]
                    actual[frame["id"]] = got["id"]
                with trio.fail_after(5):
                    while not broker.broker.deployments_json()[0]["finished"]:
                        await trio.sleep(0.01)
            services.cancel_scope.cancel()


# ------------------------------------------------------------------- README

README = ROOT / "README.md"
OPERATING = ROOT / "docs" / "OPERATING.md"
DOC_URL = "ws://127.0.0.1:4100/services"


def section(doc, title: str) -> str:
    return doc.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def code_blocks(text: str, language: str) -> list[str]:
    # Blocks in a list item are indented like the item's text.
    return [textwrap.dedent(block) for _, block in
            re.findall(rf"^( *)```{language}\n(.*?)\n\1```", text, re.S | re.M)]


class Stack:
    """The processes the README tells a reader to start, here with the broker on a free port."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.broker = BrokerProcess(tmp_path)
        self.processes: list[subprocess.Popen] = []
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("EXOCOM_") or k == "EXOCOM_TOKEN"},
                    "EXOCOM_URL": self.broker.url}

    def instances(self) -> int:
        return sum(c["instances"] for c in (self.broker.get("/config.json") or {"clients": []})["clients"])

    def argv(self, command: str) -> list[str]:
        program, *args = shlex.split(command)
        program = {".venv/bin/python": sys.executable}[program]
        return [program, *(str(ROOT / a) if a.startswith("examples/") else a for a in args)]

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=self.dir, timeout=60)

    def start(self, argv: list[str]) -> subprocess.Popen:
        """Start a service and wait until it is registered."""
        before = self.instances()
        with open(self.dir / "services.log", "a") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.dir)
        self.processes.append(process)
        wait_for(lambda: process.poll() is not None or self.instances() > before, what=f"{argv[1:]} to register")
        assert process.poll() is None, (self.dir / "services.log").read_text()
        return process

    def snippet(self, name: str, code: str) -> list[str]:
        assert DOC_URL in code
        path = self.dir / name
        path.write_text(code.replace(DOC_URL, self.broker.url))
        return [sys.executable, str(path)]

    def stop(self, process: subprocess.Popen) -> None:
        process.terminate()
        process.wait(timeout=10)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                self.stop(process)
        self.broker.stop()


@pytest.fixture
def stack(tmp_path):
    stack = Stack(tmp_path)
    try:
        yield stack
    finally:
        stack.close()


def test_the_readme_service_and_deployment_script_run_as_written_and_starting_over_runs_it_again(stack):
    service, client = code_blocks(section(README, "Write a service"), "python")
    script_section = section(README, "Write a deployment script")
    [commands] = code_blocks(script_section, "sh")
    [script] = code_blocks(script_section, "python")
    [start_over] = code_blocks(section(OPERATING, "Starting over: a fresh ledger"), "sh")

    commands = commands.splitlines()
    assert commands[0] == ".venv/bin/exocom serve"  # the default routing: BrokerProcess adds port and state dir
    stack.broker.start()

    # Write a service: the service, and the client that asks it.
    todos_service = stack.start(stack.snippet("todos_service.py", service))
    asked = stack.run(stack.snippet("client.py", client))
    assert asked.returncode == 0, asked.stderr
    documented = re.search(r"print\(listing\.payload\)\s+# (.*)", client).group(1)
    assert asked.stdout.splitlines()[-1] == documented  # after the relay's log lines
    stack.stop(todos_service)
    stack.broker.wait_deregistered("todos")

    # Write a deployment script: the services it needs, started as the README says, then the script.
    for command in commands[1:]:
        argv = stack.argv(command)
        if argv[1].endswith("web.py"):
            added = stack.run(argv)
            assert added.returncode == 0, added.stderr
        else:
            stack.start(argv)
    assert stack.broker.deployment("todo-search", "0.0.1")["state"] == "held"
    stack.start(stack.snippet("deployment_script.py", script))

    def finished():
        return (stack.broker.deployment("todo-search", "0.0.1") or {}).get("finished")
    wait_for(finished, timeout=30, what="the deployment to finish")
    found = stack.run(stack.argv(".venv/bin/python examples/todo_app/web.py search milk"))
    assert found.returncode == 0 and [t["title"] for t in json.loads(found.stdout)] == ["buy milk"], found

    # Starting over: stop the broker, reset the ledger as docs/OPERATING.md says, start it again.
    stack.broker.stop()
    program, *args = shlex.split(start_over)
    assert program == "exocom"
    args = [a.replace("~/.local/state/exocom", str(stack.broker.state_dir)) for a in args]
    reset = stack.run([str(Path(sys.executable).parent / "exocom"), *args])
    assert reset.returncode == 0, reset.stderr
    assert not (stack.broker.state_dir / "ledger.sqlite3").exists()
    stack.broker.start()
    # The services and the script reconnect by themselves; the deployment runs again from its first step.
    wait_for(finished, timeout=30, what="the deployment to finish again")
    finishes = [e for e in stack.broker.events() if e["event"] == "deployment finished"]
    assert len(finishes) == 2
    assert [s["attempts"] for s in stack.broker.deployment("todo-search", "0.0.1")["steps"]] == [1, 1]


def test_the_readme_rollout_declaration_is_accepted_as_written(tmp_path):
    """The README's `rollout` example, put in place of the demo's (config/todo-app-v3.yml)."""
    [declaration] = code_blocks(section(README, "Roll out gradually"), "yaml")
    routes = yaml.safe_load((ROOT / "config" / "todo-app-v3.yml").read_text())
    routes.update(yaml.safe_load(declaration))
    path = tmp_path / "routes.yml"
    path.write_text(yaml.safe_dump(routes))
    result = subprocess.run([sys.executable, "-m", "exocom", "check-config", str(path)], capture_output=True,
                            text=True, timeout=30)
    assert (result.returncode, result.stdout.strip()) == (0, f"{path}: OK (no problems)"), result.stdout + result.stderr
    assert routes["todo-search-0.0.2-deployment"]["rollout"]["gates"]["maxReplyTimeRatio"] == 1.5
