"""The compose stack's TCP load balancer (config/haproxy.cfg) in front of three
real clustered brokers: the file itself, with only the brokers' addresses and
the listening port rewritten for this machine. Needs HAProxy (Debian's
`haproxy`, which .ci/run installs); skipped, saying so, without it."""

from __future__ import annotations

import contextlib
import shutil
import socket
import signal
import subprocess

import pytest
import trio

from fleet import ask, get, todos, wait_until, web
from processes import ROOT, free_port
from test_cluster_e2e import cluster_of, valkey  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="haproxy is not installed (CI installs Debian's haproxy package)")


def balancer_config(tmp_path, port: int, brokers) -> str:
    text = (ROOT / "config" / "haproxy.cfg").read_text()
    text = text.replace("bind :4100", f"bind 127.0.0.1:{port}")
    # HAProxy wants two descriptors per connection: 20,000 connections need a limit this machine may not grant.
    text = text.replace("maxconn 20000", "maxconn 1000")
    for name, broker in zip("abc", brokers):
        text = text.replace(f"exocom-{name}:4100", f"127.0.0.1:{broker.port}")
    assert "exocom-" not in text, "config/haproxy.cfg names a broker this test does not know"
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    return str(path)


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


async def holder_of(brokers, role: str):
    for broker in brokers:
        clients = (await get(broker.port, "/config.json"))["clients"]
        if any(c["role"] == role for c in clients):
            return broker
    return None


async def test_services_behind_the_balancer_move_to_a_live_broker_when_theirs_is_killed(tmp_path, valkey):
    with cluster_of(tmp_path, valkey) as brokers:
        port = free_port()
        config = balancer_config(tmp_path, port, brokers)
        checked = subprocess.run(["haproxy", "-c", "-f", config], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        balancer = subprocess.Popen(["haproxy", "-db", "-f", config], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
        try:
            await wait_until(lambda: balancer.poll() is not None or listening(port), "HAProxy to listen")
            assert balancer.poll() is None, balancer.stderr.read().decode()
            with trio.fail_after(60):  # a relay retries for ever: a balancer that never lets it in must not hang
                await kill_the_broker_behind(brokers, f"ws://127.0.0.1:{port}/services")
        finally:
            balancer.terminate()
            balancer.wait(timeout=10)


async def kill_the_broker_behind(brokers, url: str) -> None:
    async def answered():
        # web and todos may be on different brokers, and the first ask may come before web's broker heard
        # where todos is (a few ms): asked again, as a service would.
        with trio.move_on_after(2):
            return await ask(client, "through the balancer") == "1.0.0"

    async with todos(url, "1.0.0", []), web(url) as client:
        await wait_until(answered, "an answer through the balancer", timeout=10)
        victim = await holder_of(brokers, "todos")
        victim.kill(signal.SIGKILL)
        alive = [b for b in brokers if b is not victim]

        async def moved():
            return await holder_of(alive, "todos")

        await wait_until(moved, "todos to reconnect through the balancer to a live broker", timeout=15)
        await wait_until(answered, "an answer through the balancer after the kill", timeout=15)
