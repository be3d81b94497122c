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

Everything is stopped at the end, also on Ctrl-C. It needs a source checkout
(the examples are not part of the installed package): it looks next to the
package, then in the current directory, or where `--root` says.
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
from pathlib import Path
from typing import Any, Callable

from .settings import port_argument  # the same port rules as `exocom serve`

TODOS = ("buy milk", "walk the dog", "water the plants")
ADDED_DURING_MIGRATION = "call mum"
ADDED_AFTER = "book the dentist"
WAIT = 20.0  # seconds to wait for any one thing before giving up


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
        deadline = time.monotonic() + timeout
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
                    raise DemoError(f"gave up after {timeout:g}s waiting for {what}")
                self.condition.wait(min(remaining, 0.2))

    def close(self) -> None:
        self.file.close()


def event_is(event: str, /, **fields) -> Callable[[dict], bool]:
    return lambda e: e.get("event") == event and all(e.get(k) == v for k, v in fields.items())


def short(payload: Any, limit: int = 150) -> str:
    text = json.dumps(payload)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Demo:
    def __init__(self, root: Path, workdir: Path, port: int, pause: float):
        self.root = root
        self.examples = root / "examples" / "todo_app"
        self.workdir = workdir
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/services"
        self.pause = pause
        self.log = BrokerLog(workdir / "broker.log")
        self.broker: subprocess.Popen | None = None
        self.services: dict[str, subprocess.Popen] = {}
        self.started = time.monotonic()
        path = os.environ.get("PYTHONPATH")
        # The children import exocom from the same place as this process.
        package_root = str(Path(__file__).resolve().parents[2])
        self.env = {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else ""),
                    "PYTHONUNBUFFERED": "1"}
        for key in ("SERVICE_DATA", "EXOCOM_URL"):
            self.env.pop(key, None)

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
        if broker.poll() is None:
            broker.send_signal(signal.SIGTERM)
            try:
                broker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                broker.kill()
                broker.wait()

    def start(self, name: str, script: str, *args: str) -> None:
        with open(self.workdir / f"{name}.log", "a") as out:
            self.services[name] = subprocess.Popen(
                [sys.executable, str(self.examples / script), "--url", self.url, *args],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir, start_new_session=True)

    def stop(self, name: str) -> None:
        """Ctrl-C (SIGINT) to a service: its relay closes the connection cleanly."""
        process = self.services.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop_all(self) -> None:
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
                                env=self.env, cwd=self.workdir, timeout=timeout + 60)
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
        if f"{e.get('role')}@{e.get('version')}" != target:
            return None
        prefix = f"deployment {target}: "
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
        self.say("restarting the broker with the routing of part 2 (same port, same ledger)")
        self.stop_broker()
        since = self.log.mark()
        self.start_broker(self.root / "config" / "todo-app-v2.yml")
        for role, version in (("todos", "1.0.0"), ("todo-search", "0.0.1")):
            event = self.registered(role, since, version)
            self.say(f"{role}@{version} registered again (its relay reconnected by itself): {event['state']}")

        since = self.log.mark()
        self.start("todos-v2", "todos_v2.py", "--db", str(self.workdir / "todos-v2.sqlite3"))
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
                    env=self.env, cwd=self.workdir))
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
    parser.add_argument("--skip-v2", action="store_true", help="stop after part 1 (todo-search)")
    parser.add_argument("--pause", type=float, default=0.4,
                        help="seconds the todos 2.0.0 migration waits after each todo it copies, so that the "
                             "demo can send traffic while it runs (default 0.4)")


def main(args) -> int:
    try:
        root = find_root(args.root)
    except DemoError as e:
        print(f"exocom demo: {e}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="exocom-demo-"))
    demo = Demo(root, workdir, args.port or free_port(), args.pause)
    print(f"exocom demo: the todo app of the tutorial, with real processes (work directory {workdir})")
    keep = args.keep
    code = 0
    try:
        demo.part_one()
        if not args.skip_v2:
            demo.part_two()
        demo.finish()
        if args.skip_v2:
            print("\nDone: the todo-search 0.0.1 deployment finished; part 2 (todos 2.0.0) was skipped "
                  "(--skip-v2); nothing was lost on the way.")
        else:
            print("\nDone: both deployments (todo-search 0.0.1, todos 2.0.0) finished; nothing was lost on the way.")
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
