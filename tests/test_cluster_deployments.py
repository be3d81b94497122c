"""Deployments across a cluster, over real sockets: real brokers sharing a real
valkey-server, the deployment script and the versions on different brokers,
a driver broker killed (-9) or paused (SIGSTOP) in the middle of a step."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import trio

from fleet import EXOCOM, NEW, OLD, ScriptLog, ask, deployment, deployment_script, http, steps, todos, todos_states, \
    wait_deployment, wait_until, web
from processes import ROOT, free_port
from test_cluster_e2e import cluster_of, held, valkey, wait_holders  # noqa: F401 (a fixture)
from test_rollout_e2e import ROLLOUT, Traffic, rollout_routes, wait_state
from valkey_server import Valkey

pytest.importorskip("coredis")


def ledger(valkey: Valkey) -> list[dict]:
    from exocom.server.cluster import LEDGER
    return [json.loads(entry) for entry in valkey.command("LRANGE", LEDGER, "0", "-1")]


async def test_a_broker_killed_mid_deployment_another_one_finishes_it(tmp_path, valkey):
    with cluster_of(tmp_path, valkey) as (a, b, c):
        release = trio.Event()
        answers = []

        async def offline(relay):
            # The version it deploys is held on another broker (c): the script still reaches it.
            answers.append((await relay.request("todos.list", {"tag": "script"}, timeout=5)).payload["version"])
            await release.wait()

        log = ScriptLog()
        async with todos(a.url, OLD, []), todos(c.url, NEW, []), web(a.url) as client:
            await wait_holders(b, "todos", {"a", "c"})
            # The script connects to b first, to a when b is gone.
            async with deployment_script([b.url, a.url], log, offline=offline):
                assert await log.wait_starts(1, timeout=10) == [("offline", 1)]
                await wait_until(lambda: answers == [NEW], "the script to reach the held version")
                assert await todos_states(c.port) == {NEW: "held"}
                for i in range(3):  # production traffic meanwhile: the old version only
                    assert await ask(client, f"held-{i}") == OLD
                b.kill(signal.SIGKILL)
                # a takes the lease once b's has passed (3 s), and runs the step again, as after a restart.
                starts = await log.wait_starts(2, timeout=15)
                assert starts[1] == ("offline", 2)
                release.set()
                d = await wait_deployment(a.port, lambda d: d["finished"], "the deployment to finish through a",
                                          timeout=15)
                assert steps(d) == {"offline": ("done", 2), "online": ("done", 1)}
            await wait_until(lambda: _states(c) == {NEW: "live"}, "c to see the version live")
            await wait_until(lambda: held(a, "c") == {NEW: "live"}, "a to see c's version live")
            assert await ask(client, "pinned", version="2") == NEW  # from a, through c
            # As on one broker: the new version is the stable one, a's old version drains.
            assert await ask(client, "unpinned") == NEW and _states(a) == {OLD: "draining"}
        events = [e["event"] for e in a.events()]
        assert "deployment driver lease taken" in events and "deployment finished" in events
        drivers = {(e["by"], e["token"]) for e in ledger(valkey)}
        assert {by for by, _ in drivers} == {"b", "a"}


async def test_a_broker_killed_mid_ramp_another_one_carries_the_ramp_on_with_the_cluster_wide_share(tmp_path,
                                                                                                  valkey):
    """todos 1.0.0 on a, 2.0.0 on c, its script (and so the ramp's driver) on b; web on a asks all along.
    The share and the gates are the cluster's: a sends c the ramp's share of its new activities."""
    with cluster_of(tmp_path, valkey, service_data=rollout_routes()) as (a, b, c):
        traffic = Traffic(a)
        async with todos(a.url, OLD, []), todos(c.url, NEW, []), web(a.url) as client:
            await wait_holders(a, "todos", {"a", "c"})
            async with trio.open_nursery() as nursery:
                await nursery.start(traffic.run, client)
                async with deployment_script([b.url, a.url], ScriptLog()):
                    await wait_state(a, lambda d: d["state"] == "ramping", "the ramp to begin")
                    drivers = {e["by"] for e in ledger(valkey)}
                    assert drivers == {"b"}
                    b.kill(signal.SIGKILL)
                    d = await wait_state(a, lambda d: d["state"] == "live", "the ramp to reach 100 % without b",
                                         timeout=40)
                nursery.cancel_scope.cancel()
            assert await ask(client, "after") == NEW
    assert d["finished"] and d["share"] == 100
    observed, total = traffic.observed_share(0)
    assert total >= 100 and 2 <= observed <= 25, (observed, total)  # 10 %: the binomial spread of a few hundred
    records = ledger(valkey)
    stepped = [e for e in records if e["record"]["step"] == "rollout" and e["record"]["event"] == "stepped"]
    assert stepped and {e["by"] for e in stepped} <= {"a", "c"} and all(e["token"] >= 2 for e in stepped)
    # The gates judged the replies 2.0.0 gave on c, whichever broker drove.
    assert all(e["record"]["detail"]["replies"] >= ROLLOUT["gates"]["minSamples"] for e in stepped)


def _states(broker) -> dict:
    clients = (broker.get("/config.json") or {"clients": []})["clients"]
    return {v["version"]: v["state"] for c in clients if c["role"] == "todos" for v in c["versions"]}


async def test_a_broker_paused_past_its_lease_cannot_record_the_step_it_was_driving(tmp_path, valkey):
    with cluster_of(tmp_path, valkey, ("a", "b")) as (a, b):
        release = trio.Event()

        async def offline(relay):
            await release.wait()

        on_b, on_a = ScriptLog(), ScriptLog()
        async with todos(a.url, NEW, []), deployment_script(b.url, on_b, offline=offline):
            assert await on_b.wait_starts(1, timeout=10) == [("offline", 1)]
            b.process.send_signal(signal.SIGSTOP)
            try:
                # Another instance of the script on a: a takes the lease after b's passed and starts attempt 2.
                async with deployment_script(a.url, on_a, offline=offline):
                    assert await on_a.wait_starts(1, timeout=15) == [("offline", 2)]
                    b.process.send_signal(signal.SIGCONT)
                    release.set()  # both scripts answer: b's under its old token, a's under the new one
                    d = await wait_deployment(a.port, lambda d: d["finished"], "the deployment to finish", timeout=15)
                    assert steps(d) == {"offline": ("done", 2), "online": ("done", 1)}
                    await wait_until(lambda: "deployment record fenced" in [e["event"] for e in b.events()],
                                     "b's late record to be refused by the ledger", timeout=10)
            finally:
                b.process.send_signal(signal.SIGCONT)
        records = ledger(valkey)
        done = [e for e in records if e["record"]["event"] == "done" and e["record"]["step"] == "offline"]
        assert [(e["by"], e["record"]["attempt"]) for e in done] == [("a", 2)]
        tokens = {e["by"]: e["token"] for e in records}
        assert tokens["a"] > tokens["b"]


async def test_redis_away_pauses_a_deployment_which_resumes_from_the_ledger_when_redis_is_back(tmp_path, valkey):
    from exocom.server.cluster import LEASE_TTL
    with cluster_of(tmp_path, valkey, ("a", "b")) as (a, b):
        release = trio.Event()

        async def offline(relay):
            await release.wait()

        log = ScriptLog()
        async with todos(b.url, NEW, []), deployment_script(a.url, log, offline=offline):
            assert await log.wait_starts(1, timeout=10) == [("offline", 1)]
            valkey.stop()
            release.set()  # the script answers while Redis is away: not recorded, so nothing advances
            # A span of time, not a condition to poll: the lease must also pass in Redis (which is down, so
            # nothing can be asked), for the late record to be refused when Redis is back.
            await trio.sleep(LEASE_TTL + 1)
            d = await deployment(a.port)
            assert d["state"] == "held" and steps(d) == {"offline": ("started", 1), "online": ("pending", 0)}
            assert log.starts == [("offline", 1)]
            status, body = await http(a.port, "GET", "/readyz")
            assert status == 503 and body["failing"] == ["cluster"]
            valkey.start()
            # The lease passed while Redis was away: the late record is refused, a takes the lease again
            # and runs the step again, as after a restart.
            d = await wait_deployment(a.port, lambda d: d["finished"], "the deployment to finish", timeout=20)
            assert steps(d) == {"offline": ("done", 2), "online": ("done", 1)}
        events = [e["event"] for e in a.events()]
        assert "deployment driver lease expired" in events and "deployment record fenced" in events


async def test_a_failed_deployment_is_retried_from_any_broker_once_nobody_drives_it(tmp_path, valkey):
    """While another broker holds the lease a retry POSTed to b is refused (409, naming it), never accepted
    and lost; once the lease is free, b takes it."""
    from exocom.server.cluster import lease_key

    async def offline(relay):
        raise RuntimeError("the migration broke")

    with cluster_of(tmp_path, valkey, ("a", "b")) as (a, b):
        async with todos(b.url, NEW, []):
            async with deployment_script(a.url, ScriptLog(), offline=offline):
                await wait_deployment(b.port, lambda d: steps(d)["offline"] == ("failed", 1), "b to see it failed",
                                      timeout=10)
                # Another broker (x) drives it now, as far as the lease in Redis says: b cannot know it
                # from its own state, only the ledger script refuses the record.
                valkey.command("SET", lease_key(f"todos@{NEW}"), "x/99", "PX", "60000")
                status, body = await http(b.port, "POST", f"/deployments/todos@{NEW}/retry")
                assert status == 409 and "driven by broker 'x'" in body["error"], body
                valkey.command("DEL", lease_key(f"todos@{NEW}"))
            answers = []

            async def retried():
                answers.append(await http(b.port, "POST", f"/deployments/todos@{NEW}/retry"))
                return answers[-1][0] == 202

            await wait_until(retried, "b to take the retry once a no longer drives the deployment", timeout=10,
                             interval=0.2)
            assert answers[-1][1]["recorded"] is True
            assert {status for status, _ in answers} <= {202, 409}, answers
            d = await wait_deployment(a.port, lambda d: steps(d)["offline"][0] == "pending", "a to see the retry")
            assert d["state"] == "held"
        assert [e["by"] for e in ledger(valkey) if e["record"]["event"] == "rearmed"] == ["b"]
        listed = subprocess.run([*EXOCOM, "deployments", "--url", f"http://127.0.0.1:{b.port}"], capture_output=True,
                                text=True, timeout=30)
        assert f"its ledger: Redis at {valkey.url} (shared by the cluster)" in listed.stdout, listed.stdout
    # Every broker stopped: the ledger in Redis still tells (as --state-dir does for one broker's SQLite).
    config = tmp_path / "routes.json"
    listed = subprocess.run([*EXOCOM, "deployments", "--config", str(config), "--cluster", valkey.url],
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert f"from the cluster's ledger in Redis at {valkey.url}" in listed.stdout
    [row] = [line.split() for line in listed.stdout.splitlines() if line.startswith(f"todos@{NEW}")]
    assert row[2:5] == ["held", "pending", "(1x)"], row


def test_a_redis_that_does_not_persist_is_refused_with_what_to_set(tmp_path):
    volatile = Valkey(tmp_path / "valkey", persistent=False).start()
    try:
        command = [sys.executable, "-m", "exocom", "serve", "--cluster", volatile.url, "--port", str(free_port()),
                   "--host", "127.0.0.1", "--state-dir", str(tmp_path / "state"), "--log-format", "json"]
        refused = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert refused.returncode == 2
        [error] = [json.loads(line) for line in refused.stdout.splitlines() if '"exocom cannot start"' in line]
        assert "appendonly yes" in error["error"] and "appendfsync always" in error["error"]
        assert "--cluster-volatile-ledger" in error["error"]
    finally:
        volatile.stop()


def test_listing_from_a_redis_that_does_not_answer_says_so():
    url = f"redis://127.0.0.1:{free_port()}/0"
    listed = subprocess.run([*EXOCOM, "deployments", "--cluster", url], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 2 and f"cannot read the cluster's ledger from Redis at {url}" in listed.stderr
