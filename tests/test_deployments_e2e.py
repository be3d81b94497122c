"""Versioned deployments through real sockets: an in-process broker with a
real SQLite ledger (tmp_path), services and the deployment script written with
the public client `exocom.relay`, and the HTTP endpoints an operator uses.

The same logic without sockets is in test_broker_core.py; these tests check
that the shell, the ledger, the relay and DeploymentScript carry it out."""

from __future__ import annotations


import os
import sqlite3

import pytest
import trio

from fleet import (EXOCOM, NEW, OLD, PREFIX, ScriptLog, ask, deployment, deployment_script, failure_recorded, get, http,
                   routes,
                   handlers, steps, todos, todos_states, wait_deployment, web)
from processes import free_port
from wire import running_broker

from exocom.relay import open_relay


async def test_new_version_is_held_during_offline_then_serves_beside_the_old_one(tmp_path):
    offline_running, release_offline, online_running, release_online = (trio.Event() for _ in range(4))
    script_answers = []

    async def offline(relay):
        # The script talks to the version it deploys although it is held.
        script_answers.append((await relay.request("todos.list", {"tag": "script-1"})).payload["version"])
        offline_running.set()
        await release_offline.wait()
        script_answers.append((await relay.request("todos.list", {"tag": "script-2"})).payload["version"])

    async def online(relay):
        online_running.set()
        await release_online.wait()

    old_got, new_got = [], []
    log = ScriptLog()
    async with running_broker(routes(), tmp_path=tmp_path) as broker, \
            todos(broker.url, OLD, old_got), web(broker.url) as client:
        assert await ask(client, "before") == OLD
        async with todos(broker.url, NEW, new_got), \
                deployment_script(broker.url, log, offline=offline, online=online):
            with trio.fail_after(5):
                await offline_running.wait()
            assert await todos_states(broker.port) == {NEW: "held", OLD: "live"}
            d = await deployment(broker.port)
            assert (d["state"], d["inFlight"], d["finished"]) == ("held", "offline", False)
            assert steps(d) == {"offline": ("started", 1), "online": ("pending", 0)}

            # Production traffic during the offline step: all of it to 1.0.0,
            # also when it asks for version 2 (nothing live satisfies it).
            for i in range(6):
                assert await ask(client, f"held-{i}") == OLD
            await client.send("todos.list", {"tag": "pinned-2-while-held"}, version="2")
            await client.send("todos.list", {"tag": "pinned-2.0.0-while-held"}, version="2.0.0")
            assert await ask(client, "held-last") == OLD

            release_offline.set()
            # The script's second request went through 2.0.0's connection after
            # anything misrouted above, so once the offline step is done,
            # new_got holds all 2.0.0 ever received while held.
            d = await wait_deployment(broker.port, lambda d: d["state"] == "live", "2.0.0 to go live")
            assert new_got == ["script-1", "script-2"]
            assert script_answers == [NEW, NEW]
            assert not any(tag.startswith("pinned") for tag in old_got)
            assert old_got == ["before", *(f"held-{i}" for i in range(6)), "held-last"]

            with trio.fail_after(5):
                await online_running.wait()
            d = await deployment(broker.port)
            assert (d["state"], d["inFlight"], d["finished"]) == ("live", "online", False)
            assert steps(d) == {"offline": ("done", 1), "online": ("started", 1)}
            assert await todos_states(broker.port) == {NEW: "live", OLD: "draining"}

            # Live: unpinned traffic to the newest live version, pinned traffic as asked.
            for i in range(3):
                assert await ask(client, f"live-{i}") == NEW
            assert await ask(client, "pin-1", version="1") == OLD
            assert await ask(client, "pin-1.0", version="1.0") == OLD
            assert await ask(client, "pin-1.0.0", version="1.0.0") == OLD
            assert await ask(client, "pin-2", version="2") == NEW

            release_online.set()
            d = await wait_deployment(broker.port, lambda d: d["finished"], "the deployment to finish")
            assert steps(d) == {"offline": ("done", 1), "online": ("done", 1)}
            assert d["inFlight"] is None
            assert log.starts == [("offline", 1), ("online", 1)]
            assert await ask(client, "pin-1-after", version="1") == OLD
            assert await ask(client, "after") == NEW

            config = await get(broker.port, "/config.json")
            assert config["routes"]["todos-deployment"]["deploys"] == f"todos@{NEW}"
            [todos_client] = [c for c in config["clients"] if c["role"] == "todos"]
            assert todos_client["instances"] == 2
            assert todos_client["versions"] == [{"version": NEW, "state": "live", "instances": 1, "share": 100.0},
                                                {"version": OLD, "state": "draining", "instances": 1, "share": 0.0}]


async def test_the_version_goes_live_only_once_offline_done_is_on_disk(tmp_path):
    release_offline = trio.Event()

    async def offline(relay):
        await release_offline.wait()

    log = ScriptLog()
    async with running_broker(routes(), tmp_path=tmp_path) as broker, \
            todos(broker.url, OLD, []), web(broker.url) as client, todos(broker.url, NEW, []), \
            deployment_script(broker.url, log, offline=offline):
        await log.wait_starts(1)
        # Another writer holds the ledger's write lock: the broker's record of
        # offline-done waits for it.
        blocker = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None, timeout=0)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            release_offline.set()
            d = await wait_deployment(broker.port, lambda d: d["inFlight"] is None, "the answer to be taken")
            assert steps(d) == {"offline": ("started", 1), "online": ("pending", 0)}
            assert d["state"] == "held"
            assert await todos_states(broker.port) == {NEW: "held", OLD: "live"}
            for i in range(3):
                assert await ask(client, f"not-yet-durable-{i}") == OLD
            assert log.starts == [("offline", 1)]
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        d = await wait_deployment(broker.port, lambda d: d["finished"], "the deployment to finish")
        assert steps(d) == {"offline": ("done", 1), "online": ("done", 1)}
        assert await ask(client, "durable") == NEW


async def retry_over_http(port: int, tmp_path) -> None:
    status, body = await http(port, "POST", f"/deployments/todos@{NEW}/retry")
    assert (status, body) == (202, {"retrying": f"todos@{NEW}"})


async def retry_with_the_cli(port: int, tmp_path) -> None:
    # An operator's proxy settings (here: a proxy that refuses every connection)
    # must not stand between the CLI and a local broker.
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "http_proxy": dead_proxy, "HTTP_PROXY": dead_proxy, "no_proxy": "", "NO_PROXY": ""}
    result = await trio.run_process(
        [*EXOCOM, "deployments", "retry", f"todos@{NEW}", "--url", f"http://127.0.0.1:{port}",
         "--state-dir", str(tmp_path / "not-the-broker-state")],
        capture_stdout=True, capture_stderr=True, check=False, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert "retrying now on the running broker" in result.stdout.decode()


@pytest.mark.parametrize("retry", [retry_over_http, retry_with_the_cli], ids=["http", "cli"])
async def test_failed_online_step_takes_the_version_out_and_retry_reruns_only_that_step(tmp_path, retry):
    calls = {"offline": 0, "online": 0}

    async def offline(relay):
        calls["offline"] += 1

    async def online(relay):
        calls["online"] += 1
        if calls["online"] == 1:
            raise RuntimeError("search index unreachable")

    old_got, new_got = [], []
    log = ScriptLog()
    async with running_broker(routes(), tmp_path=tmp_path) as broker, \
            todos(broker.url, OLD, old_got), web(broker.url) as client, todos(broker.url, NEW, new_got), \
            deployment_script(broker.url, log, offline=offline, online=online):
        d = await wait_deployment(broker.port, failure_recorded, "the online step to fail")
        assert steps(d) == {"offline": ("done", 1), "online": ("failed", 1)}
        online_step = d["steps"][1]
        assert online_step["lastError"] == "RuntimeError: search index unreachable"
        assert online_step["endedAt"] >= online_step["startedAt"]
        assert d["inFlight"] is None and not d["finished"]
        assert await todos_states(broker.port) == {NEW: "failed", OLD: "live"}
        for i in range(4):
            assert await ask(client, f"failed-{i}") == OLD
        assert await ask(client, "failed-pinned-1", version="1") == OLD

        await retry(broker.port, tmp_path)
        d = await wait_deployment(broker.port, lambda d: d["finished"], "the retried deployment to finish")
        assert steps(d) == {"offline": ("done", 1), "online": ("done", 2)}
        assert d["state"] == "live"
        assert calls == {"offline": 1, "online": 2}
        assert log.starts == [("offline", 1), ("online", 1), ("online", 2)]
        assert await todos_states(broker.port) == {NEW: "live", OLD: "draining"}
        assert await ask(client, "after-retry") == NEW

        # Nothing left to retry, and no such deployment.
        status, body = await http(broker.port, "POST", f"/deployments/todos@{NEW}/retry")
        assert status == 409 and "no failed step" in body["error"]
        status, body = await http(broker.port, "POST", "/deployments/todos@9.9.9/retry")
        assert status == 404 and "todos@9.9.9" in body["error"]


async def test_a_step_past_its_time_limit_fails_and_a_late_answer_is_ignored(tmp_path):
    release_late, late_sent = trio.Event(), trio.Event()
    starts = []
    old_got, new_got = [], []
    async with running_broker(routes(stepTimeout=0.5), tmp_path=tmp_path) as broker, \
            todos(broker.url, OLD, old_got), web(broker.url) as client, todos(broker.url, NEW, new_got):
        async def offline_start(message):
            starts.append(message.payload["attempt"])
            if message.payload["attempt"] == 1:
                await release_late.wait()  # far past the time limit
                await message.reply(f"{PREFIX}-offline-done")
                late_sent.set()
            else:
                await message.reply(f"{PREFIX}-offline-done")

        async def online_start(message):
            starts.append(("online", message.payload["attempt"]))
            await message.reply(f"{PREFIX}-online-done")

        setup = handlers(**{f"{PREFIX}-offline-start": offline_start, f"{PREFIX}-online-start": online_start})
        async with open_relay(broker.url, "todos-deployment", setup=setup) as script:
            d = await wait_deployment(broker.port, lambda d: steps(d)["offline"][0] == "failed", "the time limit", timeout=5)
            assert d["stepTimeout"] == 0.5
            offline_step = d["steps"][0]
            assert steps(d) == {"offline": ("failed", 1), "online": ("pending", 0)}
            assert "time limit" in offline_step["lastError"] and "0.5" in offline_step["lastError"]
            # The per-deployment limit applied, not the broker's default of 300s.
            assert 0.5 <= offline_step["endedAt"] - offline_step["startedAt"] < 5
            assert await todos_states(broker.port) == {NEW: "failed", OLD: "live"}
            assert await ask(client, "after-timeout") == OLD

            release_late.set()
            with trio.fail_after(5):
                await late_sent.wait()
            # The broker reads a connection's frames in order: once this request is
            # answered, the late offline-done has been handled.
            answer = await script.request("todos.list", {"tag": "script-barrier"})
            assert answer.payload["version"] == NEW
            d = await deployment(broker.port)
            assert steps(d) == {"offline": ("failed", 1), "online": ("pending", 0)}
            assert d["state"] == "failed" and d["inFlight"] is None
            assert await ask(client, "after-late-answer") == OLD
            assert new_got == ["script-barrier"]
            # Had the late answer been taken, the retry would be refused (busy
            # writing, or nothing failed): it is accepted and runs attempt 2.
            status, body = await http(broker.port, "POST", f"/deployments/todos@{NEW}/retry")
            assert status == 202, body
            d = await wait_deployment(broker.port, lambda d: d["finished"], "the retried deployment")
            assert steps(d) == {"offline": ("done", 2), "online": ("done", 1)}
            assert starts == [1, 2, ("online", 1)]
            assert await ask(client, "finished") == NEW


async def test_a_script_that_disconnects_mid_step_gets_the_step_again_when_it_returns(tmp_path):
    first_started = trio.Event()

    async def never_answers(relay):
        first_started.set()
        await trio.sleep_forever()

    async def answers(relay):
        pass

    old_got, new_got = [], []
    first, second = ScriptLog(), ScriptLog()
    async with running_broker(routes(), tmp_path=tmp_path) as broker, \
            todos(broker.url, OLD, old_got), web(broker.url) as client, todos(broker.url, NEW, new_got):
        async with deployment_script(broker.url, first, offline=never_answers):
            with trio.fail_after(5):
                await first_started.wait()
            d = await deployment(broker.port)
            assert d["inFlight"] == "offline"
        # The script is gone without answering: the step is no longer in flight,
        # it is still started (attempt 1) and the version stays held.
        d = await wait_deployment(broker.port, lambda d: d["inFlight"] is None, "the broker to notice")
        assert steps(d) == {"offline": ("started", 1), "online": ("pending", 0)}
        assert d["state"] == "held"
        assert await ask(client, "script-away") == OLD
        assert first.starts == [("offline", 1)]

        async with deployment_script(broker.url, second, offline=answers):
            d = await wait_deployment(broker.port, lambda d: d["finished"], "the deployment to finish")
            assert second.starts == [("offline", 2), ("online", 1)]
            assert steps(d) == {"offline": ("done", 2), "online": ("done", 1)}
            assert await ask(client, "finished") == NEW
        assert new_got == ["finished"]
        assert first.starts == [("offline", 1)]


async def test_a_late_answer_to_an_earlier_attempt_does_not_settle_the_running_attempt(tmp_path):
    release_late, late_sent, second_running, release_second = (trio.Event() for _ in range(4))
    async with running_broker(routes(stepTimeout=1), tmp_path=tmp_path) as broker, todos(broker.url, NEW, []):
        async def offline_start(message):
            if message.payload["attempt"] == 1:
                await release_late.wait()
                await message.reply(f"{PREFIX}-offline-failed", {"reason": "stale answer of attempt 1"})
                late_sent.set()
            else:
                second_running.set()
                await release_second.wait()
                await message.reply(f"{PREFIX}-offline-done")

        async def online_start(message):
            await message.reply(f"{PREFIX}-online-done")

        setup = handlers(**{f"{PREFIX}-offline-start": offline_start, f"{PREFIX}-online-start": online_start})
        async with open_relay(broker.url, "todos-deployment", setup=setup) as script:
            await wait_deployment(broker.port, failure_recorded, "the time limit")
            status, body = await http(broker.port, "POST", f"/deployments/todos@{NEW}/retry")
            assert status == 202, body
            with trio.fail_after(5):
                await second_running.wait()
            release_late.set()
            with trio.fail_after(5):
                await late_sent.wait()
            # Frames of one connection are handled in order: the late answer has been.
            assert (await script.request("todos.list", {"tag": "barrier"})).payload["version"] == NEW
            d = await deployment(broker.port)
            # Attempt 2 (time limit 1s) is still running; the stale answer changed nothing.
            assert d["inFlight"] == "offline", d
            assert steps(d) == {"offline": ("started", 2), "online": ("pending", 0)}
            release_second.set()
            d = await wait_deployment(broker.port, lambda d: d["finished"], "the deployment to finish")
            assert steps(d) == {"offline": ("done", 2), "online": ("done", 1)}
