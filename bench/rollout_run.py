"""A gradual rollout from a real run, for the record: a real `exocom serve`,
todos 1.0.0 and 2.0.0 and a deployment script on the Python relay, and
`web` asking steadily on a new activity each time.

Part 1 ramps 2.0.0 through 5 -> 25 -> 50 -> 100 %, printing the observed
share of answers per step against the configured one, `exocom status` and
`exocom rollout todos@2.0.0` during the ramp, and the broker's rollout log
lines. Part 2 deploys a faulty 2.0.1 that answers with errors: the error-rate
gate aborts it at its first step; its log line and the traffic after it are
printed.

    .venv/bin/python bench/rollout_run.py [--interval SECONDS]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from functools import partial
from collections import Counter
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from exocom.relay import DeploymentScript, Message, open_relay  # noqa: E402
from processes import BrokerProcess  # noqa: E402

STEPS = [5, 25, 50, 100]
GATES = {"minSamples": 20, "errorMessages": ["todos.failed"], "maxErrorRate": 0.05}


def routes(interval: float) -> dict:
    rollout = {"steps": STEPS, "interval": interval, "gates": GATES}
    return {
        "web": {"sends": ["todos.list"], "receives": ["todos.listing", "todos.failed"]},
        "todos": {"receives": ["todos.list"], "sends": ["todos.listing", "todos.failed"]},
        "todos-2.0.0-deployment": {"deploys": "todos@2.0.0", "rollout": rollout},
        "todos-2.0.1-deployment": {"deploys": "todos@2.0.1", "rollout": rollout},
    }


async def todos(url: str, version: str, *, faulty: bool = False, task_status=trio.TASK_STATUS_IGNORED):
    async def answer(message: Message) -> None:
        await message.reply("todos.failed" if faulty else "todos.listing", {"version": version})

    async with open_relay(url, "todos", version, setup=lambda r: r.handler("todos.list")(answer)):
        task_status.started()
        await trio.sleep_forever()


async def script(url: str, version: str, *, task_status=trio.TASK_STATUS_IGNORED):
    deployment = DeploymentScript("todos", version)
    async with open_relay(url, f"todos-{version}-deployment", setup=deployment.attach):
        task_status.started()
        await trio.sleep_forever()


def exocom(broker: BrokerProcess, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "exocom", *args, "--url", broker.http],
                            capture_output=True, text=True, timeout=30)
    return result.stdout + result.stderr


async def main(interval: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "routes.json"
        config.write_text(json.dumps(routes(interval)))
        broker = BrokerProcess(Path(tmp), "--config", str(config))
        await trio.to_thread.run_sync(broker.start)
        try:
            await run(broker)
        finally:
            broker.stop()
        print("\n== the broker's rollout log lines")
        for event in broker.events():
            if event["event"].startswith(("rollout ", "version ")):
                print(json.dumps(event))


async def run(broker: BrokerProcess) -> None:
    by_step: dict[str, Counter] = {}
    async with trio.open_nursery() as nursery, open_relay(broker.url, "web") as web:
        await nursery.start(todos, broker.url, "1.0.0")
        await nursery.start(todos, broker.url, "2.0.0")
        await nursery.start(script, broker.url, "2.0.0")
        shown = False
        while True:
            d = await trio.to_thread.run_sync(broker.deployment, "todos", "2.0.0")
            if d["state"] == "live":
                break
            label = f"{d['share']:g} %" if d["state"] == "ramping" else d["state"]
            for _ in range(20):
                answer = await web.request("todos.list", timeout=5)
                by_step.setdefault(label, Counter())[answer.payload["version"]] += 1
            if d["state"] == "ramping" and d["rollout"]["step"] == 1 and not shown:
                shown = True
                print("== exocom status, during the ramp\n" + await trio.to_thread.run_sync(exocom, broker, "status"))
                print("== exocom rollout todos@2.0.0\n" + await trio.to_thread.run_sync(
                    exocom, broker, "rollout", "todos@2.0.0"))
        print("== observed share of 2.0.0 per ramp step (answers to new activities)")
        print(f"{'configured':>10}  {'observed':>8}  answers")
        for label, counts in by_step.items():
            total = sum(counts.values())
            if label.endswith("%"):
                print(f"{label:>10}  {100 * counts['2.0.0'] / total:7.1f} %  {total}")

        print("\n== a faulty 2.0.1: every answer is todos.failed")
        await nursery.start(partial(todos, broker.url, "2.0.1", faulty=True))
        await nursery.start(script, broker.url, "2.0.1")
        failed_answers = Counter()
        while (await trio.to_thread.run_sync(broker.deployment, "todos", "2.0.1"))["stopped"] is None:
            answer = await web.request("todos.list", timeout=5)
            failed_answers[(answer.name, answer.payload["version"])] += 1
        after = Counter()
        for _ in range(200):
            after[(await web.request("todos.list", timeout=5)).payload["version"]] += 1
        print(f"answers while it ramped: {dict(failed_answers)}")
        print(f"the next 200 answers: {dict(after)}")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=4.0, help="seconds per ramp step (default 4)")
    trio.run(main, parser.parse_args().interval)
