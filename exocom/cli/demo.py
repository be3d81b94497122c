"""`exocom demo`: the tutorial's "Migration Scripts" chapter, live, in one command.

It starts real processes -- the broker (`exocom serve` on a free port, with a
temporary state directory) and the example services of examples/todo_app --
drives them with examples/todo_app/web.py, follows the broker's JSON log and
tells what happens, step by step:

Part 1, deploying todo-search 0.0.1 (config/todo-app.yml): todos 1.0.0 and a
few todos; todo-search 0.0.1 starts and is held (a search gets no answer);
its deployment script runs (offline step, version live, online step fills
the index); the search finds the old todos.

Part 2, todos 2.0.0 with a new schema next to 1.0.0 (config/todo-app-v2.yml):
the broker restarts with the new routing (the services reconnect, the ledger
remembers part 1); todos 2.0.0 starts held; its deployment script copies the
todos of 1.0.0 into it offline while production traffic still goes to 1.0.0;
then 2.0.0 takes the traffic, and requests pinned to version "1" still reach
1.0.0.

Part 3, gradual rollouts of todo-search (config/todo-app-v3.yml): the broker
restarts with routing in which the deployments of todo-search 0.0.2 and 0.0.3
declare a `rollout`; the demo sends steady searches as `web`. 0.0.2 ramps
10 % -> 50 % -> 100 % of new searches beside 0.0.1, which then drains; 0.0.3,
whose searches fail, is aborted at its first step by the error-rate gate. A
terminal chart shows, about once a second, each version's share (from GET
/config.json) and the answers it actually gave (the broker's log); the
figures that decided each step and the abort are printed.

With --secure, all of it runs with auth and TLS on (see `secure_setup`).

Everything is stopped at the end, also on Ctrl-C. It needs a source checkout
(the examples are not part of the installed package): it looks next to the
package, then in the current directory, or where `--root` says.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import trio
import yaml

from ..core.versions import Version
from ..relay import RelayError, RequestTimeout, client_context, open_relay
from .settings import port_argument  # the same port rules as `exocom serve`

TODOS = ("buy milk", "walk the dog", "water the plants")
ADDED_DURING_MIGRATION = "call mum"
ADDED_AFTER = "book the dentist"
WAIT = 20.0  # seconds to wait for any one thing before giving up
SEARCHES_PER_SECOND = 50  # part 3's steady traffic: 10 % of it gives a ramp's first step 10 replies in 2 s
SEARCH_TIMEOUT = 5.0
CHART_PERIOD = 1.0  # seconds between two frames of part 3's chart
BAR = 20  # characters of a 100 % bar


CONFIGS = ("todo-app.yml", "todo-app-v2.yml", "todo-app-v3.yml")


class Secure:
    """--secure: what `secure_setup` made in the work directory."""

    def __init__(self, dir: Path, configs: dict[str, Path], tokens: dict[str, str],
                 certs: dict[str, tuple[str, str]], admin_token: str):
        self.dir, self.configs, self.tokens, self.certs, self.admin_token = dir, configs, tokens, certs, admin_token
        self.ca = str(dir / "ca.pem")

    def broker_args(self) -> list[str]:
        return ["--tls-cert", str(self.dir / "server.pem"), "--tls-key", str(self.dir / "server-key.pem"),
                "--tls-client-ca", self.ca, "--require-auth", "--admin-token-file", str(self.dir / "admin-token"),
                "--protect-reads"]

    def env(self, role: str) -> dict[str, str]:
        """What the example services read: EXOCOM_TOKEN and EXOCOM_TLS_* (exocom/relay/tls.py)."""
        cert, key = self.certs[role]
        return {"EXOCOM_TOKEN": self.tokens[role], "EXOCOM_TLS_CA": self.ca,
                "EXOCOM_TLS_CLIENT_CERT": cert, "EXOCOM_TLS_CLIENT_KEY": key}

    def context(self, role: str) -> ssl.SSLContext:
        return client_context(self.ca, *self.certs[role])


def secure_setup(root: Path, workdir: Path) -> Secure:
    """A CA, a server certificate for 127.0.0.1, per role a random token and a
    client certificate with the URI SAN exocom:role:ROLE, an operator token,
    and copies of config/*.yml with a tokenSha256 on every role -- all in
    `workdir`/secure (config/ is never changed). Needs trustme (the [test] extra)."""
    import trustme

    from .certificates import role_certificate

    dir = workdir / "secure"
    dir.mkdir()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(dir / "ca.pem"))
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(dir / "server.pem"))
    server.private_key_pem.write_to_path(str(dir / "server-key.pem"))
    admin_token = secrets.token_urlsafe(24)
    (dir / "admin-token").write_text(admin_token + "\n")
    routes = {name: yaml.safe_load((root / "config" / name).read_text()) for name in CONFIGS}
    roles = sorted({role for data in routes.values() for role in data})
    tokens = {role: secrets.token_urlsafe(24) for role in roles}
    configs = {}
    for name, data in routes.items():
        secured = {role: {**(entry or {}), "tokenSha256": hashlib.sha256(tokens[role].encode()).hexdigest()}
                   for role, entry in data.items()}
        configs[name] = dir / name
        configs[name].write_text(yaml.safe_dump(secured, sort_keys=False))
    # Per role its certificate; "operator" (no role) for the demo's own https calls: --tls-client-ca wants one of all.
    certs = {role: role_certificate(ca, dir, role, *([role] if role in tokens else [])) for role in [*roles, "operator"]}
    return Secure(dir, configs, tokens, certs, admin_token)


def _stop_process(process: subprocess.Popen, sig: int, timeout: float) -> None:
    """`sig` to a running process, then SIGKILL if it has not exited after `timeout` seconds."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class DemoError(Exception):
    """The demo cannot go on; the message says why."""


def find_root(explicit: str | None = None) -> Path:
    here = Path(__file__).resolve().parents[2]
    candidates = [Path(explicit)] if explicit else [here, Path.cwd()]
    for root in candidates:
        if (root / "examples" / "todo_app" / "web.py").is_file() and (root / "config" / "todo-app.yml").is_file():
            return root.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise DemoError(f"exocom demo needs the examples of a source checkout (examples/todo_app and config/), "
                    f"which are not part of the installed package; looked in: {looked}. "
                    f"Run it from a checkout, or pass --root CHECKOUT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BrokerLog:
    """The broker's JSON log lines, as they come, from every broker process
    the demo started (also copied to a file)."""

    def __init__(self, path: Path):
        self.events: list[dict[str, Any]] = []
        self.condition = threading.Condition()
        self.file = open(path, "a", encoding="utf-8")
        self.running = False

    def follow(self, stream) -> None:
        with self.condition:
            self.running = True
        for line in stream:
            self.file.write(line)
            self.file.flush()
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                with self.condition:
                    self.events.append(event)
                    self.condition.notify_all()
        with self.condition:
            self.running = False
            self.condition.notify_all()

    def mark(self) -> int:
        with self.condition:
            return len(self.events)

    def wait(self, predicate: Callable[[dict], bool], since: int, what: str, timeout: float = WAIT,
             check: Callable[[], None] | None = None) -> tuple[int, dict]:
        """The first event at index >= `since` that satisfies `predicate`."""
        found = self.find(predicate, since, time.monotonic() + timeout, check)
        if found is None:
            raise DemoError(f"gave up after {timeout:g}s waiting for {what}")
        return found

    def find(self, predicate: Callable[[dict], bool], since: int, deadline: float,
             check: Callable[[], None] | None = None) -> tuple[int, dict] | None:
        """As `wait`, but None once `deadline` (time.monotonic()) has passed."""
        scanned = since
        with self.condition:
            while True:
                for i in range(scanned, len(self.events)):
                    if predicate(self.events[i]):
                        return i, self.events[i]
                scanned = max(scanned, len(self.events))
                if check is not None:
                    check()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.condition.wait(min(remaining, 0.2))

    def since(self, index: int) -> list[dict]:
        with self.condition:
            return self.events[index:]

    def close(self) -> None:
        self.file.close()


def event_is(event: str, /, **fields) -> Callable[[dict], bool]:
    return lambda e: e.get("event") == event and all(e.get(k) == v for k, v in fields.items())


def short(payload: Any, limit: int = 150) -> str:
    text = json.dumps(payload)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def bar(percent: float, fill: str, empty: str) -> str:
    filled = round(max(0.0, min(percent, 100.0)) * BAR / 100)
    return fill * filled + empty * (BAR - filled)


def figures_text(figures: dict | None) -> str:
    """The figures a rollout's gates judged (core/gates.py: figures_of), in words."""
    if not figures:
        return "no figures"
    def seconds(value) -> str:
        return "-" if value is None else f"{value:g}s"
    return (f"replies {figures.get('replies')}, errors {figures.get('errors')}, error rate {figures.get('errorRate')}, "
            f"p90 reply time {seconds(figures.get('p90ReplyTimeS'))} (stable version "
            f"{seconds(figures.get('stableP90ReplyTimeS'))}), disconnects {figures.get('disconnects')}")


class Searches:
    """Part 3's steady production traffic: `web` searches todo-search at a
    steady rate, from a thread of the demo process through the Python relay.
    Each search is a new activity, so the broker places every one by the
    shares of the moment."""

    def __init__(self, url: str, rate: float = SEARCHES_PER_SECOND, concurrency: int = 5, **relay_options):
        self.url = url
        self.relay_options = relay_options  # --secure: ssl_context and token
        self.rate = rate
        self.concurrency = concurrency
        self.lock = threading.Lock()
        self.answers: Counter[str] = Counter()  # by reply name
        self.failed_by: Counter[str] = Counter()  # todo-search.failed says which version failed
        self.unanswered = 0
        self.problem: str | None = None
        self.online = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="web searches", daemon=True)
        self.thread.start()
        if not self.online.wait(WAIT) or self.problem is not None:
            raise DemoError(f"web could not connect to send the steady searches: {self.problem or 'timed out'}")

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def counts(self) -> tuple[dict[str, int], dict[str, int], int]:
        with self.lock:
            return dict(self.answers), dict(self.failed_by), self.unanswered

    def _run(self) -> None:
        try:
            trio.run(self._search)
        except (RelayError, OSError) as e:
            self.problem = str(e)
        finally:
            self.online.set()

    async def _search(self) -> None:
        async with open_relay(self.url, "web", connect_timeout=WAIT, **self.relay_options) as relay:
            self.online.set()
            async with trio.open_nursery() as nursery:
                for _ in range(self.concurrency):
                    nursery.start_soon(self._searcher, relay)

    async def _searcher(self, relay) -> None:
        period = self.concurrency / self.rate
        while not self.stopping.is_set():
            started = trio.current_time()
            try:
                answer = await relay.request("todo-search.query", {"text": "milk"}, timeout=SEARCH_TIMEOUT)
            except RequestTimeout:
                with self.lock:
                    self.unanswered += 1
            else:
                with self.lock:
                    self.answers[answer.name] += 1
                    if answer.name == "todo-search.failed":
                        self.failed_by[str((answer.payload or {}).get("version"))] += 1
            await trio.sleep(max(0.0, started + period - trio.current_time()))


class Demo:
    def __init__(self, root: Path, workdir: Path, port: int, pause: float, secure: Secure | None = None):
        self.root = root
        self.examples = root / "examples" / "todo_app"
        self.workdir = workdir
        self.port = port
        self.secure = secure
        self.url = f"{'wss' if secure else 'ws'}://127.0.0.1:{port}/services"
        self.pause = pause
        self.log = BrokerLog(workdir / "broker.log")
        self.broker: subprocess.Popen | None = None
        self.services: dict[str, subprocess.Popen] = {}
        self.searches: Searches | None = None
        self.started = time.monotonic()
        path = os.environ.get("PYTHONPATH")
        # The children import exocom from the same place as this process.
        package_root = str(Path(__file__).resolve().parents[2])
        self.env = {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else ""),
                    "PYTHONUNBUFFERED": "1"}
        for key in ("SERVICE_DATA", "EXOCOM_URL", "EXOCOM_TOKEN", "EXOCOM_TLS_CA", "EXOCOM_TLS_CLIENT_CERT",
                    "EXOCOM_TLS_CLIENT_KEY"):
            self.env.pop(key, None)

    def env_for(self, role: str) -> dict[str, str]:
        """The environment of a process that connects as `role`: with --secure, its token and certificate."""
        return {**self.env, **self.secure.env(role)} if self.secure else self.env

    # ------------------------------------------------------------- printing

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:5.1f}s] {text}", flush=True)

    def detail(self, text: str) -> None:
        print(f"         {text}", flush=True)

    def heading(self, text: str) -> None:
        print(f"\n=== {text}", flush=True)

    # ------------------------------------------------------------ processes

    def check_alive(self) -> None:
        if self.broker is not None and self.broker.poll() is not None:
            raise DemoError(f"the broker exited with code {self.broker.returncode} "
                            f"(log: {self.workdir / 'broker.log'})")
        for name, process in self.services.items():
            if process.poll() is not None:
                raise DemoError(f"{name} exited with code {process.returncode} (log: {self.workdir / (name + '.log')})")

    def wait(self, predicate, since: int, what: str, timeout: float = WAIT) -> tuple[int, dict]:
        return self.log.wait(predicate, since, what, timeout, self.check_alive)

    def start_broker(self, config: Path) -> None:
        since = self.log.mark()
        command = [sys.executable, "-m", "exocom", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                   "--state-dir", str(self.workdir / "state"), "--config", str(config),
                   "--log-format", "json", "--log-level", "debug", "--grace-period", "3"]
        if self.secure:  # the copy of the routing file with a tokenSha256 per role
            command[command.index(str(config))] = str(self.secure.configs[config.name])
            command += self.secure.broker_args()
        self.broker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env=self.env, cwd=self.workdir, start_new_session=True)
        threading.Thread(target=self.log.follow, args=(self.broker.stdout,), daemon=True).start()
        _, event = self.wait(lambda e: e.get("event") in ("broker listening", "exocom cannot start"), since,
                             "the broker to listen")
        if event["event"] != "broker listening":
            raise DemoError(f"the broker did not start: {event.get('error')}")
        self.say(f"broker listening on {self.url}")
        self.detail(f"routing: {config.relative_to(self.root)}, ledger: {self.workdir / 'state'}")
        for e in self.log.events[since:]:
            if e.get("event") in ("deployment held", "deployment live", "deployment failed"):
                target = f"{e['role']}@{e['version']}"
                if e["event"] == "deployment held":
                    self.detail(f"{target} is deployed by {e['script']}: held until its offline step is done")
                elif e["event"] == "deployment live":
                    self.detail(f"{target}: the ledger remembers its offline step is done, so it is live "
                                f"as soon as it registers")

    def stop_broker(self) -> None:
        if self.broker is None:
            return
        broker, self.broker = self.broker, None
        _stop_process(broker, signal.SIGTERM, timeout=10)

    def start(self, name: str, script: str, *args: str, role: str | None = None) -> None:
        with open(self.workdir / f"{name}.log", "a") as out:
            self.services[name] = subprocess.Popen(
                [sys.executable, str(self.examples / script), "--url", self.url, *args],
                stdout=out, stderr=subprocess.STDOUT, env=self.env_for(role or name), cwd=self.workdir,
                start_new_session=True)

    def restart_broker(self, part: str, config: str, *services: tuple[str, str]) -> None:
        """Restart the broker with the routing of `part` and wait until `services` (role, version) are back."""
        self.say(f"restarting the broker with the routing of {part} (same port, same ledger)")
        self.stop_broker()
        since = self.log.mark()
        self.start_broker(self.root / "config" / config)
        for role, version in services:
            event = self.registered(role, since, version)
            self.say(f"{role}@{version} registered again (its relay reconnected by itself): {event['state']}")

    def stop(self, name: str) -> None:
        """Ctrl-C (SIGINT) to a service: its relay closes the connection cleanly."""
        process = self.services.pop(name, None)
        if process is not None:
            _stop_process(process, signal.SIGINT, timeout=5)

    def stop_all(self) -> None:
        if self.searches is not None:
            self.searches.stop()
        for name in list(self.services):
            self.stop(name)
        self.stop_broker()

    def registered(self, role: str, since: int, version: str | None = None) -> dict:
        _, event = self.wait(event_is("service registered", role=role, **({"version": version} if version else {})),
                             since, f"{role} to register")
        return event

    # ------------------------------------------------------------------ web

    def web(self, *args: str, timeout: float = 5.0) -> tuple[bool, Any, str]:
        """Run web.py; return (answered, payload or error text, who answered)."""
        since = self.log.mark()
        result = subprocess.run([sys.executable, str(self.examples / "web.py"), "--url", self.url,
                                 "--timeout", str(timeout), *args], capture_output=True, text=True,
                                env=self.env_for("web"), cwd=self.workdir, timeout=timeout + 60)
        name = {"add": "todos.create", "list": "todos.list", "search": "todo-search.query"}[args[0]]
        if result.returncode != 0:
            return False, (result.stderr.strip().splitlines() or ["no output"])[-1], ""
        _, delivered = self.wait(event_is("message delivered", sender="web", name=name), since,
                                 f"the broker's record of web's {name}")
        return True, json.loads(result.stdout), f"{delivered['receiver']}@{delivered['receiver_version']}"

    def show_web(self, *args: str, timeout: float = 5.0) -> tuple[bool, Any, str]:
        answered, payload, by = self.web(*args, timeout=timeout)
        command = "web.py " + " ".join(f'"{a}"' if " " in a else a for a in args)
        if answered and isinstance(payload, list) and payload:
            self.say(f"{command}  ->  answered by {by}: {len(payload)} {'todo' if len(payload) == 1 else 'todos'}")
            for item in payload:
                self.detail(short(item))
        elif answered:
            self.say(f"{command}  ->  answered by {by}: {short(payload)}")
        else:
            self.say(f"{command}  ->  no answer ({payload})")
        return answered, payload, by

    # ------------------------------------------------------- deployment log

    def describe(self, e: dict, target: str, scripts: dict[str, str]) -> str | None:
        """A readable line for a broker event of the deployment of `target`, or None."""
        event = e.get("event")
        if event == "message delivered":
            def who(role: str, version: str) -> str:
                return role if role in scripts or role == "web" else f"{role}@{version}"
            line = f"{who(e['sender'], e['sender_version'])} --[ {e['name']} ]-> {who(e['receiver'], e['receiver_version'])}"
            if e["sender"] in scripts or e["receiver"] in scripts:
                return "    " + line
            if e["sender"] == "web":
                return "    production traffic: " + line
            return None
        if event == "service registered" and e.get("role") in scripts:
            return f"{e['role']} registered ({scripts[e['role']]})"
        if event in ("version draining", "version drained") and e.get("role") == target.split("@")[0]:
            return f"{e['role']}@{e['version']}: {event}: {e.get('reason')}"
        if f"{e.get('role')}@{e.get('version')}" != target:
            return None
        prefix = f"deployment {target}: "
        if event == "rollout started":
            return (prefix + f"rollout started: {e['share']:g} % of new production activities go to it "
                    f"(steps {', '.join(f'{s:g}' for s in e['steps'])} %, at least {e['interval_s']:g}s each)")
        if event == "rollout stepped up":
            return (prefix + f"rollout stepped up to {e['share']:g} %, the gates held\n"
                    f"         figures since the ramp began: {figures_text(e.get('figures'))}")
        if event == "rollout finished":
            return prefix + f"rollout finished at {e['share']:g} %"
        if event == "rollout aborted":
            return (prefix + f"rollout aborted at step {e['step'] + 1} of its ramp: {e.get('reason')}; "
                    f"its share is 0 now\n         deciding figures: {figures_text(e.get('figures'))}")
        if event == "version live" and e.get("was") == "ramping":
            return prefix + "version live: it is the stable version now, all new activities go to it"
        if event in ("offline step started", "online step started"):
            step = event.split()[0]
            return (prefix + f"{step} step started (attempt {e.get('attempt')}): the broker sent "
                    f"deployment-{target.replace('@', '-')}-{step}-start to {str(e.get('script')).split('@')[0]}")
        if event in ("offline step done", "online step done"):
            return prefix + f"{event} ({e.get('duration_s')}s)"
        if event == "version live":
            return prefix + "version live: production traffic may reach it now"
        if event == "deployment finished":
            return prefix + "deployment finished"
        if event in ("offline step failed", "online step failed", "step interrupted", "version taken out of production"):
            return prefix + f"{event}: {e.get('error') or e.get('reason') or ''}".rstrip(": ")
        return None

    def follow_deployment(self, target: str, scripts: dict[str, str], since: int,
                          on_event: Callable[[dict], None] | None = None) -> dict[str, int]:
        """Print the deployment of `target` as the broker logs it, until it
        finishes; return the log index of each milestone."""
        milestones: dict[str, int] = {}
        role, version = target.split("@")
        while True:
            i, e = self.wait(lambda e: self.describe(e, target, scripts) is not None, since,
                             f"the deployment of {target} to finish")
            since = i + 1
            if e.get("role") == role and e.get("version") == version:
                milestones.setdefault(e["event"], i)
            self.say(self.describe(e, target, scripts))
            if on_event is not None:
                on_event(e)
            if e["event"] in ("offline step failed", "online step failed", "version taken out of production"):
                raise DemoError(f"the deployment of {target} failed: {e.get('error')}")
            if e["event"] == "deployment finished" and e.get("role") == role:
                return milestones

    # ---------------------------------------------------------------- parts

    def part_one(self) -> None:
        self.heading("Part 1: deploy todo-search 0.0.1 into a running todo app (config/todo-app.yml)")
        self.start_broker(self.root / "config" / "todo-app.yml")

        since = self.log.mark()
        self.start("todos", "todos.py", "--db", str(self.workdir / "todos.sqlite3"))
        self.registered("todos", since)
        self.say("todos@1.0.0 registered")
        for title in TODOS:
            answered, payload, _ = self.show_web("add", title)
            if not answered:
                raise DemoError(f"todos did not answer: {payload}")

        since = self.log.mark()
        self.start("todo-search", "todo_search.py", "--version", "0.0.1", "--db", str(self.workdir / "todo-search.sqlite3"))
        event = self.registered("todo-search", since)
        self.say(f"todo-search@0.0.1 registered: {event['state']} (its deployment script has not run yet)")
        since = self.log.mark()
        answered, payload, by = self.show_web("search", "milk", timeout=1.0)
        if answered:
            raise DemoError(f"held todo-search answered a search: {payload}")
        _, undeliverable = self.wait(event_is("message undeliverable", sender="web", name="todo-search.query"),
                                     since, "the broker's record of the held search")
        reasons = "; ".join(f"{role}: {why}" for role, why in (undeliverable.get("missed") or {}).items())
        self.detail(f"the broker did not deliver it: {reasons or undeliverable.get('reason')}")
        self.say("the held search found nothing: todo-search gets no production traffic before its offline step")

        since = self.log.mark()
        self.start("todo-search-deployment", "todo_search_deployment.py")
        self.follow_deployment("todo-search@0.0.1", {"todo-search-deployment": "the deployment script"}, since)

        answered, payload, by = self.show_web("search", "milk")
        found = sorted(t["title"] for t in payload) if answered else []
        answered_all, everything, _ = self.show_web("search", "*")
        titles = sorted(t["title"] for t in everything) if answered_all else []
        if found != ["buy milk"] or titles != sorted(TODOS):
            raise DemoError(f"search did not find the old todos: {found}, {titles}")
        self.say(f"search finds the old todos: {', '.join(titles)}")
        self.stop("todo-search-deployment")
        self.say("the demo stopped the deployment script (Ctrl-C): its work is done, "
                 "the ledger records the deployment as finished")

    def part_two(self) -> None:
        self.heading("Part 2: todos 2.0.0 with a new schema, next to todos 1.0.0 (config/todo-app-v2.yml)")
        self.restart_broker("part 2", "todo-app-v2.yml", ("todos", "1.0.0"), ("todo-search", "0.0.1"))

        since = self.log.mark()
        self.start("todos-v2", "todos_v2.py", "--db", str(self.workdir / "todos-v2.sqlite3"), role="todos")
        event = self.registered("todos", since, "2.0.0")
        self.say(f"todos@2.0.0 registered: {event['state']} (new schema: title, done flag, created_at; empty)")
        answered, payload, by = self.show_web("list")
        if by != "todos@1.0.0":
            raise DemoError(f"todos.list went to {by or 'nobody'} while 2.0.0 is held")

        since = self.log.mark()
        probe: list[subprocess.Popen] = []

        def add_during_migration(e: dict) -> None:
            if e.get("event") == "offline step started" and not probe:
                # Production traffic while the offline step runs.
                probe.append(subprocess.Popen(
                    [sys.executable, str(self.examples / "web.py"), "--url", self.url, "add",
                     ADDED_DURING_MIGRATION], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    env=self.env_for("web"), cwd=self.workdir))
                self.detail(f'(meanwhile: web.py add "{ADDED_DURING_MIGRATION}")')

        self.start("todos-v2-deployment", "todos_v2_deployment.py", "--batch-size", "1", "--pause", str(self.pause))
        scripts = {"todos-v2-deployment": "the deployment script"}
        milestones = self.follow_deployment("todos@2.0.0", scripts, since, add_during_migration)
        if probe:
            out, err = probe[0].communicate(timeout=30)
            deliveries = [(i, e) for i, e in enumerate(self.log.events[since:], since)
                          if e.get("event") == "message delivered" and e.get("sender") == "web"
                          and e.get("name") == "todos.create"]
            if probe[0].returncode != 0 or not deliveries:
                raise DemoError(f"web.py add during the migration failed: {err.strip()}")
            i, delivered = deliveries[0]
            when = ("while the offline step ran" if milestones["offline step started"] < i < milestones.get("offline step done", 1 << 60)
                    else "after the offline step")
            self.say(f'web.py add "{ADDED_DURING_MIGRATION}" ({when})  ->  answered by '
                     f"{delivered['receiver']}@{delivered['receiver_version']}: {out.strip()}")

        answered, payload, by = self.show_web("list")
        if by != "todos@2.0.0":
            raise DemoError(f"todos.list went to {by or 'nobody'} after 2.0.0 went live")
        copied = sorted(t["title"] for t in payload)
        self.say(f"todos 2.0.0 serves production traffic, with every todo of 1.0.0: {', '.join(copied)}")
        answered, payload, by = self.show_web("list", "--pin", "1")
        if by != "todos@1.0.0":
            raise DemoError(f"todos.list pinned to version 1 went to {by or 'nobody'}")
        self.say('requests pinned to version "1" still reach todos 1.0.0')
        answered, payload, by = self.show_web("add", ADDED_AFTER)
        if by != "todos@2.0.0":
            raise DemoError(f"todos.create went to {by or 'nobody'}")

    def part_three(self) -> None:
        self.heading("Part 3: roll todo-search out gradually, under steady traffic (config/todo-app-v3.yml)")
        self.restart_broker("part 3", "todo-app-v3.yml", ("todos", "1.0.0"), ("todo-search", "0.0.1"))
        secure = self.secure
        self.searches = Searches(self.url, **({"ssl_context": secure.context("web"), "token": secure.tokens["web"]}
                                              if secure else {}))
        self.searches.start()
        self.say(f"web searches todo-search {SEARCHES_PER_SECOND} times a second from now on "
                 f"(a thread of this demo, through the Python relay)")

        since = self.log.mark()
        self.roll_out("0.0.2", "rollout finished")
        # Logged as 0.0.2 goes live, just before the rollout is finished.
        self.wait(event_is("version draining", role="todo-search", version="0.0.1"), since,
                  "todo-search 0.0.1 to drain")
        _, _, by = self.show_web("search", "milk")
        if by != "todo-search@0.0.2":
            raise DemoError(f"a search went to {by or 'nobody'} after todo-search 0.0.2 went live")
        self.stop("todo-search-0.0.2-deployment")

        abort = self.roll_out("0.0.3", "rollout aborted", "--fail-rate", "1")
        if abort.get("gate") != "errorRate" or abort.get("step") != 0:
            raise DemoError(f"todo-search 0.0.3 was aborted by gate {abort.get('gate')} at step "
                            f"{abort.get('step')}, not by the error-rate gate at its first step")
        # The share dropped to 0 before the abort was recorded; the record follows.
        deadline = time.monotonic() + WAIT
        while not (row := self.deployment_row("todo-search", "0.0.3"))["stopped"]:
            if time.monotonic() > deadline:
                raise DemoError("the abort of todo-search 0.0.3 was not recorded in the ledger")
            time.sleep(0.1)
        self.say(f"GET /deployments: todo-search@0.0.3 is {row['state']}, share {row['share']:g} %, "
                 f"recorded as stopped: {row['stopped']}")
        chart_from = self.log.mark()
        time.sleep(CHART_PERIOD)  # a second of traffic, to chart where it goes after the abort
        self.chart("todo-search", chart_from)
        _, _, by = self.show_web("search", "milk")
        if by != "todo-search@0.0.2":
            raise DemoError(f"a search went to {by or 'nobody'} after the rollout of 0.0.3 was aborted")
        self.searches.stop()
        answers, failed_by, unanswered = self.searches.counts()
        self.say(f"web's steady searches: {sum(answers.values())} answered ("
                 + ", ".join(f"{n} {name}" for name, n in sorted(answers.items())) + f"), {unanswered} unanswered")
        if unanswered:
            raise DemoError(f"{unanswered} of web's searches got no answer within {SEARCH_TIMEOUT:g}s")
        if failed_by:
            self.detail("todo-search.failed came from "
                        + ", ".join(f"{v} ({n})" for v, n in sorted(failed_by.items())))
        self.detail("an operator would now fix 0.0.3 and start its ramp again at its first step: "
                    "exocom deployments retry todo-search@0.0.3")

    def roll_out(self, version: str, outcome: str, *service_args: str) -> dict:
        """Start todo-search `version` and its deployment script and follow the
        rollout until `outcome`; returns that event."""
        target = f"todo-search@{version}"
        script = f"todo-search-{version}-deployment"
        since = self.log.mark()
        self.start(f"todo-search-{version}", "todo_search.py", "--version", version,
                   "--db", str(self.workdir / f"todo-search-{version}.sqlite3"), *service_args, role="todo-search")
        event = self.registered("todo-search", since, version)
        self.say(f"{target} registered{' (its searches fail)' if service_args else ''}: {event['state']} "
                 f"(its deployment declares a rollout)")
        since = self.log.mark()
        self.start(script, "todo_search_deployment.py", "--deploys", version, "--role", script, "--fill", "offline")
        return self.follow_rollout(target, {script: "its deployment script, which fills the index offline"},
                                   since, outcome)

    def follow_rollout(self, target: str, scripts: dict[str, str], since: int, outcome: str) -> dict:
        """Print the deployment of `target` as the broker logs it (but web's
        steady searches), with a frame of the chart about every second, until
        its rollout ends with `outcome`; returns that event."""
        role = target.split("@")[0]

        def told(e: dict) -> bool:
            return e.get("sender") != "web" and self.describe(e, target, scripts) is not None

        chart_from = since
        next_frame = time.monotonic() + CHART_PERIOD
        deadline = time.monotonic() + 3 * WAIT
        while True:
            found = self.log.find(told, since, min(next_frame, deadline), self.check_alive)
            if found is not None:
                i, e = found
                since = i + 1
                self.say(self.describe(e, target, scripts))
                event = e["event"] if (e.get("role"), e.get("version")) == tuple(target.split("@")) else None
                if event in ("offline step failed", "online step failed", "version taken out of production",
                             "rollout finished", "rollout aborted") and event != outcome:
                    raise DemoError(f"the rollout of {target}: {event} ({e.get('reason') or e.get('error')}), "
                                    f"expected: {outcome}")
                if event == "deployment finished":
                    self.detail("both steps are done; the ramp goes on (only its last step waits for the online step)")
                if event == outcome:
                    self.chart(role, chart_from)
                    return e
            if time.monotonic() >= deadline:
                raise DemoError(f"gave up after {3 * WAIT:g}s waiting for the {outcome.split()[1]} "
                                f"rollout of {target}")
            if time.monotonic() >= next_frame:
                chart_from = self.chart(role, chart_from)
                next_frame = time.monotonic() + CHART_PERIOD

    def chart(self, role: str, since: int) -> int:
        """One frame of the chart: per connected version of `role`, its share
        of new activities now (GET /config.json) and the answers it gave to web
        since log index `since` (the broker's deliveries); returns the index
        to count from next time."""
        events = self.log.since(since)
        answered = Counter(e["sender_version"] for e in events if e.get("event") == "message delivered"
                           and e.get("sender") == role and e.get("receiver") == "web")
        total = sum(answered.values())
        client = next((c for c in self.get("/config.json")["clients"] if c["role"] == role), {"versions": []})
        self.say(f"{role}: share of new activities (#) and of the {total} answers to web since the last frame (=)")
        for v in sorted(client["versions"], key=lambda v: Version(v["version"])):
            got = answered.get(v["version"], 0)
            percent = 100 * got / total if total else 0.0
            self.detail(f"{role}@{v['version']:<6} {v['state']:<9} "
                        f"share {v['share']:5.1f}% |{bar(v['share'], '#', '.')}|  "
                        f"answered {percent:5.1f}% |{bar(percent, '=', ' ')}| {got:4d}")
        return since + len(events)

    def deployment_row(self, role: str, version: str) -> dict:
        return next(d for d in self.get("/deployments")["deployments"] if (d["role"], d["version"]) == (role, version))

    def get(self, path: str) -> Any:
        if not self.secure:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return json.load(response)
        # --secure: https, the demo's CA, and the operator token (the broker's --admin-token-file, --protect-reads).
        request = urllib.request.Request(f"https://127.0.0.1:{self.port}{path}",
                                         headers={"Authorization": f"Bearer {self.secure.admin_token}"})
        with urllib.request.urlopen(request, timeout=5, context=self.secure.context("operator")) as response:
            return json.load(response)

    def finish(self) -> None:
        self.heading("Stopping")
        self.say("services: Ctrl-C to each (their relays close their connections); then the broker (SIGTERM)")
        self.stop_all()
        self.say("everything stopped")


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="exocom demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return main(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=port_argument, default=None, help="port of the broker (default: a free one)")
    parser.add_argument("--root", default=None, help="the source checkout with examples/ and config/")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, databases, ledger)")
    parser.add_argument("--skip-v2", action="store_true", help="skip part 2 (todos 2.0.0)")
    parser.add_argument("--skip-rollout", action="store_true",
                        help="skip part 3 (gradual rollouts of todo-search 0.0.2 and 0.0.3)")
    parser.add_argument("--secure", action="store_true",
                        help="auth and TLS on: a random token per role (--require-auth), wss:// and https:// with a "
                             "CA and certificates the demo makes (client certificates per role), an operator token "
                             "for the demo's own HTTP calls (needs trustme: pip install trustme)")
    parser.add_argument("--pause", type=float, default=0.4,
                        help="seconds the todos 2.0.0 migration waits after each todo it copies, so that the "
                             "demo can send traffic while it runs (default 0.4)")


def main(args) -> int:
    try:
        root = find_root(args.root)
    except DemoError as e:
        print(f"exocom demo: {e}", file=sys.stderr)
        return 2
    if args.secure:
        try:
            import trustme  # noqa: F401
        except ImportError:
            print("exocom demo: --secure makes its certificates with trustme: pip install trustme", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="exocom-demo-"))
    secure = secure_setup(root, workdir) if args.secure else None
    demo = Demo(root, workdir, args.port or free_port(), args.pause, secure)
    print(f"exocom demo: the todo app of the tutorial, with real processes (work directory {workdir})")
    if secure:
        print(f"Auth and TLS are on (--secure): the broker runs with --require-auth, and every role of the routing "
              f"files has a random token (copies in {secure.dir} with a tokenSha256 per role; config/ is unchanged); "
              f"it serves wss:// and https:// with a certificate for 127.0.0.1 of a CA the demo made, and "
              f"--tls-client-ca: each service shows a client certificate with the URI SAN exocom:role:NAME and its "
              f"token (EXOCOM_TOKEN, EXOCOM_TLS_*); the demo reads /config.json and /deployments over https with a "
              f"client certificate and an operator token (--admin-token-file, --protect-reads).")
    keep = args.keep
    code = 0
    try:
        done = ["the todo-search 0.0.1 deployment finished"]
        demo.part_one()
        if not args.skip_v2:
            demo.part_two()
            done.append("todos 2.0.0 took over from 1.0.0 with every todo")
        if not args.skip_rollout:
            demo.part_three()
            done.append("todo-search 0.0.2 ramped up to 100 % and the faulty 0.0.3 was aborted at its first step")
        demo.finish()
        skipped = [flag for flag, skip in (("--skip-v2", args.skip_v2), ("--skip-rollout", args.skip_rollout)) if skip]
        print(f"\nDone: {'; '.join(done)}" + (f" (skipped: {', '.join(skipped)})" if skipped else "")
              + "; nothing was lost on the way.")
    except DemoError as e:
        print(f"\nexocom demo failed: {e}", file=sys.stderr)
        keep, code = True, 1
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        code = 130
    finally:
        try:
            demo.stop_all()
        except KeyboardInterrupt:  # a second Ctrl-C: do not leave processes behind
            for process in [*demo.services.values(), demo.broker]:
                if process is not None and process.poll() is None:
                    process.kill()
        demo.log.close()
        if keep:
            print(f"logs, databases and ledger are in {workdir}", file=sys.stderr if code else sys.stdout)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(run())
