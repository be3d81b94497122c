"""Hypothesis state machine of gradual rollouts in the core (contract 7-8).

Random interleavings of connects, disconnects, new and continued activities,
replies (good and bad), deployment answers, operator actions, ledger writes
and the clock. The invariants:

- nothing reaches a held or failed version, except what its deployment
  script or an activity it asked on itself sends it;
- an activity stays on its instance unless that instance is gone or its
  version was taken out of production;
- a deployment that failed (an abort, a failed step, a rollback) has its
  version out of production at once, whether or not the record is written;
- a version is drained only after the drain period without deliveries.

And, outside the machine: the observed share of each ramp step converges on
the configured one (within 1.5 percentage points over 4000 activities).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from core import Harness

DRAIN = 20.0
TTL = 30.0
ROUTES = {
    "web": {"sends": ["todos.list"], "receives": ["todos.listing", "todos.failed"]},
    "todos": {"receives": ["todos.list"], "sends": ["todos.listing", "todos.failed"]},
    "todos-deployment": {"deploys": "todos@2.0.0", "rollout": {"steps": [10, 50, 100], "interval": 5, "gates": {
        "minSamples": 5, "errorMessages": ["todos.failed"], "maxErrorRate": 0.3, "maxDisconnects": 2}}},
}
OLD, NEW = "1.0.0", "2.0.0"
OUT_OF_PRODUCTION = ("held", "failed")


class Rollout(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.h = Harness(ROUTES, auto_write=False, drain_period=DRAIN, activity_ttl=TTL)
        self.todos: dict[int, str] = {}  # conn -> version
        self.scripts: list[int] = []
        self.web = 0
        self.placed: dict[str, int] = {}  # activity -> the todos instance that got it
        self.used: dict[str, float] = {}  # activity -> when it was last used (the broker forgets it 30-60 s later)
        self.last_delivery: dict[str, float] = {}  # version -> when something last reached it
        self._ids = itertools.count()

    @initialize()
    def fleet(self):
        self.web = self.h.connect("web")
        for version in (OLD, NEW):
            self.todos[self.h.connect("todos", version)] = version
        self.scripts.append(self.h.connect("todos-deployment"))

    # ------------------------------------------------------------ helpers

    def states(self) -> dict[str, str]:
        clients = self.h.broker.config_json()["clients"]
        return {v["version"]: v["state"] for c in clients if c["role"] == "todos" for v in c["versions"]}

    def deliveries(self) -> dict[int, list[dict]]:
        got = {conn: msgs for conn, msgs in self.h.inbox.items() if msgs}
        self.h.inbox.clear()
        return got

    def web_sends(self, activity: str) -> None:
        before = self.states()
        remembered = self.placed.get(activity) if self.h.now - self.used.get(activity, self.h.now) < TTL else None
        self.used[activity] = self.h.now
        self.h.send(self.web, "todos.list", activity=activity)
        got = {conn: msgs for conn, msgs in self.deliveries().items() if conn in self.todos}
        for conn in got:
            version = self.todos[conn]
            self.last_delivery[version] = self.h.now
            assert before[version] not in OUT_OF_PRODUCTION, f"{activity} reached {version} while {before[version]}"
        if remembered is not None and remembered in self.todos and before[self.todos[remembered]] not in OUT_OF_PRODUCTION:
            assert list(got) in ([remembered], []), f"{activity} left its instance {remembered} for {list(got)}"
        if got:
            [conn] = got
            self.placed[activity] = conn

    # -------------------------------------------------------------- rules

    @rule(version=st.sampled_from([OLD, NEW]))
    def connect(self, version):
        self.todos[self.h.connect("todos", version)] = version

    @precondition(lambda self: self.todos)
    @rule(data=st.data())
    def disconnect(self, data):
        conn = data.draw(st.sampled_from(sorted(self.todos)))
        self.h.disconnect(conn)
        del self.todos[conn]

    @rule()
    def new_activity(self):
        self.web_sends(f"act-{next(self._ids)}")

    @precondition(lambda self: self.placed)
    @rule(data=st.data())
    def continue_activity(self, data):
        self.web_sends(data.draw(st.sampled_from(sorted(self.placed))))

    @precondition(lambda self: any(conn in self.todos for conn in self.placed.values()))
    @rule(data=st.data(), name=st.sampled_from(["todos.listing", "todos.listing", "todos.failed"]))
    def reply(self, data, name):
        activity = data.draw(st.sampled_from(sorted(a for a, c in self.placed.items() if c in self.todos)))
        self.h.now += 0.01
        self.used[activity] = self.h.now
        self.h.send(self.placed[activity], name, activity=activity)
        self.deliveries()

    @precondition(lambda self: any(m["name"].endswith("-start") for s in self.scripts for m in self.h.inbox.get(s, [])))
    @rule(outcome=st.sampled_from(["done", "done", "done", "failed"]))
    def script_answers(self, outcome):
        script, start = next((s, m) for s in self.scripts for m in self.h.inbox.get(s, []) if m["name"].endswith("-start"))
        self.h.inbox[script].remove(start)
        self.h.send(script, start["name"].replace("-start", f"-{outcome}"), activity=start["activityId"])

    @rule(action=st.sampled_from(["pause", "resume", "promote", "abort", "rollback", "retry"]))
    def operator(self, action):
        broker = self.h.broker
        try:
            if action == "rollback":
                self.h.run(broker.rollback("todos", NEW, self.h.now))
            elif action == "retry":
                self.h.run(broker.retry("todos", NEW, self.h.now))
            else:
                self.h.run(broker.rollout("todos", NEW, action, self.h.now))
        except (KeyError, ValueError):
            pass

    @precondition(lambda self: self.h.unwritten)
    @rule()
    def ledger_writes(self):
        self.h.write_one()

    @rule()
    def deployment_progresses(self):
        """Everything written and every pending step answered done: gets the
        runs past `held` more often than the single rules alone would."""
        while self.h.unwritten:
            self.h.write_one()
        for script in self.scripts:
            for start in [m for m in self.h.inbox.get(script, []) if m["name"].endswith("-start")]:
                self.h.inbox[script].remove(start)
                self.h.send(script, start["name"].replace("-start", "-done"), activity=start["activityId"])
        while self.h.unwritten:
            self.h.write_one()

    @rule(seconds=st.sampled_from([1, 5, 25]))
    def tick(self, seconds):
        self.h.tick(seconds)
        self.deliveries()

    # --------------------------------------------------------- invariants

    @invariant()
    def a_failed_deployment_is_out_of_production_at_once(self):
        [d] = self.h.broker.deployments_json()
        states = self.states()
        if d["state"] == "failed" and NEW in states:
            assert states[NEW] == "failed"
        if d["state"] == "held" and NEW in states:
            assert states[NEW] == "held"

    @invariant()
    def drained_only_after_the_quiet_period(self):
        for version, state in self.states().items():
            if state == "drained":
                assert self.h.now - self.last_delivery.get(version, float("-inf")) >= DRAIN

    @invariant()
    def one_stable_version_at_most(self):
        states = self.states()
        assert list(states.values()).count("live") <= 1
        for version, state in states.items():
            event(f"{version} {state}")  # --hypothesis-show-statistics: which states the runs reach


TestRollout = Rollout.TestCase
TestRollout.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)


@pytest.mark.parametrize("step, share", [(0, 10), (1, 50), (2, 100)])
def test_the_observed_share_converges_on_the_configured_one(step, share):
    routes = {**ROUTES, "todos-deployment": {**ROUTES["todos-deployment"],
                                             "rollout": {"steps": [10, 50, 100], "interval": 5}}}
    records = [{"role": "todos", "version": NEW, "step": "offline", "event": event, "attempt": 1, "at": 0.0,
                "error": None, "detail": {"rollout": {}} if event == "done" else None}
               for event in ("started", "done")]
    records += [{"role": "todos", "version": NEW, "step": "rollout", "event": "stepped", "attempt": s, "at": 0.0,
                 "error": None, "detail": None} for s in range(1, step + 1)]
    h = Harness(routes, records=records)
    web, old, new = h.connect("web"), h.connect("todos", OLD), h.connect("todos", NEW)
    for i in range(4000):
        h.send(web, "todos.list", activity=f"{step}-{i}")
    to_new = len(h.take(new))
    assert to_new + len(h.take(old)) == 4000
    assert abs(to_new / 4000 * 100 - share) <= 1.5, f"step {step}: {to_new / 40:.1f} % against {share} %"
