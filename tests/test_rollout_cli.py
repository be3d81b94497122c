"""Operators' commands for gradual rollouts (contract 7.4), end to end:
`exocom serve` as a subprocess with todos 2.0.0 ramping (the services and the
deployment script are `exocom.relay` clients in the test process), and
`exocom rollout`, `exocom rollback` and `exocom status [--watch]` as
subprocesses, each action checked on /deployments and /config.json."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import termios
from contextlib import asynccontextmanager

import pytest
import trio

from fleet import EXOCOM, NEW, OLD, ScriptLog, deployment, deployment_script, get, routes, todos, wait_until, web
from processes import BrokerProcess, free_port
from test_operations import environment

ROLLOUT = {"steps": [10, 50, 100], "interval": 600, "gates": {"minSamples": 5, "maxErrorRate": 0.5,
                                                             "maxDisconnects": 5}}
TARGET = f"todos@{NEW}"
ESC, HOME = b"\x1b", b"\x1b[H"


@pytest.fixture
def broker(tmp_path):
    config = tmp_path / "routes.json"
    config.write_text(json.dumps(routes(rollout=ROLLOUT)))
    process = BrokerProcess(tmp_path, "--config", str(config), env=environment())
    try:
        process.start()
        yield process
    finally:
        process.stop()


@asynccontextmanager
async def ramping(broker: BrokerProcess):
    """todos 1.0.0 live and 2.0.0 ramping at 10% (its interval is long: it stays there)."""
    async with todos(broker.url, OLD, []), web(broker.url), todos(broker.url, NEW, []), \
            deployment_script(broker.url, ScriptLog()):
        await wait_until(lambda: rollout_of(broker), "todos 2.0.0 to ramp")
        yield


async def rollout_of(broker: BrokerProcess) -> dict | None:
    d = await deployment(broker.port)
    return d["rollout"] if d["state"] == "ramping" else None


async def shares(broker: BrokerProcess) -> dict[str, tuple[str, float]]:
    """version of todos -> (state, share) as /config.json has them."""
    clients = (await get(broker.port, "/config.json"))["clients"]
    return {v["version"]: (v["state"], v["share"]) for c in clients if c["role"] == "todos" for v in c["versions"]}


async def exocom(*args: str) -> tuple[int, str, str]:
    with trio.fail_after(30):
        result = await trio.run_process([*EXOCOM, *args], capture_stdout=True, capture_stderr=True, check=False,
                                        env=environment())
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def until_shares(broker: BrokerProcess, expected: dict[str, tuple[str, float]]) -> None:
    async def check():
        return await shares(broker) == expected
    await wait_until(check, f"todos versions to be {expected}")


def rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines()]


async def test_an_operator_follows_pauses_resumes_promotes_and_rolls_back_a_ramp(broker):
    async with ramping(broker):
        code, out, err = await exocom("rollout", TARGET, "--url", broker.http)
        assert code == 0, err
        assert out.startswith(f"{TARGET}: ramping, 10% of new activities (steps 10% -> 50% -> 100%"), out
        assert re.search(r"step 1 of 3 at 10%, next step \(50%\) in (9m\d\ds|10m00s), after 5 more replies", out), out
        gate_rows = rows(out)
        assert ["replies", "0", "/", "minSamples", "5", "waiting"] in gate_rows
        assert ["errorRate", "0", "(0", "of", "0)", "/", "max", "0.5", "waiting"] in gate_rows
        assert ["disconnects", "0", "/", "max", "5", "ok"] in gate_rows
        code, out, _ = await exocom("rollout", TARGET, "status", "--json", "--url", broker.http)
        view = json.loads(out)
        assert (code, view["deployment"]["rollout"]["step"], view["deployment"]["share"]) == (0, 0, 10)
        assert [(g["gate"], g["limit"], g["verdict"]) for g in view["gates"]] == [
            ("replies", 5, "waiting"), ("errorRate", 0.5, "waiting"), ("disconnects", 5, "ok")]

        # `exocom status`: shares per version; a ramp is not a problem.
        code, out, err = await exocom("status", "--url", broker.http)
        assert code == 0, out + err
        assert ["todos", NEW, "ramping", "10%", "1"] in rows(out) and ["todos", OLD, "live", "90%", "1"] in rows(out)
        assert f"todos {NEW} is ramping: 10% of new activities, step 1 of 3 at 10%" in out
        assert "OK: no connected version is held or failed" in out

        code, out, err = await exocom("rollout", TARGET, "pause", "--url", broker.http)
        assert (code, err) == (0, ""), err
        assert out.startswith(f"{TARGET}: pause accepted")
        await wait_until(lambda: _paused(broker, True), "the ramp to be paused")
        assert await shares(broker) == {NEW: ("ramping", 10), OLD: ("live", 90)}
        code, out, _ = await exocom("rollout", TARGET, "--url", broker.http)
        assert f"step 1 of 3 at 10%, paused (exocom rollout {TARGET} resume)" in out
        code, out, err = await exocom("rollout", TARGET, "pause", "--url", broker.http)
        assert (code, out) == (1, "") and f"the ramp of {TARGET} is paused already" in err

        assert (await exocom("rollout", TARGET, "resume", "--url", broker.http))[0] == 0
        await wait_until(lambda: _paused(broker, False), "the ramp to resume")

        assert (await exocom("rollout", TARGET, "promote", "--url", broker.http))[0] == 0
        await until_shares(broker, {NEW: ("live", 100), OLD: ("draining", 0)})
        assert (await deployment(broker.port))["state"] == "live"
        code, out, _ = await exocom("status", "--url", broker.http)
        assert code == 0, out  # draining is where the replaced version is meant to be
        assert ["todos", OLD, "draining", "0%", "1"] in rows(out) and f"todos {OLD} is draining" in out
        code, out, _ = await exocom("rollout", TARGET, "--url", broker.http)
        assert "the rollout is over: it is the stable version" in out

        code, out, err = await exocom("rollback", TARGET, "--url", broker.http)
        assert code == 0, err
        await until_shares(broker, {NEW: ("failed", 0), OLD: ("live", 100)})
        d = await deployment(broker.port)
        assert (d["state"], d["stopped"]) == ("failed", "rolled back by an operator")
        code, out, _ = await exocom("status", "--url", broker.http)
        assert code == 1 and f"deployment {TARGET} failed: rolled back by an operator" in out


async def _paused(broker: BrokerProcess, paused: bool) -> bool:
    return (await deployment(broker.port))["rollout"]["paused"] is paused


async def test_an_operator_aborts_a_ramp_and_what_is_not_possible_says_why(broker):
    async with ramping(broker):
        code, out, err = await exocom("rollback", TARGET, "--url", broker.http)
        assert (code, out) == (1, "") and "is not a live version (state ramping)" in err, err

        code, out, err = await exocom("rollout", TARGET, "abort", "--url", broker.http)
        assert code == 0, err
        await until_shares(broker, {NEW: ("failed", 0), OLD: ("live", 100)})
        d = await deployment(broker.port)
        assert (d["state"], d["share"], d["stopped"]) == ("failed", 0, "aborted by an operator")

        code, out, err = await exocom("rollout", TARGET, "abort", "--url", broker.http)
        assert (code, out) == (1, "") and f"exocom rollout: {TARGET} is not ramping (state failed)" in err
        code, out, _ = await exocom("rollout", TARGET, "--url", broker.http)
        assert code == 0 and "out of production: aborted by an operator" in out
        assert f"exocom deployments retry {TARGET}` starts the ramp again" in out


async def exocom_all(*commands: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """Run these commands at the same time (each is a process start: seconds in all, one by one)."""
    results: list = [None] * len(commands)

    async def run(i: int) -> None:
        results[i] = await exocom(*commands[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(commands)):
            nursery.start_soon(run, i)
    return results


async def test_wrong_targets_and_no_broker(broker):
    url = f"http://127.0.0.1:{free_port()}"
    malformed = [(*command, "--url", broker.http) for command in
                 (("rollout", "todos"), ("rollout", TARGET, "stop"), ("rollback", "todos@latest"))]
    unreachable = [(*command, "--url", url) for command in
                   (("rollout", TARGET), ("rollout", TARGET, "pause"), ("rollback", TARGET))]
    refused = [("rollout", "todos@9.9.9", "pause", "--url", broker.http),  # the broker's 404
               ("rollout", "todos@9.9.9", "--url", broker.http),
               ("rollout", TARGET, "promote", "--url", broker.http)]  # its 409: todos 2.0.0 is held
    results = await exocom_all(*malformed, *unreachable, *refused, ("status", "--watch", "--json", "--url", broker.http))

    for command, (code, out, err) in zip(malformed, results):
        assert (code, out) == (2, "") and err.startswith("usage: exocom"), (command, err)
    for command, (code, out, err) in zip(unreachable, results[3:]):
        assert code == 2 and f"no broker answers at {url}" in err and "exocom serve" in err, (command, err)
    [(code1, out1, err1), (code2, _, err2), (code3, _, err3), (code4, _, err4)] = results[6:]
    assert code4 == 2 and "--watch prints text for people" in err4
    assert (code1, out1) == (1, "") and "exocom rollout: no rollout of todos@9.9.9 is configured" in err1
    assert code2 == 1 and f"no rollout of todos@9.9.9 is configured; rollouts configured: {TARGET}" in err2
    assert code3 == 1 and f"exocom rollout: {TARGET} is not ramping (state held)" in err3


# ----------------------------------------------------------------------- --watch

async def read_until(stream: trio.abc.ReceiveStream, seen: bytearray, wanted: bytes, timeout: float = 15) -> None:
    with trio.fail_after(timeout):
        while wanted not in seen:
            chunk = await stream.receive_some()
            if not chunk:
                raise AssertionError(f"the output ended without {wanted!r}: {bytes(seen)!r}")
            seen += chunk


async def test_watch_prints_plain_timestamped_lines_per_change_when_not_on_a_terminal(broker):
    async with ramping(broker):
        process = await trio.lowlevel.open_process(
            [*EXOCOM, "status", "--watch", "--interval", "0.1", "--url", broker.http],
            stdout=subprocess.PIPE, env=environment())
        seen = bytearray()
        try:
            await read_until(process.stdout, seen, f"todos {NEW}: ramping, share 10%, 1 instance\n".encode())
            await read_until(process.stdout, seen, f"{TARGET}: deployment ramping".encode())
            assert b"paused" not in seen
            assert (await exocom("rollout", TARGET, "pause", "--url", broker.http))[0] == 0
            await read_until(process.stdout, seen, b"at 10%, paused")
            await trio.sleep(0.5)  # a few more looks: nothing changed, nothing printed
            process.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                assert await process.wait() == 0
            seen += await _rest(process.stdout)
        finally:
            process.kill()
    assert ESC not in seen
    lines = seen.decode().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d ", line) for line in lines), lines
    assert len([line for line in lines if f"{TARGET}: deployment" in line]) == 2, lines  # ramping, then paused
    assert len([line for line in lines if f"todos {OLD}:" in line]) == 1, lines


async def _rest(stream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some():
        out += chunk
    return bytes(out)


async def watch_on_a_terminal(broker: BrokerProcess, rows: int, columns: int, until: bytes) -> list[str]:
    """`exocom status --watch` with a pseudo terminal of this size as its
    stdout, until it shows `until` and has redrawn twice; then Ctrl-C (exit 0).
    Its whole frames, each from the cursor going home to the next time it does."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in environment().items() if k not in ("LINES", "COLUMNS")}  # they would override the size
    process = await trio.lowlevel.open_process(
        [*EXOCOM, "status", "--watch", "--interval", "0.1", "--url", broker.http], stdout=terminal, env=env)
    os.close(terminal)
    screen = trio.lowlevel.FdStream(controller)
    seen = bytearray()
    try:
        with trio.fail_after(15):
            while seen.count(HOME) < 3 or until not in seen:
                seen += await screen.receive_some()
        process.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            assert await process.wait() == 0
    finally:
        process.kill()
        await screen.aclose()
    return [frame.decode() for frame in seen.split(HOME)[1:-1]]


async def test_watch_redraws_in_place_on_a_terminal_until_ctrl_c(broker):
    async with ramping(broker):
        frames = await watch_on_a_terminal(broker, 60, 200, b"minSamples 5")  # the gate figures of the ramp
    frame = frames[-1]
    assert frame.endswith("\x1b[J") and "\x1b[K\r\n" in frame, frame
    assert re.search(rf"todos +{re.escape(NEW)} +ramping +10% +1", frame), frame
    assert re.search(r"next step \(50%\) in (9m\d\ds|10m00s)", frame) and "(Ctrl-C to stop)" in frame, frame
    assert re.search(r"replies +0 +/ +minSamples 5 +waiting", frame), frame


async def test_watch_fits_a_small_terminal_so_that_it_never_scrolls(broker):
    async with ramping(broker):
        frames = await watch_on_a_terminal(broker, 10, 60, b"more lines: enlarge the terminal")
    for frame in frames:
        lines = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", frame).split("\r\n")
        assert sum(max(1, -(-len(line) // 60)) for line in lines) <= 10, frame
