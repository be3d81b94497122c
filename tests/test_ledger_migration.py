"""The ledger schema migrates forward from what the previous release wrote.

`fixtures/ledger-schema1-0.1.0.sqlite3` was written by exocom 0.1.0 (commit
feeb83f, schema 1: no rollouts) -- a deployment whose online step failed,
was re-armed and then done.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from exocom.core.broker import Broker
from exocom.core.config import parse_service_data
from exocom.server.ledger import FILE_NAME, SCHEMA_VERSION, SQLiteLedger

FIXTURE = Path(__file__).parent / "fixtures" / "ledger-schema1-0.1.0.sqlite3"
ROUTES = {"todos": {}, "todo-search": {},
          "todo-search-deployment": {"deploys": "todo-search@0.0.1", "rollout": {"steps": [50, 100], "interval": 5}}}


def test_a_ledger_of_the_previous_release_migrates_and_keeps_every_record(tmp_path):
    shutil.copy(FIXTURE, tmp_path / FILE_NAME)
    ledger = SQLiteLedger.in_state_dir(tmp_path)
    records = ledger.load()
    assert SCHEMA_VERSION == 2
    assert [(r["step"], r["event"], r["attempt"]) for r in records] == [
        ("offline", "started", 1), ("offline", "done", 1), ("online", "started", 1), ("online", "failed", 1),
        ("online", "rearmed", 1), ("online", "started", 2), ("online", "done", 2)]
    assert all(r["detail"] is None for r in records)
    # A deployment finished under the old release is live, not ramping, when a rollout is declared later.
    [d] = Broker(parse_service_data(ROUTES, "test"), ledger_records=records).deployments_json()
    assert (d["state"], d["finished"], d["share"]) == ("live", True, 100.0)
    # The new column takes the figures of rollout records.
    ledger.append({**records[-1], "step": "rollout", "event": "aborted", "attempt": 0, "error": "gate",
                   "detail": {"errorRate": 0.5}})
    ledger.close()
    with sqlite3.connect(tmp_path / FILE_NAME) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    again = SQLiteLedger.in_state_dir(tmp_path)
    assert again.load()[-1]["detail"] == {"errorRate": 0.5}
    again.close()
