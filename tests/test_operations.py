"""Operating exocom: /readyz, `exocom status`, `exocom check-config`, and the
Dockerfile and docker-compose.yml as far as they can be checked without a
Docker engine. Everything runs against real `exocom serve` subprocesses."""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

import auth_mode
from processes import EXAMPLES, ROOT, BrokerProcess, free_port, run_web, start_example, wait_for

TODO_CONFIG = ROOT / "config" / "todo-app.yml"
COMPOSE = ROOT / "config" / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
_SCRIPT = Path(sys.executable).with_name("exocom")
EXOCOM = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "exocom"]


def environment(**extra: str) -> dict[str, str]:
    """The test's environment without anything that would steer the broker."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("EXOCOM_") and k not in ("SERVICE_DATA", "PORT")}
    env.update(extra)
    return env


def exocom(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EXOCOM, *args], capture_output=True, text=True, env=env or environment(),
                          cwd=ROOT, timeout=30)


def http_get(url: str) -> tuple[int, dict]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=15) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def broker(tmp_path):
    """`exocom serve` on the todo application's routing file."""
    process = BrokerProcess(tmp_path, "--config", str(TODO_CONFIG), env=environment())
    try:
        yield process.start()
    finally:
        process.stop()


@pytest.fixture
def services(tmp_path):
    """Start example services; all are stopped at the end of the test."""
    started: list[subprocess.Popen] = []

    def start(script: str, *args: str) -> subprocess.Popen:
        process = start_example(script, *args, log=tmp_path / f"{script}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.terminate()
    for process in started:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---------------------------------------------------------------------- /readyz


def readyz(broker: BrokerProcess) -> tuple[int, dict]:
    return http_get(broker.http + "/readyz")


def wait_ready(broker: BrokerProcess, status: int) -> dict:
    return wait_for(lambda: (lambda s, b: b if s == status else None)(*readyz(broker)),
                    what=f"/readyz to answer {status}")


def test_readyz_is_200_when_listening_configured_and_the_ledger_is_writable(broker):
    status, body = readyz(broker)
    assert status == 200, body
    assert body["ready"] is True
    checks = body["checks"]
    assert set(checks) == {"listening", "config", "ledger"}
    assert all(check["ok"] for check in checks.values())
    assert checks["listening"]["addresses"] == [f"127.0.0.1:{broker.port}"]
    # EXOCOM_TEST_REQUIRE_AUTH runs a copy of the file with a token on every role.
    source = str(TODO_CONFIG) if not auth_mode.ON else str(broker.state_dir.parent / f"with-tokens-{TODO_CONFIG.name}")
    assert checks["config"] == {"ok": True, "source": source, "roles": 4, "deployments": 1}
    assert checks["ledger"]["path"] == str(broker.state_dir / "ledger.sqlite3")
    # /healthz is unchanged: the process is alive.
    status, body = http_get(broker.http + "/healthz")
    assert status == 200 and body["status"] == "ok"


@contextmanager
def read_only_directory(path: Path):
    """Make `path` refuse new files, also for root (where chmod is not enough)."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("the tests run as root, where chmod does not stop writes, and chattr (e2fsprogs) "
                    "is not installed to make the state directory immutable instead")
    result = subprocess.run([chattr, "+i", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip("the tests run as root, where chmod does not stop writes, and `chattr +i` is not allowed "
                    f"here ({result.stderr.strip()}): the state directory cannot be made read-only")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


def test_readyz_is_503_while_the_state_directory_is_read_only(broker):
    assert readyz(broker)[0] == 200
    with read_only_directory(broker.state_dir):
        with pytest.raises(OSError):  # the premise: nobody can create a file there now
            (broker.state_dir / "probe").touch()
        status, body = readyz(broker)
        assert status == 503, body
        assert body["ready"] is False
        assert body["failing"] == ["ledger"]
        assert str(broker.state_dir) in body["error"] and "does not accept new files" in body["error"]
        assert "state directory" in body["hint"] and "writable" in body["hint"]
        ledger = body["checks"]["ledger"]
        assert ledger["ok"] is False and ledger["hint"] == body["hint"]
        assert body["checks"]["listening"]["ok"] and body["checks"]["config"]["ok"]
        # Alive, but not ready.
        assert http_get(broker.http + "/healthz")[0] == 200
    wait_ready(broker, 200)


def test_readyz_is_503_while_the_state_directory_is_moved_away(broker):
    """(A ledger deleted or replaced while the broker runs: test_ledger_goes_bad.py.)"""
    state, moved = broker.state_dir, broker.state_dir.with_name("state.moved")
    state.rename(moved)
    try:
        status, body = readyz(broker)
        assert status == 503, body
        assert "is gone" in body["error"] and "moved or deleted" in body["error"]
    finally:
        moved.rename(state)
    wait_ready(broker, 200)


def test_readyz_is_503_while_another_process_holds_the_ledger_write_lock(broker):
    other = sqlite3.connect(broker.state_dir / "ledger.sqlite3", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        status, body = readyz(broker)
        assert status == 503, body
        assert "did not finish within" in body["error"] and "write lock" in body["error"]
        # The first check still waits for the lock: no second thread piles up behind it.
        status, body = readyz(broker)
        assert status == 503 and "previous ledger check has not finished" in body["error"], body
        other.execute("ROLLBACK")
    finally:
        other.close()
    wait_ready(broker, 200)


# ----------------------------------------------------------------------- status


def test_status_of_an_unreachable_broker_exits_2_and_says_what_to_do():
    url = f"http://127.0.0.1:{free_port()}"
    result = exocom("status", "--url", url)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert url in result.stderr and "exocom serve" in result.stderr and "--url" in result.stderr
    assert "Traceback" not in result.stderr

    result = exocom("status", "--url", url, "--json")
    assert result.returncode == 2
    assert json.loads(result.stdout) == {"url": url, "reachable": False, "error": json.loads(result.stdout)["error"]}
    assert "no broker answers" in json.loads(result.stdout)["error"]


def test_status_default_url_follows_exocom_port(broker):
    result = exocom("status", env=environment(EXOCOM_PORT=str(broker.port)))
    assert result.stdout.startswith(f"exocom at http://127.0.0.1:{broker.port}:"), result
    result = exocom("status", env=environment(EXOCOM_PORT="not-a-port"))
    assert result.returncode == 2 and "EXOCOM_PORT" in result.stderr


def table_rows(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines()]


def test_status_shows_roles_versions_and_deployment_progress(broker, services, tmp_path):
    services("todos.py", "--url", broker.url, "--db", str(tmp_path / "todos.sqlite3"))
    services("todo_search.py", "--url", broker.url, "--db", str(tmp_path / "todo-search.sqlite3"))
    broker.wait_registered("todos")
    broker.wait_registered("todo-search")

    # todo-search 0.0.1 is connected but held: its deployment script is not there.
    result = exocom("status", "--url", broker.url)  # the services' ws:// URL works too
    assert result.returncode == 1, result
    rows = table_rows(result.stdout)
    assert ["todo-search", "0.0.1", "held", "0%", "1"] in rows
    assert ["todos", "1.0.0", "live", "100%", "1"] in rows
    assert ["web", "-", "-", "-", "0", "(not", "connected)"] in rows
    assert ["todo-search-deployment", "-", "-", "-", "0", "(not", "connected)"] in rows
    deployment = next(line for line in result.stdout.splitlines() if line.startswith("todo-search@0.0.1"))
    assert "0/2 steps done, offline pending, waiting for todo-search-deployment" in deployment
    assert "NOT OK: 1 problem" in result.stdout
    assert "todo-search 0.0.1 is held" in result.stdout

    result = exocom("status", "--url", broker.http, "--json")
    assert result.returncode == 1
    status = json.loads(result.stdout)
    assert status["url"] == broker.http and status["reachable"] is True and status["ok"] is False
    assert set(status["routes"]) == {"web", "todos", "todo-search", "todo-search-deployment"}
    assert {c["role"] for c in status["clients"]} == {"todos", "todo-search"}
    assert [(d["role"], d["version"], d["state"]) for d in status["deployments"]] == [("todo-search", "0.0.1", "held")]
    assert len(status["problems"]) == 1 and "todo-search 0.0.1 is held" in status["problems"][0]

    # The deployment script runs both steps: everything is live.
    services("todo_search_deployment.py", "--url", broker.url)
    wait_for(lambda: (broker.deployment("todo-search", "0.0.1") or {}).get("finished"),
             what="the deployment of todo-search 0.0.1 to finish")
    result = exocom("status", "--url", broker.http)
    assert result.returncode == 0, result
    rows = table_rows(result.stdout)
    assert ["todo-search", "0.0.1", "live", "100%", "1"] in rows
    assert ["todo-search-deployment", "0.0.0", "live", "100%", "1"] in rows
    deployment = next(line for line in result.stdout.splitlines() if line.startswith("todo-search@0.0.1"))
    assert "2/2 steps done, finished" in deployment
    assert result.stdout.rstrip().endswith("OK: every connected version is live and no deployment failed")
    assert json.loads(exocom("status", "--url", broker.http, "--json").stdout)["problems"] == []

    # The same deployment in /metrics, scraped from the real process.
    run_web(broker.url, "search", "*")
    with urllib.request.urlopen(broker.http + "/metrics", timeout=5) as response:
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = dict(line.rsplit(" ", 1) for line in response.read().decode().splitlines()
                       if line and not line.startswith("#"))
    labels = 'role="todo-search",version="0.0.1"'
    assert samples[f'exocom_deployment_state{{{labels},state="live"}}'] == "1"
    assert samples[f'exocom_deployment_state{{{labels},state="held"}}'] == "0"
    assert float(samples[f'exocom_deployment_step_duration_seconds{{{labels},step="online"}}']) >= 0
    assert int(samples[f'exocom_deliveries_total{{{labels}}}']) >= 1  # the deployment script's and the search
    assert samples['exocom_connections{role="todos",version="1.0.0"}'] == "1"
    assert int(samples["exocom_messages_routed_total"]) >= 2


FAILING_SCRIPT = """\
import sys

import trio

from exocom.relay import DeploymentScript, open_relay


async def offline(relay):
    raise RuntimeError("the search index is full")


async def main():
    async with open_relay(sys.argv[1], "todo-search-deployment") as relay:
        DeploymentScript("todo-search", "0.0.1", offline=offline).attach(relay)
        await trio.sleep_forever()


trio.run(main)
"""


def test_status_exits_1_and_names_a_failed_deployment(broker, services, tmp_path):
    script = tmp_path / "failing_deployment.py"
    script.write_text(FAILING_SCRIPT)
    services("todo_search.py", "--url", broker.url, "--db", str(tmp_path / "todo-search.sqlite3"))
    services(str(script), broker.url)
    wait_for(lambda: (broker.deployment("todo-search", "0.0.1") or {}).get("state") == "failed",
             what="the deployment to fail")
    result = exocom("status", "--url", broker.http)
    assert result.returncode == 1, result
    assert ["todo-search", "0.0.1", "failed", "0%", "1"] in table_rows(result.stdout)
    problems = result.stdout.split("NOT OK: 1 problem:", 1)[1]
    assert "deployment todo-search@0.0.1 failed at the offline step (attempt 1): RuntimeError: the search index is full" in problems
    assert f"exocom deployments retry todo-search@0.0.1 --url {broker.http}" in problems
    status = json.loads(exocom("status", "--url", broker.http, "--json").stdout)
    assert status["ok"] is False and status["deployments"][0]["steps"][0]["lastError"] == "RuntimeError: the search index is full"


# ----------------------------------------------------------------- check-config


def test_check_config_accepts_clean_files(tmp_path):
    result = exocom("check-config", str(TODO_CONFIG))
    assert (result.returncode, result.stdout) == (0, f"{TODO_CONFIG}: OK (no problems)\n"), result
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({
        "web": {"sends": ["users create"], "receives": ["users created"]},
        "users": {"receives": ["mongo create"], "sends": ["mongo created"],
                  "translations": [{"public": "users create", "internal": "mongo create"},
                                   {"public": "users created", "internal": "mongo created"}]},
    }, indent=2))
    result = exocom("check-config", str(routes))
    assert (result.returncode, result.stdout) == (0, f"{routes}: OK (no problems)\n"), result


BROKEN = """\
web:
  sends: [todos.create, todos.craete, 3]
  recieves: [todos.created]
  receives: [todos.created, search.results]
todos:
  receives: [todos.create]
  sends: [todos.created]
  translations:
    - {public: todos.listing, internal: todos.list-result}
    - {public: todos.listing, internal: todos.list-answer}
todos-2-migration:
  deploys: todoz@2.0.0
  stepTimeout: soon
  sends: [todos.create]
  versions:
    "2": {sendz: [todos.create]}
"""


def test_check_config_lists_every_problem_with_its_location(tmp_path):
    path = tmp_path / "routes.yml"
    path.write_text(BROKEN)
    result = exocom("check-config", str(path))
    assert result.returncode == 1, result
    lines = result.stdout.splitlines()
    expected = [
        (2, "error", "role 'web', key 'sends[1]'", "sends 'todos.craete', which no role receives (did you mean 'todos.create'?)"),
        (2, "error", "role 'web', key 'sends[2]'", "must be a message name (a non-empty string), got 3"),
        (3, "error", "role 'web', key 'recieves'", "unknown key 'recieves' (did you mean 'receives'?)"),
        (4, "warning", "role 'web', key 'receives[1]'", "receives 'search.results', which no role sends"),
        (10, "error", "role 'todos', key 'translations[1]'", "public name 'todos.listing' is translated a second time (first at [0])"),
        (12, "error", "role 'todos-2-migration', key 'deploys'", "names role 'todoz', which is not configured (did you mean 'todos'?)"),
        (13, "error", "role 'todos-2-migration', key 'stepTimeout'", "must be a positive number of seconds, got 'soon'"),
        (16, "error", "role 'todos-2-migration', key 'versions.2.sendz'", "unknown key 'sendz' (did you mean 'sends'?)"),
    ]
    for line_no, severity, location, message in expected:
        prefix = f"{path}:{line_no}: {severity}: {location}: "
        assert any(line.startswith(prefix) and message in line for line in lines), \
            f"missing {prefix}{message}\n{result.stdout}"
    assert len(lines) == len(expected) + 1, result.stdout  # nothing else, then the summary
    assert lines[-1] == f"{path}: 7 errors, 1 warning"
    # `exocom serve` refuses it, one problem at a time.
    serve = exocom("serve", "--port", str(free_port()), "--state-dir", str(tmp_path / "state"), "--config", str(path))
    assert serve.returncode != 0


@pytest.mark.parametrize("text, location, message", [
    ("web: {sends: users create}\n", "role 'web', key 'sends'", "must be a list of message names"),
    ("web: {translations: [{public: a}]}\n", "role 'web', key 'translations[0]'", "'internal' must be a non-empty string"),
    ("web: {receives: [a]}\nweb: {sends: [a]}\n", "role 'web'", "the role is defined twice (lines 1 and 2)"),
    ("a: {deploys: b@1.0.0}\nc: {deploys: b@1.0.0}\nb: {}\n", "role 'c', key 'deploys'", "b@1.0.0 is deployed by 'a' too"),
    ("a: {deploys: a@1.0.0}\n", "role 'a', key 'deploys'", "cannot name the role itself"),
    ("[web, todos]\n", "file", "must be a non-empty mapping keyed by role"),
    ("web: [a\n", "file", "not valid YAML or JSON"),
], ids=["type", "translation", "role twice", "deployed twice", "deploys itself", "not a mapping", "not YAML"])
def test_check_config_errors(tmp_path, text, location, message):
    path = tmp_path / "routes.yml"
    path.write_text(text)
    result = exocom("check-config", str(path))
    assert result.returncode == 1, result
    assert any(f"error: {location}: " in line and message in line for line in result.stdout.splitlines()), result.stdout


def test_check_config_warnings_do_not_fail_and_a_missing_file_does(tmp_path):
    path = tmp_path / "routes.yml"
    path.write_text(textwrap.dedent("""\
        web: {receives: [todos.created, todos.created]}
    """))
    result = exocom("check-config", str(path))
    assert result.returncode == 0, result
    assert f"{path}:1: warning: role 'web', key 'receives[1]': 'todos.created' is listed twice" in result.stdout
    assert f"{path}:1: warning: role 'web', key 'receives[0]': receives 'todos.created', which no role sends" in result.stdout
    assert result.stdout.splitlines()[-1] == f"{path}: OK (2 warnings)"

    result = exocom("check-config", str(tmp_path / "missing.yml"))
    assert result.returncode == 1
    assert "cannot read the file: No such file or directory" in result.stdout and "Traceback" not in result.stderr


# ------------------------------------------------------- Dockerfile and compose


def dockerfile() -> list[tuple[str, str]]:
    """The instructions of the Dockerfile: (KEYWORD, arguments), continuations joined."""
    out, buffer = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buffer):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, args = buffer.partition(" ")
        out.append((keyword.upper(), args.strip()))
        buffer = ""
    return out


def instruction(keyword: str) -> list[str]:
    return [args for k, args in dockerfile() if k == keyword]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for args in instruction("ENV"):
        env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def healthcheck_command() -> list[str]:
    [args] = instruction("HEALTHCHECK")
    return json.loads(args.split(" CMD ", 1)[1])


def test_dockerfile_structure_and_the_paths_it_copies():
    args = dict(item.split("=", 1) for item in instruction("ARG"))
    stages = [args_.replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", "")) for args_ in instruction("FROM")]
    assert len(stages) == 2, stages
    assert stages[0] == "python:3.11-slim AS build" and stages[1] == "python:3.11-slim"
    build_stage = [a for k, a in dockerfile()][: [k for k, _ in dockerfile()].index("FROM", 2)]
    assert any("pip wheel" in a for a in build_stage)
    runtime = dockerfile()[[k for k, _ in dockerfile()].index("FROM", 2):]
    assert any(k == "RUN" and "from=build" in a and "pip install" in a for k, a in runtime)
    [user] = instruction("USER")
    assert user not in ("root", "0")
    assert dockerfile_env()["EXOCOM_STATE_DIR"] == "/var/lib/exocom"
    assert json.loads(instruction("VOLUME")[0]) == ["/var/lib/exocom"]
    assert instruction("EXPOSE") == ["4100"]
    assert instruction("STOPSIGNAL") == ["SIGTERM"]
    assert json.loads(instruction("ENTRYPOINT")[0]) == ["exocom"]
    assert json.loads(instruction("CMD")[0]) == ["serve"]

    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copies = [shlex.split(a) for a in instruction("COPY")]
    sources = [src for parts in copies if not any(p.startswith("--from") for p in parts) for src in parts[:-1]]
    assert {"examples/", "config/", "exocom/", "pyproject.toml", "README.md"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which does not exist"
        assert not any(fnmatch.fnmatch(src.rstrip("/"), pattern) for pattern in ignored), \
            f"the Dockerfile copies {src}, which .dockerignore excludes"
    assert any(parts[-1] == "/app/examples/" and parts[0] == "examples/" for parts in copies)
    # The compose file runs the examples from /app/examples: they are all there.
    for script in ("todos.py", "todo_search.py", "todo_search_deployment.py", "web.py", "common.py"):
        assert (EXAMPLES / script).is_file()


def test_the_image_command_serves_with_the_dockerfile_environment_and_passes_its_healthcheck(tmp_path):
    entrypoint = json.loads(instruction("ENTRYPOINT")[0])
    command = [*entrypoint, *json.loads(instruction("CMD")[0])]
    executable = shutil.which(command[0], path=str(Path(sys.executable).parent))
    assert executable, f"{command[0]} is not installed next to {sys.executable}"
    port = free_port()
    # PORT, as users of the Go broker set it (`docker run -e PORT=...`): the
    # image's environment must not override it.
    env = environment(**{**dockerfile_env(), "EXOCOM_STATE_DIR": str(tmp_path / "var-lib-exocom"),
                         "PORT": str(port)})
    log = open(tmp_path / "broker.log", "w")
    process = subprocess.Popen([executable, *command[1:]], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    log.close()
    health = healthcheck_command()
    assert health[0] == "python"
    health = [sys.executable, *health[1:]]  # the image's python
    health_env = environment(**{**dockerfile_env(), "PORT": str(port)})
    try:
        status = wait_for(lambda: process.poll() is not None or http_get_or_none(f"http://127.0.0.1:{port}/readyz"),
                          what="the broker to be ready")
        assert process.poll() is None, (tmp_path / "broker.log").read_text()
        assert status["checks"]["ledger"]["path"] == str(tmp_path / "var-lib-exocom" / "ledger.sqlite3")
        assert subprocess.run(health, env=health_env, capture_output=True, timeout=30).returncode == 0
        process.send_signal(getattr(signal, instruction("STOPSIGNAL")[0]))
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # Nobody listens any more: the same check fails.
    assert subprocess.run(health, env=health_env, capture_output=True, timeout=30).returncode != 0


def http_get_or_none(url: str):
    try:
        status, body = http_get(url)
    except OSError:
        return None
    return body if status == 200 else None


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def container_argv(service: dict) -> list[str]:
    entrypoint = service.get("entrypoint", json.loads(instruction("ENTRYPOINT")[0]))
    return [*entrypoint, *service.get("command", json.loads(instruction("CMD")[0]))]


def test_compose_file_names_existing_scripts_and_waits_for_a_healthy_broker():
    stack = compose()
    services = stack["services"]
    assert set(services) >= {"exocom", "todos", "todo-search", "todo-search-deployment"}
    broker = services["exocom"]
    assert "exocom-state:/var/lib/exocom" in broker["volumes"]
    assert "exocom-state" in stack["volumes"]
    # Readiness gates the dependants: a broker that cannot write its ledger is alive, not ready.
    assert broker_healthcheck(stack)[:2] == ["CMD", "python"]
    assert "/readyz" in broker_healthcheck(stack)[-1] and "/healthz" not in broker_healthcheck(stack)[-1]
    for name, service in services.items():
        assert service["image"] == broker["image"], f"{name} does not use the broker's image"
        # An init as PID 1 forwards SIGTERM: `docker compose down` need not wait 10 s and kill.
        assert service.get("init") is True, f"{name} runs as PID 1 without an init"
        if name == "exocom":
            continue
        assert service["depends_on"]["exocom"] == {"condition": "service_healthy"}
        for dependency, condition in service["depends_on"].items():
            assert dependency in services
            if condition["condition"] == "service_healthy":
                assert dependency == "exocom" or services[dependency]["healthcheck"]["test"][0] == "CMD"
        if name != "todos":
            # Not a broker: the image's health check would mark it unhealthy forever.
            assert service["healthcheck"] == {"disable": True}, f"{name} inherits the broker's health check"
        argv = container_argv(service)
        assert argv[0] == "python" and argv[1].startswith("/app/examples/todo_app/"), argv
        assert (ROOT / argv[1].removeprefix("/app/")).is_file(), f"{name} runs {argv[1]}, which does not exist"
        assert argv[argv.index("--url") + 1] == "ws://exocom:4100/services"
    for volume in broker["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("."):
            assert (COMPOSE.parent / source).is_file(), f"the broker mounts {source}, which does not exist"


def broker_healthcheck(stack: dict) -> list[str]:
    return stack["services"]["exocom"]["healthcheck"]["test"]


def run_broker_healthcheck(port: int) -> int:
    """The compose file's health check of the broker, run here with the image's python."""
    command = [sys.executable, *broker_healthcheck(compose())[2:]]
    return subprocess.run(command, env=environment(EXOCOM_PORT=str(port)), capture_output=True, timeout=30).returncode


def test_the_compose_broker_healthcheck_passes_only_while_the_broker_is_ready(broker):
    assert run_broker_healthcheck(broker.port) == 0
    state, moved = broker.state_dir, broker.state_dir.with_name("state.moved")
    state.rename(moved)
    try:
        assert http_get(broker.http + "/healthz")[0] == 200  # alive ...
        assert readyz(broker)[0] == 503  # ... not ready: the dependants must wait
        assert run_broker_healthcheck(broker.port) != 0
    finally:
        moved.rename(state)
    wait_ready(broker, 200)
    assert run_broker_healthcheck(broker.port) == 0


def test_the_compose_stack_runs_without_docker(tmp_path):
    """Each container's command, run here as Compose would: /app is the
    checkout, the volumes are directories, the host `exocom` is 127.0.0.1, and
    a service starts once the services it depends on pass their health checks."""
    stack = compose()
    services = stack["services"]
    broker = services["exocom"]
    port = free_port()
    mounts = {}
    for volume in broker["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = COMPOSE.parent / source if source.startswith(".") else tmp_path / source
    env = {**dockerfile_env(), "EXOCOM_PORT": str(port)}
    env = {k: str(mounts.get(v, v)) for k, v in env.items()}
    argv = [str(mounts.get(arg, arg)) for arg in container_argv(broker)]
    assert argv[:2] == ["exocom", "serve"]
    processes: list[subprocess.Popen] = []

    def run(name: str, argv: list[str], **kw) -> subprocess.Popen:
        out = open(tmp_path / f"{name}.log", "w")
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, **kw)
        out.close()
        processes.append(process)
        return process

    def local(arg: str) -> str:
        arg = arg.replace("exocom:4100", f"127.0.0.1:{port}")
        if arg == "python":
            return sys.executable
        if arg.startswith("/app/"):
            return str(ROOT / arg.removeprefix("/app/"))
        if arg.startswith("/tmp/"):
            return str(tmp_path / arg.removeprefix("/tmp/"))
        return arg

    def healthy(name: str) -> bool:
        if name == "exocom":
            return run_broker_healthcheck(port) == 0
        command = [local(arg) for arg in services[name]["healthcheck"]["test"][1:]]
        return subprocess.run(command, env=environment(), capture_output=True, timeout=30).returncode == 0

    def start_order() -> list[str]:
        order: list[str] = []
        def visit(name):
            for dependency in services[name].get("depends_on", {}):
                visit(dependency)
            if name not in order:
                order.append(name)
        for name, service in services.items():
            if not service.get("profiles"):
                visit(name)
        return order

    try:
        order = start_order()
        assert order[0] == "exocom" and order.index("todos") < order.index("todo-search-deployment")
        for name in order:
            for dependency, condition in services[name].get("depends_on", {}).items():
                if condition["condition"] == "service_healthy":
                    wait_for(lambda: healthy(dependency), what=f"{dependency} to be healthy")
            if name == "exocom":
                run(name, [*EXOCOM, *argv[1:]], env=environment(**env))
            else:
                run(name, [local(arg) for arg in container_argv(services[name])])
        assert all(process.poll() is None for process in processes)
        assert (tmp_path / "exocom-state" / "ledger.sqlite3").is_file()

        def finished():
            status, body = http_get(f"http://127.0.0.1:{port}/deployments")
            return body["deployments"][0]["finished"]
        wait_for(finished, what="the todo-search deployment to finish")
        result = exocom("status", "--url", f"http://127.0.0.1:{port}")
        assert result.returncode == 0, result
        web = [local(arg) for arg in container_argv({**services["web"], "command": ["add", "buy milk"]})]
        added = subprocess.run(web, capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert added.returncode == 0 and json.loads(added.stdout)["title"] == "buy milk", added
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
