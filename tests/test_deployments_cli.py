"""`exocom deployments` at its edges, as an operator runs it: a subprocess,
with the ledger of a stopped broker, or something at --url that is not a
running broker. (The main paths -- list and retry against a running or a
stopped broker -- are in test_deployments_e2e.py and test_crash_restart.py.)"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import threading

import pytest

from fleet import EXOCOM, NEW, routes
from processes import free_port

from exocom.server.ledger import SQLiteLedger


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(routes()))
    return path


def exocom(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EXOCOM_") and k not in ("SERVICE_DATA", "PORT")}
    result = subprocess.run([*EXOCOM, "deployments", *args], capture_output=True, text=True, timeout=30,
                            env={**clean, **env})
    assert "Traceback" not in result.stderr, result.stderr
    return result


def failed_ledger(state_dir) -> list[dict]:
    """The ledger of a broker that stopped after the online step of todos 2.0.0 failed."""
    ledger = SQLiteLedger.in_state_dir(state_dir)
    for step, event in (("offline", "started"), ("offline", "done"), ("online", "started"), ("online", "failed")):
        ledger.append({"role": "todos", "version": NEW, "step": step, "event": event, "attempt": 1, "at": 1.0,
                       "error": "RuntimeError: boom" if event == "failed" else None})
    records = ledger.load()
    ledger.close()
    return records


def ledger_records(state_dir) -> list[dict]:
    ledger = SQLiteLedger.in_state_dir(state_dir, create=False)
    try:
        return ledger.load()
    finally:
        ledger.close()


def test_listing_needs_no_port_and_retry_names_a_bad_port_variable(tmp_path, config):
    state = tmp_path / "state"
    failed_ledger(state)
    listed = exocom("--state-dir", str(state), "--config", str(config), EXOCOM_PORT="abc")
    assert listed.returncode == 0, listed.stderr
    assert f"todos@{NEW}" in listed.stdout and "RuntimeError: boom" in listed.stdout

    retried = exocom("retry", f"todos@{NEW}", "--state-dir", str(state), "--config", str(config), EXOCOM_PORT="abc")
    assert retried.returncode == 2
    assert "EXOCOM_PORT" in retried.stderr and "--url" in retried.stderr
    assert len(ledger_records(state)) == 4


def test_listing_a_state_dir_without_a_ledger_says_so(tmp_path, config):
    listed = exocom("--state-dir", str(tmp_path / "elsewhere"), "--config", str(config))
    assert listed.returncode == 0
    assert f"todos@{NEW}" in listed.stdout and "pending (0x)" in listed.stdout
    assert f"no ledger at {tmp_path / 'elsewhere' / 'ledger.sqlite3'}" in listed.stderr
    assert not (tmp_path / "elsewhere").exists(), "listing created a state directory"


def test_retry_with_the_broker_down_and_no_ledger_creates_none(tmp_path, config):
    typo = tmp_path / "no-such-state"
    result = exocom("retry", f"todos@{NEW}", "--state-dir", str(typo), "--config", str(config),
                    "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "no ledger" in result.stderr and "nothing to re-arm" in result.stderr
    assert not typo.exists()


def test_retry_with_the_broker_down_rearms_the_failed_step(tmp_path, config):
    state = tmp_path / "state"
    before = failed_ledger(state)
    result = exocom("retry", f"todos@{NEW}", "--state-dir", str(state), "--config", str(config),
                    "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 0, result.stderr
    assert "re-armed in the ledger" in result.stdout
    after = ledger_records(state)
    assert after[:4] == before
    assert [(r["step"], r["event"]) for r in after[4:]] == [("online", "rearmed")]


class _NotABroker(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = b"<html><body>404 Not Found</body></html>"
        self.send_response(404)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_retry_against_a_server_that_is_not_a_broker_says_so_and_touches_nothing(tmp_path, config):
    state = tmp_path / "state"
    before = failed_ledger(state)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotABroker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = exocom("retry", f"todos@{NEW}", "--state-dir", str(state), "--config", str(config), "--url", url)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1
    assert "HTTP 404" in result.stderr
    assert ledger_records(state) == before


def test_retry_does_not_write_the_ledger_behind_something_that_listens_but_does_not_answer(tmp_path, config):
    """Only a refused connection means "no broker running"; a connection that
    is accepted and dropped may be a broker in trouble: its ledger stays as it is."""
    state = tmp_path / "state"
    before = failed_ledger(state)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def drop_one():
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)

        thread = threading.Thread(target=drop_one, daemon=True)
        thread.start()
        result = exocom("retry", f"todos@{NEW}", "--state-dir", str(state), "--config", str(config),
                        "--url", f"http://127.0.0.1:{listener.getsockname()[1]}")
        thread.join(timeout=5)
    assert result.returncode == 1
    assert "nothing re-armed" in result.stderr
    assert ledger_records(state) == before
