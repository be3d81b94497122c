"""Reloading the configuration of a running `exocom serve` (a subprocess
with `--config FILE`), with real services (`exocom.relay`) sending traffic
the whole time: SIGHUP, `POST /reload` and `exocom reload`."""

from __future__ import annotations

import json
import signal
import time

import pytest
import trio

from fleet import (EXOCOM, FAST, NEW, OLD, ScriptLog, ask, deployment, deployment_script, handlers, http, routes,
                   todos, todos_states, wait_deployment, wait_until, web)
import auth_mode
from processes import BrokerProcess, broker_with_config
from test_crash_restart import cli_env, start

from exocom.relay import RegistrationRefused, RequestTimeout, open_relay

BEFORE = {"web": routes()["web"], "todos": routes()["todos"], "audit": {"receives": ["todos.list"]}}
AFTER = routes()  # adds todos-deployment, which deploys todos 2.0.0; audit is gone
BROKEN = {**AFTER, "todos": {**AFTER["todos"], "recieves": ["todos.list"]}}


@pytest.fixture
def broker(tmp_path):
    with broker_with_config(tmp_path, BEFORE) as process:
        yield process


def events(broker: BrokerProcess, name: str) -> list[dict]:
    return [e for e in broker.events() if e["event"] == name]


async def wait_event(broker: BrokerProcess, name: str, count: int = 1) -> list[dict]:
    return await wait_until(lambda: len(events(broker, name)) >= count and events(broker, name),
                            f"{count} {name!r} log events", timeout=10)


async def ignore(message) -> None:
    pass


async def audit(url: str, refused: list, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """An `audit` instance until the broker refuses it (its relay does not retry a 4000-4999 close)."""
    try:
        async with open_relay(url, "audit", setup=handlers(**{"todos.list": ignore}), **FAST):
            task_status.started()
            await trio.sleep_forever()
    except RegistrationRefused as e:
        refused.append(e)


class Traffic:
    """`web` asks `todos` without pause; every request must be answered."""

    def __init__(self) -> None:
        self.sent = self.answered = 0
        self.lost: list[str] = []
        self.slowest = 0.0

    async def run(self, relay) -> None:
        while True:
            tag = f"t{self.sent}"
            self.sent += 1
            started = time.monotonic()
            try:
                await ask(relay, tag)
            except RequestTimeout:
                self.lost.append(tag)
                continue
            self.answered += 1
            self.slowest = max(self.slowest, time.monotonic() - started)


async def test_sighup_adds_a_deployment_under_traffic_without_dropping_a_connection_or_a_message(broker):
    await start(broker)
    traffic, old_got, new_got, log, closed = Traffic(), [], [], ScriptLog(), []
    async with todos(broker.url, OLD, old_got) as old, web(broker.url) as client, trio.open_nursery() as nursery:
        await nursery.start(audit, broker.url, closed)
        nursery.start_soon(traffic.run, client)
        await wait_until(lambda: traffic.answered >= 50, "traffic to flow")
        broker.config.write_text("{\n  oops")  # not even YAML: nothing changes
        broker.process.send_signal(signal.SIGHUP)
        [refused] = await wait_event(broker, "configuration reload refused")
        assert refused["trigger"] == "SIGHUP" and "not valid YAML" in refused["error"]
        assert set((await http(broker.port, "GET", "/config.json"))[1]["routes"]) == set(BEFORE)

        before = traffic.answered
        broker.config.write_text(json.dumps(AFTER))
        broker.process.send_signal(signal.SIGHUP)
        [reloaded] = await wait_event(broker, "configuration reloaded")
        assert reloaded["deployments_added"] == [f"todos@{NEW}"] and reloaded["roles_removed"] == ["audit"]
        assert reloaded["roles_added"] == ["todos-deployment"]
        # audit is gone: closed with the documented code, and the relay does not retry.
        await wait_until(lambda: closed, "the audit relay to be closed")
        assert closed[0].code == 4005 and "removed from the routing configuration" in closed[0].reason

        async with todos(broker.url, NEW, new_got):
            assert (await todos_states(broker.port))[NEW] == "held"
            held_at = len(old_got)
            await wait_until(lambda: len(old_got) >= held_at + 50, "traffic while 2.0.0 is held")
            assert new_got == [], "a held version gets no traffic"
            async with deployment_script(broker.url, log):
                await wait_deployment(broker.port, lambda d: d["finished"], "the deployment to finish")
                await wait_until(lambda: len(new_got) >= 20, "traffic to reach the deployed version")
                nursery.cancel_scope.cancel()
                # Nobody but the removed role was disconnected, and nobody registered twice.
                assert [e["role"] for e in events(broker, "service deregistered")] == ["audit"]
                assert sorted(e["role"] for e in events(broker, "service registered")) == [
                    "audit", "todos", "todos", "todos-deployment", "web"]
        assert traffic.answered > before + 100
        assert traffic.lost == []
        assert old.registrations == client.registrations == 1
    print(f"\nSIGHUP under traffic: {traffic.answered} requests answered, {len(traffic.lost)} lost, "
          f"slowest {traffic.slowest * 1000:.1f} ms")


async def exocom_reload(broker: BrokerProcess, *args: str) -> tuple[int, str, str]:
    with trio.fail_after(30):
        result = await trio.run_process([*EXOCOM, "reload", *args], capture_stdout=True, capture_stderr=True,
                                        check=False, env={**cli_env(), "EXOCOM_PORT": str(broker.port)})
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_post_reload_and_exocom_reload_refuse_a_bad_file_and_apply_a_good_one(broker):
    await start(broker)
    got = []
    async with todos(broker.url, OLD, got) as instance, web(broker.url) as client:
        broker.config.write_text(json.dumps(BROKEN))
        status, body = await http(broker.port, "POST", "/reload")
        assert status == 422 and body["reloaded"] is False
        assert any("'recieves'" in p and "did you mean 'receives'" in p for p in body["problems"])
        code, out, err = await exocom_reload(broker)
        assert code == 1 and "refused" in err and "recieves" in err
        assert [e["trigger"] for e in events(broker, "configuration reload refused")] == ["http", "http"]
        assert "todos-deployment" not in (await http(broker.port, "GET", "/config.json"))[1]["routes"]

        broker.config.write_text(json.dumps(AFTER))
        code, out, err = await exocom_reload(broker)
        assert code == 0, err
        assert f"deployments added (their versions held): todos@{NEW}" in out and "roles removed" in out
        assert (await deployment(broker.port))["state"] == "held"
        status, body = await http(broker.port, "POST", "/reload")
        assert status == 200 and body["reloaded"] and not any(body["changes"].values())
        code, out, _ = await exocom_reload(broker, "--json")
        assert code == 0 and json.loads(out)["changes"]["deploymentsAdded"] == []
        assert await ask(client, "after") == OLD
        assert instance.registrations == client.registrations == 1
    broker.stop()
    code, _, err = await exocom_reload(broker)
    assert code == 2 and "no broker answers" in err


async def test_a_broker_on_service_data_refuses_to_reload_and_says_why(tmp_path):
    broker = BrokerProcess(tmp_path, env={"SERVICE_DATA": json.dumps(BEFORE)})
    await start(broker)
    try:
        broker.process.send_signal(signal.SIGHUP)
        [refused] = await wait_event(broker, "configuration reload refused")
        assert "SERVICE_DATA" in refused["error"] and "restart the broker" in refused["error"]
        status, body = await http(broker.port, "POST", "/reload")
        assert status == 409 and "SERVICE_DATA" in body["error"]
        code, _, err = await exocom_reload(broker)
        assert code == 1 and "SERVICE_DATA" in err
        assert broker.process.poll() is None
    finally:
        broker.stop()


@pytest.mark.skipif(auth_mode.ON, reason="EXOCOM_TEST_REQUIRE_AUTH runs the default's routes from a file with tokens")
async def test_a_broker_on_the_embedded_default_has_nothing_to_reload(tmp_path):
    broker = BrokerProcess(tmp_path, env={"SERVICE_DATA": ""})
    broker.env.pop("SERVICE_DATA")
    await start(broker)
    try:
        status, body = await http(broker.port, "POST", "/reload")
        assert status == 200 and body["reloaded"] is False and "embedded default" in body["reason"]
        code, out, _ = await exocom_reload(broker)
        assert code == 0 and "nothing to reload" in out
        assert [e["trigger"] for e in events(broker, "configuration reload skipped")] == ["http", "http"]
    finally:
        broker.stop()
