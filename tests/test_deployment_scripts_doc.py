"""docs/DEPLOYMENT_SCRIPTS.md shows the wire frames of a deployment script
for people who write one in another language: replay them against the real
broker, in order, and check that the broker sends what the page says."""

from __future__ import annotations

import json
import re

import trio
import yaml

from exocom.relay import open_relay
from processes import ROOT
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
