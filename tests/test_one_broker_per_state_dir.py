"""One broker per state directory: a second `exocom serve` on the same state
directory refuses in one line that names the first, and touches nothing;
`exocom deployments` still reads the ledger meanwhile."""

from __future__ import annotations

import json

from fleet import NEW, routes
from processes import BrokerProcess
from test_deployments_cli import exocom as exocom_deployments
from test_ledger_goes_bad import assert_one_line_refusal, fingerprint
from test_operations import environment, exocom

from exocom.server.ledger import FILE_NAME


def test_a_second_broker_on_the_same_state_directory_refuses_and_names_the_first(tmp_path):
    config = tmp_path / "routes.json"
    config.write_text(json.dumps(routes()))
    first = BrokerProcess(tmp_path, "--config", str(config), env=environment())
    try:
        first.start()
        ledger = first.state_dir / FILE_NAME
        before = fingerprint(ledger)
        second = exocom("serve", "--config", str(config), "--state-dir", str(first.state_dir), "--port", "0",
                        "--host", "127.0.0.1", "--log-format", "json")
        assert_one_line_refusal(second, f"pid {first.process.pid}", f"listening on 127.0.0.1:{first.port}",
                                str(first.state_dir / "broker.lock"), "stop that broker first", "--state-dir")
        assert fingerprint(ledger) == before
        assert first.get("/readyz")["ready"] is True

        listed = exocom_deployments("--state-dir", str(first.state_dir), "--config", str(config))
        assert listed.returncode == 0, listed.stderr
        assert f"todos@{NEW}" in listed.stdout
    finally:
        first.stop()
    # The kernel released the lock with the process: the next broker starts.
    BrokerProcess(tmp_path, "--config", str(config), env=environment()).start().stop()
