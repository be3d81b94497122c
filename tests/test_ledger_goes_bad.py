"""A ledger that goes bad: damaged on disk, missing where the state directory
shows it existed, or deleted or replaced under a running broker. The broker
never starts over with an empty ledger by itself (every step recorded done
would run again): at start it refuses with what to do; while running it
writes the records it holds to a fresh ledger and goes on."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import trio

from core import Harness
from fleet import NEW, ScriptLog, deployment_script, routes, steps, todos, wait_deployment, wait_until
from processes import BrokerProcess
from test_crash_restart import crash, start
from test_deployments_cli import exocom as exocom_deployments
from test_operations import environment, exocom, readyz

from exocom.server.ledger import FILE_NAME, SQLiteLedger

MARKER_NAME = "ledger.created"  # the documented name (docs/OPERATING.md)


@pytest.fixture
def broker(tmp_path):
    config = tmp_path / "routes.json"
    config.write_text(json.dumps(routes()))
    process = BrokerProcess(tmp_path, "--config", str(config), env=environment())
    process.config = config
    try:
        yield process
    finally:
        process.stop()


def records_in(path) -> list[dict]:
    ledger = SQLiteLedger(path, create=False)
    try:
        return ledger.load()
    finally:
        ledger.close()


def serve_once(broker: BrokerProcess):
    """`exocom serve` as the broker fixture would run it, expected to refuse."""
    return exocom("serve", "--config", str(broker.config), "--state-dir", str(broker.state_dir), "--port", "0",
                  "--host", "127.0.0.1", "--log-format", "json")


def assert_one_line_refusal(result, *phrases: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    line = lines[0]
    for phrase in phrases:
        assert phrase in line, line
    return line


def fingerprint(path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns


# ------------------------------------------------------------------ at start


def test_a_damaged_ledger_is_refused_in_one_line_and_left_as_it_is(broker):
    ledger_path = broker.state_dir / FILE_NAME
    ledger = SQLiteLedger(ledger_path)
    for attempt in range(1, 401):  # several pages, so that one in the middle can be damaged
        ledger.append({"role": "todos", "version": NEW, "step": "offline", "event": "started", "attempt": attempt,
                       "at": float(attempt), "error": None})
    ledger.close()
    size = ledger_path.stat().st_size
    assert size > 8 * 4096
    with open(ledger_path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xff" * 200)
    before = fingerprint(ledger_path)

    line = assert_one_line_refusal(serve_once(broker), str(ledger_path), "is damaged", "exocom deployments reset")
    assert json.loads(line)["event"] == "exocom cannot start"
    assert fingerprint(ledger_path) == before
    listed = exocom_deployments("--state-dir", str(broker.state_dir), "--config", str(broker.config))
    assert_one_line_refusal(listed, str(ledger_path), "is damaged")
    assert fingerprint(ledger_path) == before

    # What the refusal says to do: reset moves it aside, and the broker starts afresh.
    reset = exocom_deployments("reset", "--state-dir", str(broker.state_dir))
    assert reset.returncode == 0, reset.stderr
    [aside] = [p for p in broker.state_dir.iterdir() if p.name.startswith(FILE_NAME + ".reset-")]
    assert fingerprint(aside)[0] == before[0]
    broker.start()
    assert steps(broker.deployment("todos", NEW)) == {"offline": ("pending", 0), "online": ("pending", 0)}


@pytest.mark.parametrize("trace", [MARKER_NAME, FILE_NAME + "-wal"])
def test_a_missing_ledger_is_not_created_again_where_the_state_directory_shows_it_existed(broker, trace):
    broker.start()
    broker.stop()
    ledger_path = broker.state_dir / FILE_NAME
    ledger_path.unlink()
    if trace == MARKER_NAME:
        assert (broker.state_dir / MARKER_NAME).is_file()
    else:  # an older exocom wrote no marker; SQLite's files show it too
        (broker.state_dir / MARKER_NAME).unlink(missing_ok=True)
        (broker.state_dir / trace).write_bytes(b"")

    assert_one_line_refusal(serve_once(broker), f"the ledger {ledger_path} is missing", trace,
                            f"exocom deployments reset --state-dir {broker.state_dir}")
    assert not ledger_path.exists()
    listed = exocom_deployments("--state-dir", str(broker.state_dir), "--config", str(broker.config))
    assert_one_line_refusal(listed, "is missing")

    reset = exocom_deployments("reset", "--state-dir", str(broker.state_dir))
    assert reset.returncode == 0 and "every deployment step runs again" in reset.stdout, reset
    broker.start()


# ----------------------------------------------------------- while running


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_a_ledger_deleted_or_replaced_while_running_is_written_again_and_no_step_runs_twice(broker, tmp_path,
                                                                                                     how):
    await start(broker)
    ledger_path = broker.state_dir / FILE_NAME
    log = ScriptLog()
    async with todos(broker.url, NEW, []), deployment_script(broker.url, log):
        await wait_deployment(broker.port, lambda d: d["finished"], "the deployment to finish")
        written = records_in(ledger_path)
        assert len(written) == 4

        if how == "deleted":
            ledger_path.unlink()
        else:
            # Say, a backup restored over it by mistake: another ledger, with nothing in it.
            other = SQLiteLedger(tmp_path / "other" / FILE_NAME)
            other.close()
            os.replace(tmp_path / "other" / FILE_NAME, ledger_path)

        def event(name):
            return next((e for e in broker.events() if e["event"] == name), None)

        lost = await wait_until(lambda: event("ledger lost"), "the broker to notice")
        assert lost["level"] == "error" and lost["path"] == str(ledger_path)
        rewritten = await wait_until(lambda: event("ledger rewritten"), "the ledger to be written again")
        assert rewritten["records"] == 4
        assert records_in(ledger_path) == written
        # Never deleted: the replacement, and the -wal/-shm files the old ledger left
        # (SQLite keeps them when its file is gone; the fresh ledger would take them for its own).
        aside = rewritten["moved_aside"]
        assert {name.split(".replaced-")[0] for name in aside} == {
            *([FILE_NAME] if how == "replaced" else []), FILE_NAME + "-wal", FILE_NAME + "-shm"}
        if how == "replaced":
            assert records_in(broker.state_dir / aside[0]) == []
        assert (await trio.to_thread.run_sync(readyz, broker))[0] == 200

        await crash(broker)
        await start(broker)
        d = await wait_deployment(broker.port, lambda d: d["finished"], "the ledger to be read again")
        assert steps(d) == {"offline": ("done", 1), "online": ("done", 1)}
    assert log.starts == [("offline", 1), ("online", 1)]


def test_the_core_starts_no_step_while_the_ledger_is_lost_and_keeps_every_record():
    h = Harness(routes())
    h.connect("todos-deployment")
    h.broker.ledger_lost()
    h.connect("todos", NEW)
    assert h.unwritten == [] and h.ledger == []
    h.run(h.broker.ledger_restored(h.now))
    assert [(r["step"], r["event"]) for r in h.ledger] == [("offline", "started")]
    assert h.broker.records == h.ledger
