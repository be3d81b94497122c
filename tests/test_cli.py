"""`exocom serve` as a user runs it: a subprocess with environment variables
and flags, JSON log lines on stdout, real HTTP and WebSocket clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from trio_websocket import open_websocket_url

from raw_ws import RawClient
from wire import Service

_SCRIPT = Path(sys.executable).with_name("exocom")
EXOCOM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "exocom"]

ROUTES = {
    "web": {"sends": ["users create"], "receives": ["users created"]},
    "users": {"receives": ["mongo create"], "sends": ["mongo created"],
              "translations": [{"public": "users create", "internal": "mongo create"},
                               {"public": "users created", "internal": "mongo created"}]},
}


def environment(**extra: str) -> dict[str, str]:
    """The test's environment without anything that would steer the broker."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EXOCOM_") and k not in ("SERVICE_DATA", "PORT")}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return json.loads(response.read())


async def get_config(port: int) -> dict:
    return await trio.to_thread.run_sync(_get_json, f"http://127.0.0.1:{port}/config.json")


async def wait_config(port: int, condition) -> dict:
    with trio.fail_after(5):
        while True:
            config = await get_config(port)
            if condition(config):
                return config
            await trio.sleep(0.01)


class Exocom:
    """A running `exocom serve` process and the lines it printed."""

    def __init__(self, process: trio.Process):
        self.process = process
        self.lines: list[str] = []
        self.eof = False
        self._changed = trio.Event()

    async def pump(self) -> None:
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            self.lines.extend(line.decode() for line in lines)
            self._changed.set()
            self._changed = trio.Event()
        if buffer:
            self.lines.append(buffer.decode())
        self.eof = True
        self._changed.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def records(self) -> list[dict]:
        out = []
        for line in self.lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    async def wait_for(self, event: str, timeout: float = 10.0) -> dict:
        """The first JSON log record with this event, waiting for it to be printed."""
        with trio.fail_after(timeout):
            while True:
                changed = self._changed
                for record in self.records():
                    if record.get("event") == event:
                        return record
                if self.eof:
                    raise AssertionError(f"exocom ended without logging {event!r}:\n{self.output}")
                await changed.wait()

    async def wait_exit(self, timeout: float = 10.0) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()


@asynccontextmanager
async def exocom_serve(tmp_path: Path, *args: str, env: dict[str, str]):
    command = [*EXOCOM, "serve", "--state-dir", str(tmp_path / "state"), *args]
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        exocom = Exocom(process)
        nursery.start_soon(exocom.pump)
        try:
            yield exocom
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.terminate()
                    with trio.move_on_after(5):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()


async def run_exocom(tmp_path: Path, *args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run `exocom serve` to its end (for starts that must fail)."""
    command = [*EXOCOM, "serve", "--state-dir", str(tmp_path / "state"), *args]
    with trio.fail_after(15):
        result = await trio.run_process(command, env=env, capture_stdout=True, capture_stderr=True, check=False)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def one_line(stdout: str, stderr: str) -> str:
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line of output, got:\n{stdout}{stderr}"
    assert "Traceback" not in lines[0]
    return lines[0]


# -------------------------------------------------------------------- starting


async def test_serve_with_service_data_and_port(tmp_path):
    port = free_port()
    env = environment(SERVICE_DATA=json.dumps(ROUTES), PORT=str(port))
    async with exocom_serve(tmp_path, "--host", "127.0.0.1", env=env) as exocom:
        listening = await exocom.wait_for("broker listening")
        assert listening["level"] == "info"
        assert listening["port"] == port
        assert listening["roles"] == ["users", "web"]
        assert listening["config_source"] == "SERVICE_DATA"
        assert (tmp_path / "state").is_dir()  # the ledger lives where it was told

        config = await get_config(port)
        assert config["clients"] == []
        assert set(config["routes"]) == {"web", "users"}

        url = f"ws://127.0.0.1:{port}/services"
        async with open_websocket_url(url) as ws_web, open_websocket_url(url) as ws_users:
            web, users = Service(ws_web, "web"), Service(ws_users, "users")
            await web.register()
            await users.register(version="1.0.0")
            await wait_config(port, lambda c: {x["role"] for x in c["clients"]} == {"web", "users"})
            command = await web.send("users create", {"name": "Jean"})
            got = await users.receive()
            assert got["name"] == "mongo create" and got["payload"] == {"name": "Jean"}
            await users.send("mongo created", {"id": 1}, activityId=command["activityId"])
            reply = await web.receive()
            assert reply["name"] == "users created" and reply["activityId"] == command["activityId"]
        assert exocom.process.returncode is None


async def test_the_port_flag_wins_over_the_port_variable(tmp_path):
    with socket.socket() as taken:  # PORT names a port that is in use: starting there would fail
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = free_port()
        env = environment(SERVICE_DATA=json.dumps(ROUTES), PORT=str(taken.getsockname()[1]))
        async with exocom_serve(tmp_path, "--host", "127.0.0.1", "--port", str(port), env=env) as exocom:
            assert (await exocom.wait_for("broker listening"))["port"] == port
            assert set((await get_config(port))["routes"]) == {"web", "users"}


YAML_CONFIG = """\
# routing for the test
web:
  sends: [users create]
  receives: [users created]
users:
  receives: [mongo create]
  sends: [mongo created]
  translations:
    - {public: users create, internal: mongo create}
    - {public: users created, internal: mongo created}
"""


@pytest.mark.parametrize("file_name, text", [
    ("routes.yml", YAML_CONFIG),
    ("routes.json", json.dumps(ROUTES, indent=2)),
])
async def test_config_file(tmp_path, file_name, text):
    path = tmp_path / file_name
    path.write_text(text)
    port = free_port()
    # --config wins over SERVICE_DATA
    env = environment(SERVICE_DATA=json.dumps({"other": {}}))
    async with exocom_serve(tmp_path, "--host", "127.0.0.1", "--port", str(port), "--config", str(path),
                            env=env) as exocom:
        listening = await exocom.wait_for("broker listening")
        assert listening["roles"] == ["users", "web"]
        assert listening["config_source"] == str(path)
        routes = (await get_config(port))["routes"]
        assert routes["users"]["translations"] == ROUTES["users"]["translations"]
        assert routes["web"]["sends"] == ["users create"]


async def test_no_configuration_uses_the_embedded_default(tmp_path):
    port = free_port()
    async with exocom_serve(tmp_path, "--host", "127.0.0.1", "--port", str(port), env=environment()) as exocom:
        listening = await exocom.wait_for("broker listening")
        assert listening["config_source"] == "embedded default"
        assert listening["roles"] == sorted(["web", "todos", "todo-search", "todo-search-deployment"])
        assert listening["deployments"] == ["todo-search@0.0.1"]
        held = await exocom.wait_for("deployment held")
        assert held["role"] == "todo-search" and held["step"] == "offline"
        events = [r["event"] for r in exocom.records()]
        assert events.index("broker listening") == 0, "the startup event comes first"
        routes = (await get_config(port))["routes"]
        assert set(routes) == {"web", "todos", "todo-search", "todo-search-deployment"}
        assert routes["todo-search-deployment"]["deploys"] == "todo-search@0.0.1"


# ------------------------------------------------------------ refusing to start


@pytest.mark.parametrize("service_data, expected", [
    ("not json at all", ["SERVICE_DATA", "JSON"]),
    (json.dumps({"web": {"sends": "users create"}}), ["'web'", "'sends'"]),
    (json.dumps({"web": {"receives": ["a"]}, "users": {"translations": [{"public": "a"}]}}), ["'users'", "translations"]),
    ("", ["SERVICE_DATA", "empty"]),
], ids=["not JSON", "sends is a string", "translation without internal", "empty"])
async def test_invalid_service_data_stops_the_start(tmp_path, service_data, expected):
    code, out, err = await run_exocom(tmp_path, "--port", str(free_port()), env=environment(SERVICE_DATA=service_data))
    assert code != 0
    line = one_line(out, err)
    for word in expected:
        assert word in line


@pytest.mark.parametrize("kind", ["missing", "directory", "not UTF-8"])
async def test_an_unreadable_config_file_stops_the_start(tmp_path, kind):
    path = tmp_path / "routes.yml"
    if kind == "directory":
        path.mkdir()
    elif kind == "not UTF-8":
        path.write_bytes(b"\xff\xfe\x00web: {}")
    code, out, err = await run_exocom(tmp_path, "--port", str(free_port()), "--config", str(path), env=environment())
    assert code != 0
    line = one_line(out, err)
    assert str(path) in line and "cannot read" in line


async def test_a_port_in_use_stops_the_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = await run_exocom(tmp_path, "--host", "127.0.0.1", "--port", str(port),
                                          env=environment(SERVICE_DATA=json.dumps(ROUTES)))
    assert code != 0
    line = one_line(out, err)
    assert "already in use" in line and str(port) in line


# -------------------------------------------------------------------- stopping


async def test_sigterm_stops_an_idle_broker_with_exit_code_0(tmp_path):
    port = free_port()
    async with exocom_serve(tmp_path, "--host", "127.0.0.1", "--port", str(port), env=environment()) as exocom:
        await exocom.wait_for("broker listening")
        exocom.process.send_signal(signal.SIGTERM)
        assert await exocom.wait_exit() == 0, exocom.output
        await exocom.wait_for("broker stopped")


async def test_sigterm_closes_connections_and_exits_0(tmp_path):
    port = free_port()
    env = environment(SERVICE_DATA=json.dumps(ROUTES), PORT=str(port))
    async with exocom_serve(tmp_path, "--host", "127.0.0.1", env=env) as exocom:
        await exocom.wait_for("broker listening")
        async with open_websocket_url(f"ws://127.0.0.1:{port}/services") as ws:
            web = Service(ws, "web")
            await web.register()
            await wait_config(port, lambda c: [x["role"] for x in c["clients"]] == ["web"])
            exocom.process.send_signal(signal.SIGTERM)
            code, _ = await web.closed_with()
            assert code == 1001  # going away
        assert await exocom.wait_exit() == 0, exocom.output
        assert (await exocom.wait_for("broker stopping"))["signal"] == "SIGTERM"
        await exocom.wait_for("broker stopped")
        assert "Traceback" not in exocom.output


@asynccontextmanager
async def serving_a_deaf_client(tmp_path: Path, grace_period: str):
    """`exocom serve` with a registered client that never reads again: it
    never answers the close frame."""
    port = free_port()
    env = environment(SERVICE_DATA=json.dumps(ROUTES), PORT=str(port))
    async with exocom_serve(tmp_path, "--host", "127.0.0.1", "--grace-period", grace_period, env=env) as exocom:
        await exocom.wait_for("broker listening")
        client = await RawClient.connect(port)
        try:
            await client.send_json({"name": "exocom.register-service", "sender": "web", "id": "r1"})
            await wait_config(port, lambda c: [x["role"] for x in c["clients"]] == ["web"])
            yield exocom
        finally:
            await client.aclose()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_client_that_never_closes_is_dropped_after_the_grace_period_and_exit_is_0(tmp_path, sig):
    async with serving_a_deaf_client(tmp_path, "1") as exocom:
        exocom.process.send_signal(sig)
        started = trio.current_time()
        assert await exocom.wait_exit(timeout=10) == 0, exocom.output
        assert 0.9 <= trio.current_time() - started < 5, "the grace period is 1 s"
        assert (await exocom.wait_for("broker stopping"))["signal"] == sig.name
        await exocom.wait_for("broker stopped")


async def test_a_second_signal_exits_at_once(tmp_path):
    async with serving_a_deaf_client(tmp_path, "60") as exocom:
        exocom.process.send_signal(signal.SIGTERM)
        await exocom.wait_for("broker stopping")
        exocom.process.send_signal(signal.SIGINT)
        started = trio.current_time()
        assert await exocom.wait_exit(timeout=10) == 1, exocom.output
        assert trio.current_time() - started < 3
        assert (await exocom.wait_for("second signal: exiting at once"))["signal"] == "SIGINT"
        assert (await exocom.wait_for("broker stopped"))["forced"] is True
        assert "Traceback" not in exocom.output


async def test_max_messages_per_second_refuses_a_flood_from_one_connection(tmp_path):
    port = free_port()
    env = environment(SERVICE_DATA=json.dumps(ROUTES), PORT=str(port), EXOCOM_MAX_MESSAGES_PER_SECOND="100")
    async with exocom_serve(tmp_path, "--host", "127.0.0.1", "--max-messages-per-second", "3", env=env) as exocom:
        await exocom.wait_for("broker listening")
        url = f"ws://127.0.0.1:{port}/services"
        async with open_websocket_url(url) as ws_web, open_websocket_url(url) as ws_users:
            web, users = Service(ws_web, "web"), Service(ws_users, "users")
            await web.register()
            await users.register()
            await wait_config(port, lambda c: len(c["clients"]) == 2)
            for _ in range(20):
                await web.send("users create")
            refused = await exocom.wait_for("message refused")
            assert refused["code"] == "rate_limited" and refused["role"] == "web"
            got = 0
            with trio.move_on_after(0.5):
                while True:
                    await users.receive()
                    got += 1
            assert 3 <= got < 10, f"{got} of 20 got through a limit of 3 per second (the flag wins over the env)"
