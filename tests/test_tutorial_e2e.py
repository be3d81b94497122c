"""The tutorial's "Migration Scripts" feature, with real processes and sockets:

  Given a todos service with the entries "one" and "two"
  And a todo-search service (0.0.1)
  When the deployment script runs
  Then the todo-search service knows about these documents
  And the todos service still contains these entries
  And no production message reached todo-search before offline-done.
"""

import json

import pytest

from processes import ROOT, BrokerProcess, run_web, start_example, wait_for


@pytest.fixture
def stack(tmp_path):
    broker = BrokerProcess(tmp_path, "--config", str(ROOT / "config" / "todo-app.yml"), "--log-level", "debug")
    processes = []
    try:
        yield broker, processes
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(timeout=10)
        broker.stop()


def titles(result):
    assert result.returncode == 0, result.stderr
    return sorted(todo["title"] for todo in json.loads(result.stdout))


def test_deploying_todo_search_fills_it_with_existing_todos(stack, tmp_path):
    broker, processes = stack
    broker.start()
    log = tmp_path / "services.log"
    search_db = str(tmp_path / "todo-search.db")
    processes.append(start_example("todos.py", "--url", broker.url, "--db", str(tmp_path / "todos.db"), log=log))
    broker.wait_registered("todos")
    for title in ("one", "two"):
        assert run_web(broker.url, "add", title).returncode == 0

    processes.append(start_example("todo_search.py", "--url", broker.url, "--version", "0.0.1", "--db", search_db, log=log))
    broker.wait_registered("todo-search")
    assert broker.deployment("todo-search", "0.0.1")["state"] == "held"
    held_query = run_web(broker.url, "search", "*", timeout=1)
    assert held_query.returncode != 0, "a held version answered production traffic"

    processes.append(start_example("todo_search_deployment.py", "--url", broker.url, log=log))
    wait_for(lambda: broker.deployment("todo-search", "0.0.1")["finished"], timeout=20, what="the deployment")

    assert titles(run_web(broker.url, "search", "*")) == ["one", "two"]
    assert titles(run_web(broker.url, "search", "two")) == ["two"]
    assert titles(run_web(broker.url, "list")) == ["one", "two"]

    events = broker.events()
    names = [e["event"] for e in events]
    live_at = names.index("version live")
    assert names.index("offline step started") < names.index("offline step done") < live_at
    assert live_at < names.index("online step started") < names.index("online step done") < names.index("deployment finished")
    steps_logged = [e for e in events if e.get("role") == "todo-search" and e.get("step")]
    assert steps_logged and {e["script"] for e in steps_logged} == {"todo-search-deployment"}, \
        "every deployment event names the script's role in `script`"
    to_search = [i for i, e in enumerate(events) if e["event"] == "message delivered"
                 and e["receiver"] == "todo-search" and e["sender"] != "todo-search-deployment"]
    assert to_search, "production traffic should reach todo-search once it is live"
    assert min(to_search) > live_at, "production traffic reached todo-search before offline-done"
    [deployment] = (broker.get("/deployments"))["deployments"]
    assert [s["status"] for s in deployment["steps"]] == ["done", "done"]
    assert [s["attempts"] for s in deployment["steps"]] == [1, 1]

    # The deployment runs once; a restarted todo-search still knows the documents.
    search = processes[1]
    search.terminate()
    search.wait(timeout=10)
    broker.wait_deregistered("todo-search")
    processes[1] = start_example("todo_search.py", "--url", broker.url, "--version", "0.0.1", "--db", search_db, log=log)
    broker.wait_registered("todo-search")
    assert titles(run_web(broker.url, "search", "*")) == ["one", "two"]


def test_the_script_waits_for_todos_when_its_online_step_starts_before_todos_is_up(stack, tmp_path):
    broker, processes = stack
    broker.start()
    log = tmp_path / "services.log"
    db, search_db = str(tmp_path / "todos.db"), str(tmp_path / "todo-search.db")
    todos = start_example("todos.py", "--url", broker.url, "--db", db, log=log)
    processes.append(todos)
    broker.wait_registered("todos")
    for title in ("one", "two"):
        assert run_web(broker.url, "add", title).returncode == 0
    todos.terminate()
    todos.wait(timeout=10)
    broker.wait_deregistered("todos")

    processes.append(start_example("todo_search.py", "--url", broker.url, "--version", "0.0.1", "--db", search_db, log=log))
    processes.append(start_example("todo_search_deployment.py", "--url", broker.url, log=log))

    def online_step_running():
        steps = (broker.deployment("todo-search", "0.0.1") or {}).get("steps", [])
        return [s["status"] for s in steps] == ["done", "started"]

    wait_for(online_step_running, timeout=20, what="the online step to start")
    # The script's first todos.list went nowhere; it asks again until todos is back.
    wait_for(lambda: any(e["event"] == "message undeliverable" and e.get("name") == "todos.list"
                         for e in broker.events()), timeout=10, what="todos.list to find no receiver")
    processes.append(start_example("todos.py", "--url", broker.url, "--db", db, log=log))
    wait_for(lambda: broker.deployment("todo-search", "0.0.1")["finished"], timeout=20, what="the deployment")
    assert titles(run_web(broker.url, "search", "*")) == ["one", "two"]
    [deployment] = broker.get("/deployments")["deployments"]
    assert [s["attempts"] for s in deployment["steps"]] == [1, 1]
