"""Real processes for end-to-end tests: `exocom serve` and the example services."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import auth_mode
from exocom.core.config import default_config_text

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "todo_app"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class BrokerProcess:
    def __init__(self, tmp_path: Path, *args: str, port: int | None = None, env: dict | None = None,
                 log_name: str = "broker.log"):
        self.port = port or free_port()
        self.state_dir = tmp_path / "state"
        self.log_path = tmp_path / log_name
        self.args = ["--port", str(self.port), "--host", "127.0.0.1", "--state-dir", str(self.state_dir),
                     "--log-format", "json", *args]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/services"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _auth_args(self) -> list[str]:
        """EXOCOM_TEST_REQUIRE_AUTH=1 (tests/auth_mode.py): every role of the routing gets a token."""
        if not auth_mode.ON:
            return []
        if "--config" in self.args:
            at = self.args.index("--config") + 1
            path = (ROOT / self.args[at]).resolve()
            if path.is_relative_to(ROOT):  # a file of the repository: a copy (tests rewrite theirs in place)
                copy = self.state_dir.parent / f"with-tokens-{path.name}"
                copy.write_text(auth_mode.text_with_tokens(path.read_text()))
                self.args[at] = str(copy)
            else:
                auth_mode.rewrite_file(path)
            return ["--require-auth"]
        if "SERVICE_DATA" in self.env:
            self.env["SERVICE_DATA"] = auth_mode.text_with_tokens(self.env["SERVICE_DATA"])
            return ["--require-auth"]
        default = self.state_dir.parent / "default-routes-with-tokens.json"
        default.write_text(auth_mode.text_with_tokens(default_config_text()[0]))
        return ["--require-auth", "--config", str(default)]

    def start(self) -> BrokerProcess:
        extra = self._auth_args()  # first: it may point --config at a copy
        log = open(self.log_path, "a")
        self.process = subprocess.Popen([sys.executable, "-m", "exocom", "serve", *self.args, *extra],
                                        stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        log.close()
        wait_for(lambda: self.process.poll() is not None or self.get("/healthz") is not None,
                 what="the broker to listen")
        assert self.process.poll() is None, self.log_path.read_text()
        return self

    def get(self, path: str):
        try:
            with urllib.request.urlopen(self.http + path, timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def post(self, path: str) -> int:
        """POST without a body; the HTTP status."""
        request = urllib.request.Request(self.http + path, method="POST", data=b"")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code

    def events(self) -> list[dict]:
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def deployment(self, role: str, version: str) -> dict | None:
        body = self.get("/deployments") or {"deployments": []}
        return next((d for d in body["deployments"] if d["role"] == role and d["version"] == version), None)

    def instances(self, role: str) -> int:
        config = self.get("/config.json") or {"clients": []}
        return sum(c["instances"] for c in config["clients"] if c["role"] == role)

    def wait_registered(self, role: str, instances: int = 1) -> None:
        wait_for(lambda: self.instances(role) >= instances, what=f"{role} to register")

    def wait_deregistered(self, role: str) -> None:
        wait_for(lambda: self.instances(role) == 0, what=f"{role} to deregister")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=15)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class RoutesPath(type(Path())):
    """A routing file that gets a token on every role whenever a test writes it, in EXOCOM_TEST_REQUIRE_AUTH mode."""

    def write_text(self, data, *args, **kwargs):
        return super().write_text(auth_mode.text_with_tokens(data), *args, **kwargs)


@contextlib.contextmanager
def broker_with_config(tmp_path: Path, routes: dict, *args: str):
    """A BrokerProcess (not started) on `--config` with these routes, written
    to `.config` (rewrite it to reload), stopped at the end."""
    config = RoutesPath(tmp_path / "routes.json")
    config.write_text(json.dumps(routes))
    process = BrokerProcess(tmp_path, "--config", str(config), *args)
    process.config = config
    try:
        yield process
    finally:
        process.stop()


def start_example(script: str, *args: str, log: Path) -> subprocess.Popen:
    out = open(log, "a")
    process = subprocess.Popen([sys.executable, str(EXAMPLES / script), *args], stdout=out,
                               stderr=subprocess.STDOUT, cwd=EXAMPLES)
    out.close()
    return process


def run_web(url: str, *args: str, timeout: float = 5.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / "web.py"), "--url", url, "--timeout", str(timeout), *args],
                          capture_output=True, text=True, cwd=EXAMPLES, timeout=60)
