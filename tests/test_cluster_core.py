"""The cluster decisions of the sans-I/O core: the presence table, which broker
gets a message, answers across brokers, affinity and deduplication. Two or
three real broker cores in one process; the "network" between them is the
list of HandOver entries, passed on by hand (Redis is the shell's)."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from core import Harness
from exocom.core.actions import HandOver
from exocom.core.choice import BUCKETS, bucket_of
from exocom.core.cluster import Cluster
from exocom.core.leases import MARGIN, DriverLeases
from exocom.core.presence import Presence
from fleet import NEW, OLD, PREFIX, routes as deployment_routes

ROUTES = {
    "web": {"sends": ["todos.list", "todos.create"], "receives": ["todos.listing", "todos.created"]},
    "todos": {"receives": ["todos.list", "todos.create"], "sends": ["todos.listing", "todos.created"],
              "translations": [{"public": "todos.list", "internal": "list"}]},
}
LEASE = 2.0


class Node(Harness):
    """One broker core of a cluster; `handed` collects what it hands to the others."""

    def __init__(self, name: str, routes: dict = ROUTES, **options):
        super().__init__(routes, cluster_id=name, lease=LEASE, **options)
        self.name = name
        self.handed: list[HandOver] = []
        self._msg_ids = itertools.count(1)

    def run(self, actions: list) -> None:
        self.handed += [a for a in actions if isinstance(a, HandOver)]
        super().run([a for a in actions if not isinstance(a, HandOver)])

    def send(self, conn: int, name: str, payload: Any = None, activity: str | None = None, **fields) -> dict:
        n = next(self._msg_ids)
        return super().send(conn, name, payload, activity or f"{self.name}-a{n}", id=f"{self.name}-m{n}", **fields)

    @property
    def cluster(self) -> Cluster:
        return self.broker.cluster


def publish(nodes: list[Node]) -> None:
    """Every node sees what every other holds (what the shell does through Redis)."""
    for node in nodes:
        for other in nodes:
            if other is not node:
                node.run(node.cluster.presence_seen(other.name, other.cluster.holding(), node.now + LEASE, node.now))


def carry(nodes: list[Node]) -> int:
    """Pass every handed-over entry to its broker; how many there were."""
    by_name = {n.name: n for n in nodes}
    count = 0
    while any(n.handed for n in nodes):
        for node in nodes:
            handed, node.handed = node.handed, []
            for entry in handed:
                count += 1
                target = by_name[entry.broker]
                target.run(target.broker.handed_over(entry.data, target.now))
    return count


def fleet(nodes: list[Node], *todos: tuple[Node, str]) -> tuple[int, list[int]]:
    """`web` on the first node, an instance of `todos` per (node, version), everybody published."""
    web = nodes[0].connect("web")
    conns = [node.connect("todos", version) for node, version in todos]
    publish(nodes)
    return web, conns


@pytest.fixture
def nodes():
    return [Node("a"), Node("b"), Node("c")]


def test_a_message_goes_to_the_broker_that_holds_its_receiver_and_the_answer_to_the_asker(nodes):
    a, b, _ = nodes
    web = a.connect("web")
    todos = b.connect("todos", "1.0.0")
    publish(nodes)
    sent = a.send(web, "todos.list", {"q": 1})
    assert [h.broker for h in a.handed] == ["b"]
    assert carry(nodes) == 1
    [got] = b.take(todos)
    assert got["name"] == "list"  # translated by the receiving broker, for its instance's version
    assert got["id"] == sent["id"] and got["activityId"] == sent["activityId"] and got["payload"] == {"q": 1}
    b.send(todos, "todos.listing", [1], activity=sent["activityId"], responseTo=sent["id"])
    assert carry(nodes) == 1
    [answer] = a.take(web)
    assert answer["name"] == "todos.listing" and answer["responseTo"] == sent["id"] and answer["payload"] == [1]


def test_a_local_receiver_is_preferred(nodes):
    a, b, _ = nodes
    web, (here, _) = fleet(nodes, (a, "1.0.0"), (b, "1.0.0"))
    for _ in range(5):
        a.send(web, "todos.list")
    assert a.handed == [] and len(a.take(here)) == 5


def test_nobody_in_the_cluster_receives_it(nodes):
    a, _, _ = nodes
    web = a.connect("web")
    publish(nodes)
    a.send(web, "todos.list")
    assert a.handed == [] and "message undeliverable" in a.events("warning")


def test_an_activity_stays_on_the_broker_it_went_to(nodes):
    a, b, c = nodes
    web, (on_b, _) = fleet(nodes, (b, "1.0.0"), (c, "1.0.0"))
    first = a.send(web, "todos.list", activity="act")
    went_to = a.handed[0].broker
    carry(nodes)
    a.connect("todos", "1.0.0")  # a local instance now exists: the activity stays where it is all the same
    publish(nodes)
    for _ in range(4):
        a.send(web, "todos.create", activity="act")
    assert {h.broker for h in a.handed} == {went_to}
    carry(nodes)
    if went_to == "b":
        assert [m["activityId"] for m in b.take(on_b)] == [first["activityId"]] * 5
    # a message on a new activity goes to the local instance
    a.send(web, "todos.list")
    assert a.handed == []


def test_an_entry_delivered_twice_by_redis_reaches_its_receiver_once(nodes):
    a, b, _ = nodes
    web = a.connect("web")
    todos = b.connect("todos", "1.0.0")
    publish(nodes)
    a.send(web, "todos.list")
    [entry] = a.handed
    a.handed.append(entry)  # at least once: the same entry again
    assert carry(nodes) == 2
    assert len(b.take(todos)) == 1 and b.cluster.duplicates == 1


def test_a_version_requirement_picks_the_broker_with_a_satisfying_version(nodes):
    a, b, c = nodes
    web, (_, new) = fleet(nodes, (b, "1.0.0"), (c, "2.0.0"))
    a.send(web, "todos.list", version="2")
    assert [h.broker for h in a.handed] == ["c"]
    carry(nodes)
    assert len(c.take(new)) == 1
    # without a requirement: the newest live version, wherever it is
    a.send(web, "todos.list")
    assert [h.broker for h in a.handed] == ["c"]


def state_here(node: Node, version: str) -> str:
    return next(p.state for p in node.broker.registry.pools["todos"] if str(p.version) == version)


def test_a_newer_version_live_on_another_broker_is_the_stable_one_everywhere(nodes):
    """As on one broker: the newest live version takes new activities, an older one only drains."""
    a, _, c = nodes
    web, (old, new) = fleet(nodes, (a, "1.0.0"), (c, "2.0.0"))
    assert state_here(a, "1.0.0") == "draining" and "version draining" in a.events("info")
    for _ in range(3):
        a.send(web, "todos.list")
    assert [h.broker for h in a.handed] == ["c"] * 3 and a.take(old) == []
    carry(nodes)
    assert len(c.take(new)) == 3
    a.send(web, "todos.list", version="1")  # a requirement only the old version satisfies: it stays here
    assert a.handed == [] and len(a.take(old)) == 1
    # The new version's broker leaves: the old version is the stable one again, here.
    a.run(a.cluster.presence_left("c", a.now))
    assert state_here(a, "1.0.0") == "live" and "version live again" in a.events("info")
    a.send(web, "todos.list")
    assert a.handed == [] and len(a.take(old)) == 1


def test_a_version_live_only_on_another_broker_is_rolled_back_from_this_one(nodes):
    a, _, c = nodes
    web, (old, _) = fleet(nodes, (a, "1.0.0"), (c, "2.0.0"))
    a.run(a.broker.rollback("todos", "2.0.0", a.now))
    assert state_here(a, "1.0.0") == "live"
    a.send(web, "todos.list")
    assert a.handed == [] and len(a.take(old)) == 1
    c.run(c.cluster.records_seen(a.ledger, c.now))  # c follows the shared ledger
    assert state_here(c, "2.0.0") == "failed"


def test_the_same_version_here_and_elsewhere_stays_here(nodes):
    a, b, _ = nodes
    web, (here, _, _) = fleet(nodes, (a, "2.0.0"), (b, "2.0.0"), (b, "1.0.0"))
    assert state_here(a, "2.0.0") == "live"
    a.send(web, "todos.list")
    assert a.handed == [] and len(a.take(here)) == 1


def test_a_requirement_picks_the_newest_satisfying_version_of_the_cluster(nodes):
    a, b, _ = nodes
    web, (old, _) = fleet(nodes, (a, "1.0.0"), (b, "1.5.0"))
    a.send(web, "todos.list", version="1")
    assert [h.broker for h in a.handed] == ["b"] and a.take(old) == []


def test_brokers_share_the_load_of_one_version(nodes):
    a, b, c = nodes
    web, _ = fleet(nodes, (b, "1.0.0"), (c, "1.0.0"))
    for _ in range(10):
        a.send(web, "todos.list")
    assert sorted(h.broker for h in a.handed).count("b") == 5


def test_a_broker_whose_lease_passed_gets_nothing(nodes):
    a, b, _ = nodes
    web = a.connect("web")
    b.connect("todos", "1.0.0")
    publish(nodes)
    a.tick(LEASE + 0.1)
    assert "cluster broker lost" in a.events("warning")
    a.send(web, "todos.list")
    assert a.handed == [] and "message undeliverable" in a.events("warning")


def test_an_answer_whose_asker_left_goes_to_another_instance_of_its_role(nodes):
    a, b, _ = nodes
    web = a.connect("web")
    other_web = a.connect("web")
    todos = b.connect("todos", "1.0.0")
    publish(nodes)
    sent = a.send(web, "todos.list")
    carry(nodes)
    b.take(todos)
    a.disconnect(web)
    b.send(todos, "todos.listing", [], activity=sent["activityId"], responseTo=sent["id"])
    carry(nodes)
    assert [m["name"] for m in a.take(other_web)] == ["todos.listing"]


def test_config_json_shows_every_broker_and_what_it_holds(nodes):
    a, b, _ = nodes
    a.connect("web")
    b.connect("todos", "1.0.0")
    publish(nodes)
    cluster = a.broker.config_json()["cluster"]
    assert cluster["broker"] == "a"
    held = {entry["broker"]: entry["roles"] for entry in cluster["brokers"]}
    assert held["a"] == {"web": {"0.0.0": {"state": "live", "instances": 1}}}
    assert held["b"] == {"todos": {"1.0.0": {"state": "live", "instances": 1}}}
    assert held["c"] == {}


def test_an_unreadable_entry_is_logged_and_dropped(nodes):
    _, b, _ = nodes
    b.run(b.broker.handed_over(b"not json", b.now))
    assert "cluster entry unreadable" in b.events("error")


def test_one_broker_without_cluster_has_no_cluster_view():
    h = Harness(ROUTES)
    assert h.broker.cluster is None and h.broker.router.cluster is None
    assert "cluster" not in h.broker.config_json()


# ------------------------------------------------------------------ presence

def test_presence_forgets_a_broker_after_its_lease_and_never_shortens_one():
    p = Presence("me")
    p.seen("x", {"todos": {"1.0.0": {"state": "live", "instances": 1}}}, expires_at=12.0, now=10.0)
    p.seen("x", {"todos": {"1.0.0": {"state": "live", "instances": 1}}}, expires_at=11.0, now=10.5)  # late
    assert p.expire(11.5) == [] and "x" in p.holdings
    assert [log.event for log in p.expire(12.0)] == ["cluster broker lost"]
    assert p.holdings == {} and p.holders("todos") == []


def test_presence_ignores_itself_and_stale_announcements():
    p = Presence("me")
    assert p.seen("me", {}, 20.0, 10.0) == [] and p.holdings == {}
    assert p.seen("x", {}, 9.0, 10.0) == [] and p.holdings == {}


class PresenceMachine(RuleBasedStateMachine):
    """Whatever order announcements, departures and the clock come in: a broker is
    known exactly while its latest lease has not passed and it did not leave, and
    every change of what the others hold is flagged."""

    def __init__(self):
        super().__init__()
        self.presence = Presence("me")
        self.now = 0.0
        self.leases: dict[str, float] = {}
        self.holders_before: list = []

    @rule(broker=st.sampled_from(["x", "y", "z", "me"]), ahead=st.floats(-1.0, 3.0),
          instances=st.integers(0, 2))
    def announce(self, broker, ahead, instances):
        expires = self.now + ahead
        holding = {"todos": {"1.0.0": {"state": "live", "instances": instances}}}
        self.presence.seen(broker, holding, expires, self.now)
        if broker != "me" and expires > self.now:
            self.leases[broker] = max(expires, self.leases.get(broker, 0.0))

    @rule(broker=st.sampled_from(["x", "y", "z"]))
    def leave(self, broker):
        self.presence.left(broker)
        self.leases.pop(broker, None)

    @rule(seconds=st.floats(0.0, 2.0))
    def tick(self, seconds):
        self.now += seconds
        self.presence.expire(self.now)
        self.leases = {b: at for b, at in self.leases.items() if at > self.now}

    @invariant()
    def known_exactly_while_leased(self):
        assert set(self.presence.holdings) == set(self.leases)
        # Every change of who holds what is flagged, for the versions' states to be recomputed.
        holders = sorted(self.presence.holders("todos"), key=str)
        if holders != self.holders_before:
            assert "todos" in self.presence.changed
        self.presence.changed.clear()
        self.holders_before = holders
        assert all(b != "me" for b, _, _ in self.presence.holders("todos"))


TestPresenceMachine = PresenceMachine.TestCase


# -------------------------------------------------------------- driver leases

def test_a_lease_is_driven_until_its_ttl_from_when_it_was_asked_less_a_margin():
    leases = DriverLeases("me", ttl=3.0)
    assert not leases.may_drive("todos@2.0.0", 10.0)
    assert [log.event for log in leases.answered("todos@2.0.0", 7, None, sent_at=10.0, now=10.2)] == [
        "deployment driver lease taken"]
    assert leases.may_drive("todos@2.0.0", 13.0 - MARGIN - 0.01)
    assert not leases.may_drive("todos@2.0.0", 13.0 - MARGIN)
    assert leases.answered("todos@2.0.0", 7, None, sent_at=11.0, now=11.1) == []  # a renewal: no news
    assert [log.event for log in leases.expire(14.0)] == ["deployment driver lease expired"]
    assert leases.token("todos@2.0.0") == 7  # a late record goes to Redis with it, and Redis refuses it
    leases.released("todos@2.0.0")
    assert leases.token("todos@2.0.0") is None


def test_a_lease_another_broker_took_is_lost_at_once():
    leases = DriverLeases("me", ttl=3.0)
    leases.answered("d", 1, None, sent_at=0.0, now=0.0)
    assert [log.event for log in leases.answered("d", None, "other", sent_at=1.0, now=1.0)] == [
        "deployment driver lease lost"]
    assert not leases.may_drive("d", 1.0) and leases.token("d") == 1 and leases.holders == {"d": "other"}


def deploying() -> tuple[Node, Node, int, int]:
    """Brokers a (the script, the old version) and b (the new version, held)."""
    a, b = Node("a", deployment_routes()), Node("b", deployment_routes())
    a.connect("todos", OLD)
    b.connect("todos", NEW)
    script = a.connect("todos-deployment")
    publish([a, b])
    return a, b, script, b.broker.registry.instances_of("todos")[0].conn


def test_a_deployment_starts_only_on_the_broker_that_holds_its_lease():
    a, b, script, _ = deploying()
    assert a.broker.cluster.wanted_leases() == [f"todos@{NEW}"] and b.broker.cluster.wanted_leases() == []
    assert a.take(script) == [] and a.ledger == []  # no lease, no step
    a.run(a.broker.cluster.leases_answered([(f"todos@{NEW}", 1, None)], a.now, a.now))
    [start] = a.take(script)
    assert start["name"] == f"{PREFIX}-offline-start"
    # b follows the ledger a writes: its instance of the new version stays held, then goes live.
    b.run(b.broker.cluster.records_seen(a.ledger, b.now))
    assert b.broker.registry.instances_of("todos")[0].pool.state == "held"
    a.send(script, f"{PREFIX}-offline-done", activity=start["activityId"])
    b.run(b.broker.cluster.records_seen(a.ledger[1:], b.now))
    assert b.broker.registry.instances_of("todos")[0].pool.state == "live"
    assert "version live" in b.events("info")


def test_no_step_advances_once_the_lease_expired_and_a_late_record_is_dropped_when_refused():
    a, _, script, _ = deploying()
    a.auto_write = False
    a.run(a.broker.cluster.leases_answered([(f"todos@{NEW}", 1, None)], a.now, a.now))
    a.write_one()  # offline started
    [start] = a.take(script)
    a.tick(LEASE)  # no renewal came (Redis away): the lease expired here
    assert "deployment driver lease expired" in a.events("warning")
    a.send(script, f"{PREFIX}-offline-done", activity=start["activityId"])
    [late] = a.unwritten  # sent to Redis with the stale token...
    a.unwritten.clear()
    a.run(a.broker.cluster.record_refused(late, a.now))  # ...which refuses it
    assert "deployment record refused" in a.events("warning")
    d = a.broker.deployment("todos", NEW)
    assert d.state == "held" and d.writing is None and d.in_flight is None
    a.tick(1.0)
    assert a.take(script) == [] and a.unwritten == []  # nothing starts without the lease


RAMP = {"steps": [10, 50, 100], "interval": 60, "gates": {"minSamples": 1}}


def ramped(*versions_on_b: str, on_a: tuple[str, ...] = (), rollout: dict = RAMP) -> tuple[Node, Node, int]:
    """a drives a ramp of todos NEW (the script and versions `on_a` on a, these versions of todos on b),
    its offline step done."""
    a, b = Node("a", deployment_routes(rollout=rollout)), Node("b", deployment_routes(rollout=rollout))
    for version in on_a:
        a.connect("todos", version)
    for version in versions_on_b:
        b.connect("todos", version)
    script = a.connect("todos-deployment")
    publish([a, b])
    a.run(a.broker.cluster.leases_answered([(f"todos@{NEW}", 1, None)], a.now, a.now))
    [start] = a.take(script)
    a.send(script, f"{PREFIX}-offline-done", activity=start["activityId"])
    return a, b, script


def test_a_ramps_share_is_the_same_on_a_broker_that_only_follows_the_ledger():
    a, b, _ = ramped(OLD, NEW)
    b.run(b.broker.cluster.records_seen(a.ledger, b.now))
    versions = {v["version"]: (v["state"], v["share"]) for c in b.broker.config_json()["clients"]
                if c["role"] == "todos" for v in c["versions"]}
    assert versions == {NEW: ("ramping", 10.0), OLD: ("live", 90.0)}
    # b routes new activities by that share, with its own instances
    web = b.connect("web")
    for i in range(200):
        b.send(web, "todos.list", activity=f"ramp-{i}")
    new_conn = next(i.conn for i in b.broker.registry.instances_of("todos") if str(i.version) == NEW)
    assert 5 <= len(b.take(new_conn)) <= 40


def test_a_ramps_share_is_cluster_wide_and_an_activity_lands_on_one_version_whichever_broker_places_it():
    """The old version here on a, the ramping one only on b: a hands b the ramp's share."""
    a, b, _ = ramped(NEW, on_a=(OLD,))
    b.run(b.broker.cluster.records_seen(a.ledger, b.now))
    assert a.broker.deployment("todos", NEW).share == 10.0
    web_a, web_b = a.connect("web"), b.connect("web")
    activities = [f"ramp-{i}" for i in range(300)]
    for activity in activities:
        a.send(web_a, "todos.list", activity=activity)
        b.send(web_b, "todos.list", activity=activity)
    to_new_from_a = {entry["f"]["activityId"] for entry in map(orjson.loads, (h.data for h in a.handed))}
    new_conn = b.broker.registry.instances_of("todos")[0].conn
    to_new_on_b = {m["activityId"] for m in b.take(new_conn)}
    assert to_new_from_a == to_new_on_b == {x for x in activities if bucket_of(x) < BUCKETS // 10}
    assert 10 <= len(to_new_on_b) <= 60
    assert {h.broker for h in a.handed} == {"b"} and {h.broker for h in b.handed} == {"a"}


def test_an_activity_a_ramp_places_elsewhere_reaches_the_new_version_before_that_broker_read_the_ramp():
    """a reads that the ramp began before b does: b delivers to the version a chose, not by its own stale view."""
    a, b, _ = ramped(NEW, on_a=(OLD,))
    web = a.connect("web")
    activity = next(f"ramp-{i}" for i in range(1000) if bucket_of(f"ramp-{i}") < BUCKETS // 10)
    a.send(web, "todos.list", activity=activity)
    assert b.broker.deployment("todos", NEW).state == "held"  # b has not read the ledger yet
    carry([a, b])
    new_conn = b.broker.registry.instances_of("todos")[0].conn
    assert [m["activityId"] for m in b.take(new_conn)] == [activity]
    assert "message undeliverable" not in b.events("warning")


def test_the_gates_of_the_broker_that_drives_a_ramp_judge_the_figures_of_every_broker():
    """The new version's instance and its callers are all on b; a drives the ramp, and counts b's replies
    and the drop of b's instance."""
    a, b, _ = ramped(NEW, on_a=(OLD,), rollout={**RAMP, "gates": {"minSamples": 1, "maxDisconnects": 0}})
    b.run(b.broker.cluster.records_seen(a.ledger, b.now))
    web = b.connect("web")
    new_conn = b.broker.registry.instances_of("todos")[0].conn
    for i in range(100):
        b.send(web, "todos.list", activity=f"ramp-{i}")
    asked = b.take(new_conn)
    for message in asked:
        b.send(new_conn, "todos.listing", activity=message["activityId"], responseTo=message["id"])
    assert asked and b.broker.deployment("todos", NEW).state == "ramping"

    def b_publishes():
        a.run(a.cluster.presence_seen("b", b.cluster.holding(), a.now + LEASE, a.now, b.broker.ramps.seen_here()))

    b_publishes()
    [row] = [r for r in a.broker.deployments_json() if r["version"] == NEW]
    assert row["rollout"]["figures"]["replies"] == len(asked)
    b.disconnect(new_conn)  # a's gate maxDisconnects 0: broken by b's instance
    b_publishes()
    a.tick(0.5)
    assert "rollout aborted" in a.events("error") and a.broker.deployment("todos", NEW).state == "failed"


def test_figures_of_an_earlier_ramp_of_the_version_are_not_counted():
    a, b, _ = ramped(NEW, on_a=(OLD,))
    d = a.broker.deployment("todos", NEW)
    seen = {f"todos@{NEW}": {"began": d.ramp_began - 100, "versions": {NEW: [5, 5, 0.5, 0] + [0] * 15}}}
    a.run(a.cluster.presence_seen("b", b.cluster.holding(), a.now + LEASE, a.now, seen))
    assert a.cluster.figures_elsewhere(d, None) is None


def test_an_operator_action_goes_to_the_broker_that_drives_the_deployment():
    a, b, script, _ = deploying()
    b.connect("todos-deployment")  # b wants the lease too, and hears that a holds it
    a.run(a.broker.cluster.leases_answered([(f"todos@{NEW}", 1, None)], a.now, a.now))
    b.run(b.broker.cluster.leases_answered([(f"todos@{NEW}", None, "a")], b.now, b.now))
    with pytest.raises(ValueError, match="driven by broker 'a'"):
        b.broker.retry("todos", NEW, b.now)
    # Once b no longer asks for the lease, it does not claim to know who holds it.
    b.run(b.broker.cluster.leases_answered([], b.now, b.now))
    with pytest.raises(ValueError, match="no failed step"):  # judged by the deployment itself again
        b.broker.retry("todos", NEW, b.now)


def test_a_ramp_is_wanted_by_a_broker_with_the_ramping_version_after_its_script_left():
    a, b, script = ramped(NEW)
    [online] = a.take(script)
    a.send(script, f"{PREFIX}-online-done", activity=online["activityId"])
    b.run(b.broker.cluster.records_seen(a.ledger, b.now))
    a.disconnect(script)
    assert a.broker.deployment("todos", NEW).state == "ramping"
    assert a.broker.cluster.wanted_leases() == [] and b.broker.cluster.wanted_leases() == [f"todos@{NEW}"]


def test_a_failure_decided_under_a_lost_lease_does_not_keep_the_version_out_here():
    a, _, script, _ = deploying()
    a.auto_write = False
    a.run(a.broker.cluster.leases_answered([(f"todos@{NEW}", 1, None)], a.now, a.now))
    a.write_one()  # offline started
    a.take(script)
    a.run(a.broker.cluster.leases_answered([(f"todos@{NEW}", None, "b")], a.now, a.now))  # b took it over
    a.tick(400)  # past the step's time limit: a fails it (out of production at once), then records it
    assert a.broker.deployment("todos", NEW).state == "failed"
    [late] = a.unwritten
    a.unwritten.clear()
    a.run(a.broker.cluster.record_refused(late, a.now))  # the ledger is b's: refused
    assert a.broker.deployment("todos", NEW).state == "held"  # as the ledger has it


# ------------------------------------------------- the security adapter, across brokers

SECURED = {
    "web": {"receives": ["user created", "message unauthorized"], "sends": ["create user"]},
    "users": {"receives": ["create user"], "sends": ["user created"]},
    "security": {"receives": ["authorize message", "security response"],
                 "sends": ["message authorized", "message unauthorized", "security request"]},
    "sessions": {"receives": ["get session"], "sends": ["session data"]},
}


def secured() -> tuple[Node, Node, int, int, int, int]:
    """The security service on a; web, users and sessions on b."""
    a, b = Node("a", SECURED), Node("b", SECURED)
    security = a.connect("security")
    web, users, sessions = b.connect("web"), b.connect("users"), b.connect("sessions")
    publish([a, b])
    return a, b, security, web, users, sessions


@pytest.mark.parametrize("verdict", ["message authorized", "message unauthorized"])
def test_a_message_is_authorized_by_a_security_service_on_another_broker(verdict):
    a, b, security, web, users, _ = secured()
    sent = b.send(web, "create user", {"name": "Jo"})
    assert b.take(users) == []  # not before the verdict
    carry([a, b])
    [ask] = a.take(security)
    assert ask["name"] == "authorize message" and ask["payload"]["id"] == sent["id"]
    a.send(security, verdict, activity=ask["activityId"])
    carry([a, b])
    if verdict == "message authorized":
        [got] = b.take(users)
        assert got["id"] == sent["id"] and got["payload"] == {"name": "Jo"} and b.take(web) == []
    else:
        [refused] = b.take(web)
        assert refused["name"] == "message unauthorized" and refused["payload"]["id"] == sent["id"]
        assert b.take(users) == [] and "message unauthorized" in b.events("warning")
    assert "unknown_authorization" not in str(a.events())


def test_the_security_services_query_reaches_another_broker_and_its_answer_comes_back():
    a, b, security, _, _, sessions = secured()
    request = {"name": "get session", "payload": {"id": "2"}, "id": "q1", "activityId": "query-1"}
    a.send(security, "security request", request, activity="security-1")
    carry([a, b])
    [got] = b.take(sessions)
    assert got["name"] == "get session" and got["activityId"] == "query-1" and got["isSecurity"] is True
    b.send(sessions, "session data", {"isAdmin": True}, activity="query-1", isSecurity=True)
    carry([a, b])
    [response] = a.take(security)
    assert response["name"] == "security response" and response["activityId"] == "security-1"
    assert response["payload"]["payload"] == {"isAdmin": True}
