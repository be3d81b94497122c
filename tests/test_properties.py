"""Hypothesis stateful tests of the sans-I/O core."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from core import Harness

ROLES = {
    "a": {"sends": ["x", "y"], "receives": ["z"]},
    "b": {"receives": ["x"], "sends": ["z"]},
    "c": {"receives": ["x", "yy"], "sends": ["z"],
          "translations": [{"public": "y", "internal": "yy"}]},
    "d": {"receives": [], "sends": ["x"]},
}
RECEIVERS = {"x": {"b", "c"}, "y": {"c"}, "z": {"a"}}
ACTIVITIES = ["act1", "act2", "act3"]


class Routing(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.h = Harness(ROLES)
        self.roles: dict[int, str] = {}

    @rule(role=st.sampled_from(sorted(ROLES)), version=st.sampled_from([None, "1.0.0", "2.0.0"]))
    def connect(self, role, version):
        conn = self.h.connect(role, version)
        self.roles[conn] = role

    @precondition(lambda self: self.roles)
    @rule(data=st.data())
    def disconnect(self, data):
        conn = data.draw(st.sampled_from(sorted(self.roles)))
        self.h.disconnect(conn)
        del self.roles[conn]

    @precondition(lambda self: self.roles)
    @rule(data=st.data(), name=st.sampled_from(["x", "y", "z", "nope"]), activity=st.sampled_from(ACTIVITIES))
    def send(self, data, name, activity):
        sender = data.draw(st.sampled_from(sorted(self.roles)))
        role = self.roles[sender]
        members = self.h.broker.activities.get(activity)
        remembered = {role: abs(conn) for role, conn in members.items() if role} if members else {}
        self.h.send(sender, name, activity=activity)
        got = {conn: msgs for conn, msgs in self.h.inbox.items() if msgs}
        self.h.inbox.clear()
        allowed = name in ROLES[role]["sends"]
        expected_roles = RECEIVERS.get(name, set()) if allowed else set()
        delivered_roles = [self.roles[c] for c in got]
        # never to a disconnected instance, never to a role that does not receive the name
        assert all(c in self.roles for c in got)
        assert set(delivered_roles) <= expected_roles
        for conn, msgs in got.items():
            assert len(msgs) == 1
        # exactly one instance of every receiving role that has one connected
        for r in expected_roles:
            connected = [c for c, rr in self.roles.items() if rr == r]
            assert delivered_roles.count(r) == (1 if connected else 0)
            # affinity held while the remembered instance lives
            if r in remembered and remembered[r] in self.roles:
                assert [c for c in got if self.roles[c] == r] == [remembered[r]]

    @rule(seconds=st.sampled_from([1, 30, 61]))
    def tick(self, seconds):
        self.h.tick(seconds)

    @invariant()
    def registry_matches_connections(self):
        assert set(self.h.broker.registry.by_conn) == set(self.roles)


TestRouting = Routing.TestCase
TestRouting.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


DEPLOY = {
    "web": {"sends": ["todos.list"], "receives": ["todos.listing"]},
    "todos": {"receives": ["todos.list"], "sends": ["todos.listing"]},
    "migrate": {"deploys": "todos@2.0.0", "sends": ["todos.list"], "receives": ["todos.listing"]},
}
NAME = "deployment-todos-2.0.0-{}-{}"


class Deployments(RuleBasedStateMachine):
    """Random registrations, disconnects, answers, timer expiries, slow ledger
    writes and broker restarts; the deployment invariants hold throughout."""

    def __init__(self):
        super().__init__()
        self.ledger: list[dict] = []
        self.restart()

    def restart(self):
        # Records not yet written are lost in a crash, as on a real machine.
        self.h = Harness(DEPLOY, records=self.ledger, auto_write=False, step_timeout=60)
        self.h.ledger = self.ledger
        self.conns: dict[int, tuple[str, str | None]] = {}
        self.starts: dict[tuple[int, str], str] = {}  # (script conn, step) -> activity of its latest start

    @initialize(script_first=st.booleans())
    def the_new_version_and_its_script(self, script_first):
        # Most runs should get through a handshake; the rules add and remove
        # everything else (these two included) at random.
        for who in [("todos", "2.0.0"), ("migrate", None)][::-1 if script_first else 1]:
            self.connect(who)

    @rule()
    def crash_and_restart(self):
        self.restart()

    @rule(who=st.sampled_from([("todos", "2.0.0"), ("todos", "1.0.0"), ("migrate", None), ("web", None)]))
    def connect(self, who):
        conn = self.h.connect(*who)
        self.conns[conn] = who
        self.check_deliveries()

    @precondition(lambda self: self.conns)
    @rule(data=st.data())
    def disconnect(self, data):
        conn = data.draw(st.sampled_from(sorted(self.conns)))
        self.h.disconnect(conn)
        del self.conns[conn]
        self.starts = {k: v for k, v in self.starts.items() if k[0] != conn}
        self.check_deliveries()

    @precondition(lambda self: self.h.unwritten)
    @rule()
    def ledger_writes_one(self):
        self.h.write_one()
        self.check_deliveries()

    @rule(seconds=st.sampled_from([5, 61]))
    def time_passes(self, seconds):
        self.h.tick(seconds)
        self.check_deliveries()

    @precondition(lambda self: any(w == ("web", None) for w in self.conns.values()))
    @rule()
    def production_traffic(self):
        web = next(c for c, w in self.conns.items() if w == ("web", None))
        self.h.send(web, "todos.list")
        self.check_deliveries(production=True)

    @precondition(lambda self: any(w[0] == "migrate" for w in self.conns.values()))
    @rule(step=st.sampled_from(["offline", "online"]), outcome=st.sampled_from(["done", "failed"]),
          stale=st.booleans())
    def script_answers(self, step, outcome, stale):
        """An answer on the activity of the start the script got (as a real
        script answers), or -- stale -- on another one."""
        script = next(c for c, w in self.conns.items() if w[0] == "migrate")
        activity = None if stale else self.starts.get((script, step))
        self.h.send(script, NAME.format(step, outcome), {"reason": "boom"}, activity=activity)
        self.check_deliveries()

    def latest_start(self) -> tuple[int, str, str] | None:
        """The start message the script got last, if it is still connected."""
        return next(((conn, step, activity) for (conn, step), activity in reversed(self.starts.items())
                     if conn in self.conns), None)

    @precondition(lambda self: self.latest_start() is not None)
    @rule(outcome=st.sampled_from(["done", "done", "failed"]))
    def script_answers_the_start_it_got(self, outcome):
        # What a real script does; `script_answers` covers wrong and stale answers.
        conn, step, activity = self.latest_start()
        self.h.send(conn, NAME.format(step, outcome), {"reason": "boom"}, activity=activity)
        self.check_deliveries()

    @precondition(lambda self: any(w[0] == "migrate" for w in self.conns.values()))
    @rule()
    def script_talks_to_its_version(self):
        script = next(c for c, w in self.conns.items() if w[0] == "migrate")
        self.h.send(script, "todos.list")
        got = [c for c, msgs in self.h.inbox.items() if msgs and self.conns.get(c, (None,))[0] == "todos"]
        assert all(self.conns[c] == ("todos", "2.0.0") for c in got)
        self.check_deliveries()

    @rule()
    def operator_retries(self):
        try:
            self.h.run(self.h.broker.retry("todos", "2.0.0", self.h.now))
        except (KeyError, ValueError):
            pass
        self.check_deliveries()

    def check_deliveries(self, production=False):
        state = self.h.broker.deployment("todos", "2.0.0").state
        for conn, msgs in list(self.h.inbox.items()):
            who = self.conns.get(conn)
            assert who is not None, "delivered to a disconnected instance"
            if who == ("todos", "2.0.0") and production:
                # nothing but the script reaches a held or failed version
                assert state == "live", f"production traffic reached todos@2.0.0 while {state}"
            if who[0] == "migrate":
                for m in msgs:
                    if m["name"].endswith("-start"):
                        step = m["name"].split("-")[-2]
                        self.starts.pop((conn, step), None)  # keep the latest last
                        self.starts[(conn, step)] = m["activityId"]
                        done = [r for r in self.ledger if r["step"] == step and r["event"] == "done"]
                        assert not done, f"{step} step started again after it was recorded done"
        self.h.inbox.clear()

    @invariant()
    def live_only_after_offline_recorded_done(self):
        pool = self.h.broker.registry.pool("todos", __import__("exocom.core.versions").core.versions.Version("2.0.0"))
        offline_done = any(r["step"] == "offline" and r["event"] == "done" for r in self.ledger)
        if pool is not None and pool.state == "live":
            assert offline_done

    @invariant()
    def no_step_started_after_done(self):
        done: set[str] = set()
        for r in self.ledger:
            if r["event"] == "done":
                done.add(r["step"])
            if r["event"] == "started":
                assert r["step"] not in done
            if r["event"] == "rearmed":
                done.discard(r["step"])


def test_the_deployment_machine_can_finish_a_deployment():
    """The rules above reach every state: an answer on the start's activity
    settles the step (so the invariants are exercised, not vacuous)."""
    m = Deployments()
    m.connect(("todos", "2.0.0"))
    m.connect(("migrate", None))
    m.connect(("web", None))
    while m.h.unwritten:
        m.ledger_writes_one()
    m.script_answers("offline", "done", stale=True)
    assert not m.h.unwritten, "a stale answer settled the step"
    m.script_answers("offline", "done", stale=False)
    while m.h.unwritten:
        m.ledger_writes_one()
    m.live_only_after_offline_recorded_done()
    assert m.h.broker.deployment("todos", "2.0.0").state == "live"
    m.production_traffic()
    m.script_answers("online", "done", stale=False)
    while m.h.unwritten:
        m.ledger_writes_one()
    assert [(r["step"], r["event"]) for r in m.ledger] == [
        ("offline", "started"), ("offline", "done"), ("online", "started"), ("online", "done")]
    m.crash_and_restart()
    m.connect(("todos", "2.0.0"))
    m.connect(("migrate", None))
    m.no_step_started_after_done()
    assert not m.h.unwritten
    m.teardown()


TestDeployments = Deployments.TestCase
TestDeployments.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
