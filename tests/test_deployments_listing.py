"""What `exocom deployments` lists, and from where: the running broker's view
when one answers (unless --state-dir names a ledger file), always saying which
ledger it shows; an error fixed by a retry is shown as history."""

from __future__ import annotations

import json

import pytest

from fleet import NEW, routes
from processes import BrokerProcess, free_port
from test_deployments_cli import exocom as exocom_deployments, failed_ledger
from test_operations import environment, exocom

from exocom.server.ledger import FILE_NAME, SQLiteLedger


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(routes()))
    return path


def table(stdout: str) -> dict[str, str]:
    """DEPLOYMENT -> its row."""
    return {line.split()[0]: line for line in stdout.splitlines() if "@" in line.split(" ", 1)[0]}


def test_listing_asks_the_running_broker_and_names_the_ledger_it_shows(tmp_path, config):
    elsewhere = tmp_path / "elsewhere"
    failed_ledger(elsewhere)  # another ledger, where EXOCOM_STATE_DIR points by mistake
    broker = BrokerProcess(tmp_path, "--config", str(config), env=environment())
    try:
        broker.start()
        env = {"EXOCOM_PORT": str(broker.port), "EXOCOM_STATE_DIR": str(elsewhere)}

        listed = exocom_deployments("--config", str(config), **env)
        assert listed.returncode == 0, listed.stderr
        source = listed.stdout.splitlines()[0]
        assert f"from the running broker at {broker.http}" in source
        assert str(broker.state_dir / FILE_NAME) in source
        assert "pending (0x)" in table(listed.stdout)[f"todos@{NEW}"]
        as_json = json.loads(exocom_deployments("--config", str(config), "--json", **env).stdout)
        assert (as_json["url"], as_json["ledger"]) == (broker.http, str(broker.state_dir / FILE_NAME))

        # --state-dir reads that ledger file, and says so.
        listed = exocom_deployments("--config", str(config), "--state-dir", str(elsewhere), **env)
        assert listed.returncode == 0, listed.stderr
        assert f"from the ledger {elsewhere / FILE_NAME} (read directly" in listed.stdout.splitlines()[0]
        assert "RuntimeError: boom" in table(listed.stdout)[f"todos@{NEW}"]
    finally:
        broker.stop()


def test_listing_reads_the_ledger_when_no_broker_answers(tmp_path, config):
    state = tmp_path / "state"
    failed_ledger(state)
    url = f"http://127.0.0.1:{free_port()}"
    listed = exocom_deployments("--config", str(config), "--url", url, EXOCOM_STATE_DIR=str(state))
    assert listed.returncode == 0, listed.stderr
    assert f"no broker answers at {url}" in listed.stderr and "reading the ledger instead" in listed.stderr
    assert f"from the ledger {state / FILE_NAME}" in listed.stdout.splitlines()[0]
    assert "RuntimeError: boom" in table(listed.stdout)[f"todos@{NEW}"]


def test_an_error_fixed_by_a_retry_is_shown_as_history(tmp_path, config):
    state = tmp_path / "state"
    failed_ledger(state)
    ledger = SQLiteLedger.in_state_dir(state)
    for event, attempt in (("rearmed", 1), ("started", 2), ("done", 2)):
        ledger.append({"role": "todos", "version": NEW, "step": "online", "event": event, "attempt": attempt,
                       "at": 2.0, "error": None})
    ledger.close()

    listed = exocom_deployments("--config", str(config), "--state-dir", str(state))
    row = table(listed.stdout)[f"todos@{NEW}"]
    assert "live" in row and "done (2x)" in row
    assert row.endswith("(before the retry, now done) online: RuntimeError: boom"), row

    broker = BrokerProcess(tmp_path, "--config", str(config), env=environment())
    try:
        broker.start()
        status = exocom("status", "--url", broker.http)
        [row] = [line for line in status.stdout.splitlines() if line.startswith(f"todos@{NEW}")]
        assert row.endswith("(before the retry, now done) online: RuntimeError: boom"), row
    finally:
        broker.stop()
