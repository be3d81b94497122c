"""Gradual rollouts end to end: a real `exocom serve`, real WebSocket clients,
steady traffic from `web` while todos 2.0.0 ramps beside 1.0.0 (issue 9)."""

from __future__ import annotations

import json
from collections import Counter
from contextlib import asynccontextmanager

import pytest
import trio

from exocom.relay import Message, RelayError, open_relay
from fleet import FAST, NEW, OLD, ScriptLog, deployment_script, handlers, routes, todos, wait_until, web
from processes import BrokerProcess

GATES = {"minSamples": 10, "errorMessages": ["todos.failed"], "maxErrorRate": 0.2}
ROLLOUT = {"steps": [10, 50, 100], "interval": 1.5, "gates": GATES}


def rollout_routes() -> dict:
    out = routes(rollout=ROLLOUT)
    out["todos"]["sends"].append("todos.failed")
    out["web"]["receives"].append("todos.failed")
    return out


@pytest.fixture
def broker(tmp_path):
    config = tmp_path / "routes.json"
    config.write_text(json.dumps(rollout_routes()))
    process = BrokerProcess(tmp_path, "--config", str(config), "--drain-period", "1")
    try:
        yield process
    finally:
        process.stop()


@asynccontextmanager
async def faulty_todos(url: str):
    """todos 2.0.0 that answers every request with an error."""
    async def failing(message: Message) -> None:
        await message.reply("todos.failed", {"version": NEW})

    async with open_relay(url, "todos", NEW, setup=handlers(**{"todos.list": failing}), **FAST) as relay:
        yield relay


async def deployment(broker: BrokerProcess) -> dict:
    return await trio.to_thread.run_sync(broker.deployment, "todos", NEW)


class Traffic:
    """`web` asks todos.list in a loop, a new activity each time; every answer
    is counted by the version that gave it and the ramp step in force."""

    def __init__(self, broker: BrokerProcess) -> None:
        self.broker = broker
        self.step: int | None = None
        self.by_step: dict[int | None, Counter] = {}
        self.answers = 0

    async def run(self, relay, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_step)
            while True:
                step = self.step
                answer = await relay.request("todos.list", {}, timeout=5)
                if step == self.step:  # an answer that straddled a step change is not counted
                    self.by_step.setdefault(step, Counter())[answer.payload["version"]] += 1
                self.answers += 1
                await trio.sleep(0.004)

    async def _follow_step(self) -> None:
        while True:
            d = await deployment(self.broker)
            self.step = d["rollout"]["step"] if d and d["state"] == "ramping" else None
            await trio.sleep(0.05)

    def observed_share(self, step: int) -> tuple[float, int]:
        counts = self.by_step.get(step, Counter())
        total = sum(counts.values())
        return (100 * counts[NEW] / total if total else 0.0), total


async def wait_state(broker: BrokerProcess, condition, what: str, timeout: float = 30.0) -> dict:
    async def check():
        d = await deployment(broker)
        return d if d and condition(d) else None
    return await wait_until(check, what, timeout=timeout, interval=0.05)


async def test_a_version_ramps_10_50_100_under_traffic_with_the_configured_shares(broker):
    await trio.to_thread.run_sync(broker.start)
    traffic = Traffic(broker)
    async with todos(broker.url, OLD, []), todos(broker.url, NEW, []), web(broker.url) as client:
        async with trio.open_nursery() as nursery:
            await nursery.start(traffic.run, client)
            async with deployment_script(broker.url, ScriptLog()):
                d = await wait_state(broker, lambda d: d["state"] == "live", "the ramp to reach 100 %")
            config = await trio.to_thread.run_sync(broker.get, "/config.json")
            listing = await trio.to_thread.run_sync(broker.get, "/deployments")
            nursery.cancel_scope.cancel()
    assert d["finished"] and d["share"] == 100
    states = {v["version"]: v["state"] for c in config["clients"] if c["role"] == "todos" for v in c["versions"]}
    assert states[NEW] == "live" and states[OLD] in ("draining", "drained")
    assert {v["version"]: v["state"] for v in listing["versions"]["todos"]} == states
    for step, share in enumerate(ROLLOUT["steps"][:-1]):
        observed, total = traffic.observed_share(step)
        # Binomial spread of a few hundred activities: within 10 points of the configured share.
        assert total >= 100, f"step {step}: only {total} answers"
        assert abs(observed - share) <= 10, f"step {step}: {observed:.1f} % of {total} answers against {share} %"
    events = [e for e in broker.events() if e["event"].startswith("rollout ")]
    assert [e["event"] for e in events] == ["rollout started", "rollout stepped up", "rollout stepped up",
                                            "rollout finished"]
    assert [e["share"] for e in events[1:3]] == [50, 100]
    assert events[1]["figures"]["replies"] >= GATES["minSamples"]


async def test_a_faulty_version_is_aborted_at_its_first_step_and_traffic_returns_to_the_stable_one(broker):
    await trio.to_thread.run_sync(broker.start)
    async with todos(broker.url, OLD, []), faulty_todos(broker.url), web(broker.url) as client:
        async with deployment_script(broker.url, ScriptLog()):
            await wait_state(broker, lambda d: d["state"] == "ramping", "the ramp to start")
            errors = 0
            with trio.fail_after(30):
                while (await deployment(broker))["state"] == "ramping":
                    answer = await client.request("todos.list", {}, timeout=5)
                    errors += answer.name == "todos.failed"
            d = await wait_state(broker, lambda d: d["stopped"] is not None, "the abort to be recorded")
            after = Counter()
            for _ in range(100):
                after[(await client.request("todos.list", {}, timeout=5)).payload["version"]] += 1
    assert d["state"] == "failed" and d["rollout"]["step"] == 0
    assert d["stopped"].startswith("gate errorRate failed")
    assert errors >= GATES["minSamples"]
    assert after == Counter({OLD: 100})
    [aborted] = [e for e in broker.events() if e["event"] == "rollout aborted"]
    assert aborted["gate"] == "errorRate" and aborted["figures"]["errorRate"] > GATES["maxErrorRate"]
    assert aborted["figures"]["replies"] >= GATES["minSamples"]


async def test_after_kill_9_the_ramp_goes_on_at_its_recorded_step(broker):
    await trio.to_thread.run_sync(broker.start)
    async with todos(broker.url, OLD, []), todos(broker.url, NEW, []), web(broker.url) as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_keep_asking, client)
            async with deployment_script(broker.url, ScriptLog()):
                await wait_state(broker, lambda d: d["rollout"]["step"] == 1, "the second step")
                status = await trio.to_thread.run_sync(broker.post, f"/deployments/todos@{NEW}/rollout/pause")
                assert status == 202
                await wait_state(broker, lambda d: d["rollout"]["paused"], "the pause to be recorded")
                assert await trio.to_thread.run_sync(broker.kill) == -9
                await trio.to_thread.run_sync(broker.start)
                d = await wait_state(broker, lambda d: d["state"] == "ramping", "the ramp after the restart")
                assert (d["rollout"]["step"], d["share"], d["rollout"]["paused"]) == (1, 50, True)
                status = await trio.to_thread.run_sync(broker.post, f"/deployments/todos@{NEW}/rollout/resume")
                assert status == 202
                d = await wait_state(broker, lambda d: d["state"] == "live", "the ramp to finish after the restart")
            nursery.cancel_scope.cancel()
    assert d["rollout"]["step"] == 2 and d["finished"]


async def _keep_asking(client) -> None:
    while True:
        try:
            await client.request("todos.list", {}, timeout=5)
        except RelayError:  # the broker is being killed and restarted: the relay reconnects
            await trio.sleep(0.05)
        await trio.sleep(0.005)
