"""The broker remembers (contract section 6), tested the hard way: `exocom
serve` as a subprocess, killed with SIGKILL at each step boundary and started
again on the same port with the same --state-dir. The services and the
deployment script are `exocom.relay` clients in the test process; they
reconnect by themselves when the broker is back. `exocom deployments` reads
and re-arms the ledger while the broker is down."""

from __future__ import annotations

import json
import os
import signal
import sqlite3

import pytest
import trio

from fleet import (EXOCOM, FAST, NEW, OLD, ScriptLog, ask, deployment, deployment_script, failure_recorded, handlers,
                   routes, steps,
                   todos, todos_states, wait_connected, wait_deployment, web)
from processes import BrokerProcess, broker_with_config

from exocom.relay import open_relay

CANARY = "3.0.0"
ROUTES = {**routes(), "canary-deployment": {"deploys": f"todos@{CANARY}"}}


@pytest.fixture
def broker(tmp_path):
    with broker_with_config(tmp_path, ROUTES) as process:
        yield process


async def start(broker: BrokerProcess) -> None:
    await trio.to_thread.run_sync(broker.start)


async def crash(broker: BrokerProcess) -> None:
    assert await trio.to_thread.run_sync(broker.kill) == -signal.SIGKILL


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EXOCOM_") and k not in ("SERVICE_DATA", "PORT")}


async def exocom_deployments(broker: BrokerProcess, *args: str) -> tuple[int, str, str]:
    command = [*EXOCOM, "deployments", *args, "--state-dir", str(broker.state_dir), "--config", str(broker.config)]
    with trio.fail_after(20):
        result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False, env=cli_env())
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_offline_step_started_but_not_answered_starts_again_after_a_crash(broker):
    await start(broker)
    first_running, finish_first, second_running, release_second = (trio.Event() for _ in range(4))
    calls = []

    async def offline(relay):
        calls.append("offline")
        if len(calls) == 1:
            first_running.set()
            await finish_first.wait()  # the broker dies meanwhile
        else:
            second_running.set()
            await release_second.wait()

    log = ScriptLog()
    old_got, new_got = [], []
    async with todos(broker.url, OLD, old_got), web(broker.url) as client, todos(broker.url, NEW, new_got), \
            deployment_script(broker.url, log, offline=offline) as script:
        with trio.fail_after(5):
            await first_running.wait()
        assert steps(await deployment(broker.port)) == {"offline": ("started", 1), "online": ("pending", 0)}
        await crash(broker)
        await start(broker)

        await log.wait_starts(2)
        assert log.starts == [("offline", 1), ("offline", 2)]
        await wait_connected(broker.port, OLD, NEW)
        d = await deployment(broker.port)
        assert steps(d) == {"offline": ("started", 2), "online": ("pending", 0)}
        assert (d["state"], d["inFlight"]) == ("held", "offline")
        assert await todos_states(broker.port) == {NEW: "held", OLD: "live"}
        assert await ask(client, "held-after-restart") == OLD

        # The run of attempt 1 ends now, after its connection was lost: its
        # outcome settles nothing, attempt 2 is still in flight.
        finish_first.set()
        with trio.fail_after(5):
            await second_running.wait()
        assert (await script.request("todos.list", {"tag": "barrier"})).payload["version"] == NEW
        d = await deployment(broker.port)
        assert (d["state"], d["inFlight"]) == ("held", "offline")

        release_second.set()
        d = await wait_deployment(broker.port, lambda d: d["finished"], "the deployment to finish")
        assert steps(d) == {"offline": ("done", 2), "online": ("done", 1)}
        assert log.starts == [("offline", 1), ("offline", 2), ("online", 1)]
        assert await ask(client, "finished") == NEW
        assert new_got == ["barrier", "finished"]


async def test_an_answer_not_yet_on_disk_when_the_broker_died_is_asked_for_again(broker):
    await start(broker)
    release_first = trio.Event()
    calls = []

    async def offline(relay):
        calls.append("offline")
        if len(calls) == 1:
            await release_first.wait()

    log = ScriptLog()
    async with todos(broker.url, OLD, []), web(broker.url) as client, todos(broker.url, NEW, []), \
            deployment_script(broker.url, log, offline=offline):
        await log.wait_starts(1)
        # Another writer holds the ledger's write lock: the record of
        # offline-done cannot be written before the broker dies.
        blocker = sqlite3.connect(broker.state_dir / "ledger.sqlite3", isolation_level=None, timeout=0)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            release_first.set()
            d = await wait_deployment(broker.port, lambda d: d["inFlight"] is None, "the answer to be taken")
            assert d["state"] == "held"
            assert await ask(client, "not-yet-durable") == OLD
            await crash(broker)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await start(broker)

        d = await wait_deployment(broker.port, lambda d: d["finished"], "the deployment to finish")
        assert steps(d) == {"offline": ("done", 2), "online": ("done", 1)}
        assert log.starts == [("offline", 1), ("offline", 2), ("online", 1)]
        assert calls == ["offline", "offline"]
        await wait_connected(broker.port, OLD, NEW)
        assert await ask(client, "finished") == NEW


async def test_online_step_started_but_not_answered_a_live_version_stays_live_after_a_crash(broker):
    await start(broker)
    first_online = trio.Event()
    calls = []

    async def offline(relay):
        calls.append("offline")

    async def online(relay):
        calls.append("online")
        if calls.count("online") == 1:
            first_online.set()
            await trio.sleep_forever()

    log = ScriptLog()
    old_got, new_got = [], []
    async with todos(broker.url, OLD, old_got), web(broker.url) as client, todos(broker.url, NEW, new_got):
        async with deployment_script(broker.url, log, offline=offline, online=online):
            with trio.fail_after(5):
                await first_online.wait()
            d = await deployment(broker.port)
            assert steps(d) == {"offline": ("done", 1), "online": ("started", 1)}
            assert d["state"] == "live"
            await crash(broker)
            # The script goes away while the broker is down (without answering),
            # so that after the restart only the ledger can make 2.0.0 live.
            log.abandon()

        await start(broker)
        await wait_connected(broker.port, OLD, NEW, roles=("web",))
        assert await todos_states(broker.port) == {NEW: "live", OLD: "draining"}
        assert await ask(client, "after-restart") == NEW
        assert await ask(client, "pinned-1", version="1") == OLD
        d = await deployment(broker.port)
        assert steps(d) == {"offline": ("done", 1), "online": ("started", 1)}
        assert (d["state"], d["inFlight"], d["finished"]) == ("live", None, False)

        async with deployment_script(broker.url, log, offline=offline, online=online):
            d = await wait_deployment(broker.port, lambda d: d["finished"], "the deployment to finish")
        assert steps(d) == {"offline": ("done", 1), "online": ("done", 2)}
        assert log.starts == [("offline", 1), ("online", 1), ("online", 2)]
        assert calls == ["offline", "online", "online"]
        assert new_got == ["after-restart"]


async def test_a_finished_deployment_starts_nothing_after_a_crash(broker):
    await start(broker)
    log = ScriptLog()
    old_got, new_got = [], []

    async def step(relay):
        pass

    async with todos(broker.url, OLD, old_got), web(broker.url) as client, todos(broker.url, NEW, new_got), \
            deployment_script(broker.url, log, offline=step, online=step) as script:
        before = await wait_deployment(broker.port, lambda d: d["finished"], "the deployment to finish")
        assert steps(before) == {"offline": ("done", 1), "online": ("done", 1)}
        await crash(broker)
        await start(broker)
        await wait_connected(broker.port, OLD, NEW)
        assert await todos_states(broker.port) == {NEW: "live", OLD: "draining"}
        assert await ask(client, "after-restart") == NEW

        # A canary: a second deployment whose pair connects only now. The ledger
        # writes one record at a time, in order, so once the canary's step has
        # started, any step the broker wrongly started for 2.0.0 when its pair
        # registered would already show.
        canary_started = trio.Event()

        async def canary_start(message):
            canary_started.set()

        setup = handlers(**{f"deployment-todos-{CANARY}-offline-start": canary_start})
        async with todos(broker.url, CANARY, []), open_relay(broker.url, "canary-deployment", setup=setup, **FAST):
            with trio.fail_after(5):
                await canary_started.wait()
        after = await deployment(broker.port)
        assert after == before
        assert log.starts == [("offline", 1), ("online", 1)]
        assert (await script.request("todos.list", {"tag": "script"})).payload["version"] == NEW
        assert new_got == ["after-restart", "script"]


async def test_exocom_deployments_lists_and_rearms_the_ledger_while_the_broker_is_down(broker):
    await start(broker)
    calls = []

    async def online(relay):
        calls.append("online")
        if len(calls) == 1:
            raise RuntimeError("index unreachable")

    log = ScriptLog()
    async with todos(broker.url, OLD, []), web(broker.url) as client, todos(broker.url, NEW, []), \
            deployment_script(broker.url, log, online=online):
        await wait_deployment(broker.port, failure_recorded, "the online step to fail")
        await crash(broker)

        code, out, err = await exocom_deployments(broker)
        assert code == 0, err
        [row] = [line for line in out.splitlines() if line.startswith(f"todos@{NEW} ")]
        assert row.split()[:7] == [f"todos@{NEW}", "todos-deployment", "failed", "done", "(1x)", "failed", "(1x)"]
        assert row.endswith("RuntimeError: index unreachable")
        [canary_row] = [line for line in out.splitlines() if line.startswith(f"todos@{CANARY} ")]
        assert canary_row.split()[2:7] == ["held", "pending", "(0x)", "pending", "(0x)"]

        code, out, err = await exocom_deployments(broker, "list", "--json")
        assert code == 0, err
        listed = {d["version"]: d for d in json.loads(out)["deployments"]}
        assert listed[NEW]["state"] == "failed"
        assert steps(listed[NEW]) == {"offline": ("done", 1), "online": ("failed", 1)}
        assert listed[NEW]["steps"][1]["lastError"] == "RuntimeError: index unreachable"

        down = ("--url", f"http://127.0.0.1:{broker.port}")
        code, out, err = await exocom_deployments(broker, "retry", "todos@9.9.9", *down)
        assert code == 1 and "todos@9.9.9" in err
        code, out, err = await exocom_deployments(broker, "retry", f"todos@{CANARY}", *down)
        assert code == 1 and "no failed step" in err
        code, out, err = await exocom_deployments(broker, "retry", f"todos@{NEW}", *down)
        assert code == 0, err
        assert "re-armed in the ledger" in out

        code, out, err = await exocom_deployments(broker, "--json")
        listed = {d["version"]: d for d in json.loads(out)["deployments"]}
        assert listed[NEW]["state"] == "live"
        assert steps(listed[NEW]) == {"offline": ("done", 1), "online": ("pending", 1)}

        await start(broker)
        d = await wait_deployment(broker.port, lambda d: d["finished"], "the re-armed step to run")
        assert steps(d) == {"offline": ("done", 1), "online": ("done", 2)}
        assert log.starts == [("offline", 1), ("online", 1), ("online", 2)]
        assert calls == ["online", "online"]
        await wait_connected(broker.port, OLD, NEW)
        assert await ask(client, "finished") == NEW
async def test_closing_a_relay_while_the_broker_is_down_does_not_wait_for_running_handlers(broker):
    await start(broker)
    handling = trio.Event()
    async with web(broker.url) as client:
        with trio.move_on_after(2) as waited:
            async with open_relay(broker.url, "todos", OLD, **FAST) as service:
                @service.handler("todos.list")
                async def slow(message):
                    handling.set()
                    await trio.sleep_forever()

                await client.send("todos.list", {})
                with trio.fail_after(5):
                    await handling.wait()
                await crash(broker)
                # Until the relay noticed and is between attempts to reconnect.
                with trio.fail_after(5):
                    while service.online:
                        await trio.sleep(0.01)
                await trio.sleep(0.05)
        assert not waited.cancelled_caught, "leaving open_relay's block did not return within 2s"
