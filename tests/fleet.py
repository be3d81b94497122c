"""Helpers for the deployment tests that run over real sockets: the todos fleet
(two versions of `todos`, a `web` client, the deployment script of todos
2.0.0), written with the public Python client `exocom.relay`, and small async
HTTP helpers for the broker's endpoints."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable

import trio

from exocom.logs import FIELDS_ATTRIBUTE
from exocom.relay import DeploymentScript, Message, Relay, open_relay

NEW = "2.0.0"
OLD = "1.0.0"
PREFIX = f"deployment-todos-{NEW}"
# Reconnect quickly: the crash tests restart the broker under the relays.
FAST = {"min_backoff": 0.02, "max_backoff": 0.1}

_SCRIPT = Path(sys.executable).with_name("exocom")
EXOCOM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "exocom"]


def routes(**script_options: Any) -> dict:
    return {
        "web": {"sends": ["todos.list"], "receives": ["todos.listing"]},
        "todos": {"receives": ["todos.list"], "sends": ["todos.listing"]},
        "todos-deployment": {"deploys": f"todos@{NEW}", "sends": ["todos.list"], "receives": ["todos.listing"],
                             **script_options},
    }


def handlers(**by_name) -> Callable[[Relay], None]:
    """A `setup` for open_relay: attach these handlers before the relay
    registers (a deployment start may arrive as soon as it is registered)."""
    def setup(relay: Relay) -> None:
        for name, fn in by_name.items():
            relay.handler(name)(fn)
    return setup


@asynccontextmanager
async def todos(url: str, version: str, received: list):
    """An instance of `todos`; it answers `todos.list` with its version and
    appends the `tag` of every request it got to `received`."""
    async def listing(message: Message) -> None:
        received.append((message.payload or {}).get("tag"))
        await message.reply("todos.listing", {"version": version})

    async with open_relay(url, "todos", version, setup=handlers(**{"todos.list": listing}), **FAST) as relay:
        yield relay


@asynccontextmanager
async def web(url: str):
    async with open_relay(url, "web", **FAST) as relay:
        yield relay


async def ask(relay: Relay, tag: str, version: str | None = None, timeout: float = 5.0) -> str:
    """Send `todos.list` and return the version of the instance that answered."""
    answer = await relay.request("todos.list", {"tag": tag}, version=version, timeout=timeout)
    return answer.payload["version"]


class ScriptLog:
    """Records every start message a deployment script relay gets (step and
    payload attempt) and can abandon running steps without answering them."""

    def __init__(self) -> None:
        self.starts: list[tuple[str, int]] = []
        self._running: set[trio.CancelScope] = set()

    def attach(self, relay: Relay, script: DeploymentScript) -> None:
        script.attach(relay)
        for name, run in list(relay.handlers.items()):
            relay.handlers[name] = self._wrap(name, run)

    def _wrap(self, name: str, run):
        step = name[len(PREFIX) + 1:-len("-start")]

        async def handle(message: Message) -> None:
            self.starts.append((step, (message.payload or {}).get("attempt")))
            with trio.CancelScope() as scope:
                self._running.add(scope)
                try:
                    await run(message)
                finally:
                    self._running.discard(scope)

        return handle

    def abandon(self) -> None:
        """Stop the running steps; they never answer."""
        for scope in list(self._running):
            scope.cancel()

    async def wait_starts(self, count: int, timeout: float = 5.0) -> list[tuple[str, int]]:
        await wait_until(lambda: len(self.starts) >= count, f"{count} start messages (got {self.starts})", timeout)
        return self.starts


@asynccontextmanager
async def deployment_script(url: str, log: ScriptLog, *, offline=None, online=None):
    script = DeploymentScript("todos", NEW, offline=offline, online=online)
    async with open_relay(url, "todos-deployment", setup=lambda relay: log.attach(relay, script), **FAST) as relay:
        yield relay


async def wait_until(condition, what: str, timeout: float = 5.0, interval: float = 0.01):
    """Poll `condition` (sync or async) until it returns something true; return that."""
    with trio.move_on_after(timeout):
        while True:
            value = condition()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return value
            await trio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")


# ------------------------------------------------------------------- HTTP

def _http(port: int, method: str, path: str) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=b"" if method == "POST" else None)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


async def http(port: int, method: str, path: str) -> tuple[int, Any]:
    return await trio.to_thread.run_sync(_http, port, method, path)


async def get(port: int, path: str) -> Any:
    status, body = await http(port, "GET", path)
    assert status == 200, (status, body)
    return body


async def deployment(port: int, version: str = NEW) -> dict:
    [d] = [d for d in (await get(port, "/deployments"))["deployments"] if d["version"] == version]
    assert d["role"] == "todos"
    return d


def failure_recorded(d: dict) -> bool:
    """A step of the deployment is failed in the ledger (its version is out of
    production already before that: failure never waits for the ledger)."""
    return any(s["status"] == "failed" for s in d["steps"])


def steps(d: dict) -> dict[str, tuple[str, int]]:
    """{"offline": (status, attempts), "online": (status, attempts)}"""
    return {s["step"]: (s["status"], s["attempts"]) for s in d["steps"]}


async def todos_states(port: int) -> dict[str, str]:
    """The versions of `todos` that /config.json lists, with their states."""
    clients = (await get(port, "/config.json"))["clients"]
    return {v["version"]: v["state"] for c in clients if c["role"] == "todos" for v in c["versions"]}


async def wait_connected(port: int, *versions: str, roles: tuple[str, ...] = ("web", "todos-deployment")) -> None:
    """Until /config.json lists these versions of `todos` and these other roles."""
    async def check():
        clients = (await get(port, "/config.json"))["clients"]
        have = {c["role"] for c in clients} | {v["version"] for c in clients if c["role"] == "todos"
                                                for v in c["versions"]}
        return have >= {*versions, *roles}
    await wait_until(check, f"todos {versions} and {roles} to be connected")


async def wait_deployment(port: int, condition, what: str, timeout: float = 5.0) -> dict:
    async def check():
        d = await deployment(port)
        return d if condition(d) else None
    return await wait_until(check, what, timeout)


@contextlib.contextmanager
def relay_events():
    """The relay's log events, as the host program's `logging` receives them."""
    events: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record):
            events.append({**getattr(record, FIELDS_ATTRIBUTE), "log_level": record.levelname.lower()})

    handler, logger = Collect(), logging.getLogger("exocom.relay")
    logger.addHandler(handler)
    try:
        yield events
    finally:
        logger.removeHandler(handler)
