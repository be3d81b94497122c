"""The example services stop cleanly on SIGTERM, the signal `docker stop` and
`docker compose down` send: they close their connection and exit 0 at once,
instead of running on until Docker kills them 10 s later."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from processes import ROOT, BrokerProcess, free_port, start_example, wait_for

TODO_APP = ROOT / "config" / "todo-app.yml"
TODO_APP_V2 = ROOT / "config" / "todo-app-v2.yml"
STOP_WITHIN_S = 2


def stop_with_sigterm(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=STOP_WITHIN_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"still running {STOP_WITHIN_S}s after SIGTERM") from None


def logged(log, event: str) -> list[dict]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [e for e in (json.loads(line) for line in lines if line.startswith("{")) if e["event"] == event]


@pytest.mark.parametrize("script, role, config, args", [
    ("todos.py", "todos", TODO_APP, ["--db", "todos.sqlite3"]),
    ("todo_search.py", "todo-search", TODO_APP, ["--db", "todo-search.sqlite3"]),
    ("todo_search_deployment.py", "todo-search-deployment", TODO_APP, []),
    ("todos_v2_deployment.py", "todos-v2-deployment", TODO_APP_V2, []),
])
def test_an_example_service_exits_0_on_sigterm_and_deregisters(tmp_path, script, role, config, args):
    broker = BrokerProcess(tmp_path, "--config", str(config)).start()
    log = tmp_path / f"{script}.log"
    try:
        ready = tmp_path / "registered"  # the compose stack's health check of an example service
        process = start_example(script, "--url", broker.url, "--ready-file", str(ready),
                                *[str(tmp_path / a) if a.endswith(".sqlite3") else a for a in args], log=log)
        try:
            wait_for(ready.exists, what="the ready file")
            assert broker.instances(role) == 1
            assert stop_with_sigterm(process) == 0, log.read_text()
            assert not ready.exists(), "the ready file outlived the registration"
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        # It closed its connection: the broker forgot it at once, without a time-out.
        broker.wait_deregistered(role)
        assert [e["signal"] for e in logged(log, "service stopping")] == ["SIGTERM"]
    finally:
        broker.stop()


def test_an_example_service_exits_0_on_sigterm_while_it_waits_for_the_broker(tmp_path):
    # In a compose stack the broker may be gone (or not up yet) when the stack stops.
    log = tmp_path / "todos.log"
    process = start_example("todos.py", "--url", f"ws://127.0.0.1:{free_port()}/services",
                            "--db", str(tmp_path / "todos.sqlite3"), log=log)
    try:
        wait_for(lambda: logged(log, "relay cannot connect"), what="todos to try to connect")
        assert stop_with_sigterm(process) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
