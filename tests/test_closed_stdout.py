"""`exocom serve | head`: the reader of the broker's stdout goes away. The
broker keeps serving and logs to stderr from then on (docs/OPERATING.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import trio
from trio_websocket import open_websocket_url

from test_cli import EXOCOM, ROUTES, environment, free_port, get_config, wait_config
from wire import Service


class Lines:
    """The lines a stream printed so far; waits for one with a deadline."""

    def __init__(self, stream):
        self.stream = stream
        self.text = ""

    async def wait_for(self, needle: str, timeout: float = 10.0) -> str:
        with trio.fail_after(timeout):
            while needle not in self.text:
                chunk = await self.stream.receive_some()
                if not chunk:
                    raise AssertionError(f"ended without {needle!r}:\n{self.text}")
                self.text += chunk.decode()
        return next(line for line in self.text.splitlines() if needle in line)


async def test_the_broker_keeps_serving_and_logs_to_stderr_when_its_stdout_is_closed(tmp_path):
    port = free_port()
    command = [*EXOCOM, "serve", "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(tmp_path / "state"),
               "--log-format", "json"]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                               env=environment(SERVICE_DATA=json.dumps(ROUTES)))
    try:
        stdout, stderr = Lines(process.stdout), Lines(process.stderr)
        await stdout.wait_for('"broker listening"')
        await process.stdout.aclose()  # what `| head -1` does after its line

        url = f"ws://127.0.0.1:{port}/services"
        async with open_websocket_url(url) as ws_web, open_websocket_url(url) as ws_users:
            web, users = Service(ws_web, "web"), Service(ws_users, "users")
            await web.register()  # logged: the first write into the closed pipe
            await users.register()
            await wait_config(port, lambda c: len(c["clients"]) == 2)
            notice = json.loads(await stderr.wait_for("log output closed"))
            assert notice["event"] == "log output closed: logging to stderr" and "Broken pipe" in notice["error"]
            assert json.loads(await stderr.wait_for('"role":"users"'))["event"] == "service registered"
            await web.send("users create", {"name": "Jean"})
            assert (await users.receive())["name"] == "mongo create"  # still routing
        assert process.returncode is None and (await get_config(port))["routes"]

        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
        await stderr.wait_for('"broker stopped"')
        while chunk := await process.stderr.receive_some():
            stderr.text += chunk.decode()
        assert "Traceback" not in stderr.text and "Exception ignored" not in stderr.text, stderr.text
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_a_one_shot_command_ends_quietly_with_exit_1_when_its_reader_is_gone(tmp_path):
    # `exocom deployments --json | head -c 10`: no reader left at all (the read
    # end is closed before the command starts), so its first write fails.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([*EXOCOM, "deployments", "--json", "--state-dir", str(tmp_path)], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, env=environment(), timeout=30)
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
