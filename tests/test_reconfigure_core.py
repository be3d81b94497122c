"""A configuration reload in the core (`Broker.reconfigure`), without sockets:
what is rebuilt, what is kept, and that no connection of a role that stays
is lost."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from core import Harness
from test_rollout_core import GATES, answer, deployment, reply_all, spread, state, write_all

from exocom.core.actions import CLOSE_ROLE_REMOVED, CLOSE_UNKNOWN_ROLE

OLD, NEW = "1.0.0", "2.0.0"
BASE = {
    "web": {"sends": ["todos.list"], "receives": ["todos.listing", "todos.failed"]},
    "todos": {"receives": ["todos.list"], "sends": ["todos.listing", "todos.failed"]},
}
SCRIPT = {"todos-deployment": {"deploys": f"todos@{NEW}"}}
RAMP = {"todos-deployment": {"deploys": f"todos@{NEW}", "rollout": {"steps": [10, 50, 100], "interval": 60,
                                                                    "gates": GATES}}}


def fleet(routes: dict) -> tuple[Harness, int, int, int, int]:
    """web, todos 1.0.0 and 2.0.0, and a connection of todos-deployment if configured."""
    h = Harness(routes)
    web, old, new = h.connect("web"), h.connect("todos", OLD), h.connect("todos", NEW)
    script = h.connect("todos-deployment") if "todos-deployment" in routes else h.connect()
    write_all(h)
    return h, web, old, new, script


def test_a_new_deployment_holds_its_connected_version_at_once_and_runs_without_dropping_anybody():
    h, web, old, new, _ = fleet(BASE)
    assert state(h, NEW) == "live" and state(h, OLD) == "draining"
    h.reload({**BASE, **SCRIPT})
    assert h.closed == {}
    assert state(h, NEW) == "held" and state(h, OLD) == "live"
    assert [log.fields["version"] for log in h.logs if log.event == "version held"] == [NEW]
    assert "deployment declared" in h.events("info")
    _, to_new = spread(h, web, old, new, 20, "a")
    assert to_new == []
    script = h.connect("todos-deployment")
    answer(h, script, "offline")
    assert state(h, NEW) == "live"
    answer(h, script, "online")
    assert deployment(h)["finished"] and h.closed == {}


def test_a_new_deployment_whose_script_and_version_are_connected_starts_its_step_at_once():
    h, web, old, new, script = fleet({**BASE, "todos-deployment": {}})
    h.reload({**BASE, **SCRIPT})
    assert state(h, NEW) == "held" and deployment(h)["inFlight"] == "offline"
    answer(h, script, "offline")
    assert state(h, NEW) == "live"
    answer(h, script, "online")
    assert deployment(h)["finished"] and h.closed == {}


def test_a_removed_role_is_closed_with_4005_and_may_not_register_again_while_a_new_role_may():
    routes = {**BASE, "audit": {"receives": ["todos.list"]}}
    h, web, old, new, _ = fleet(routes)
    audit = [h.connect("audit"), h.connect("audit")]
    h.reload({**BASE, "stats": {"receives": ["todos.list"]}})
    assert {conn: code for conn, (code, _) in h.closed.items()} == {a: CLOSE_ROLE_REMOVED for a in audit}
    assert "removed from the routing configuration" in h.closed[audit[0]][1]
    [removed] = [log for log in h.logs if log.event == "role removed"]
    assert removed.fields["role"] == "audit" and len(removed.fields["instances"]) == 2
    # Until the shell reports it gone, an instance of a removed role gets nothing and may send nothing.
    h.send(web, "todos.list")
    assert h.take(audit[0]) == h.take(audit[1]) == [] and len(h.take(old) + h.take(new)) == 1
    h.send(audit[0], "todos.list")
    assert h.take(old) == h.take(new) == []
    for conn in audit:
        h.disconnect(conn)
    again = h.connect("audit")
    assert h.closed[again][0] == CLOSE_UNKNOWN_ROLE
    stats = h.connect("stats")
    h.send(web, "todos.list")
    assert len(h.take(stats)) == 1


def test_a_kept_role_gets_its_new_routes_on_its_open_connections():
    h, web, old, new, _ = fleet(BASE)
    h.send(web, "todos.count")
    assert "message refused" in h.events("warning")  # web may not send it yet
    h.reload({"web": {**BASE["web"], "sends": ["todos.list", "todos.count"]},
              "todos": {**BASE["todos"], "receives": ["todos.list", "todos.count"],
                        "translations": [{"public": "todos.count", "internal": "count"}]}})
    h.send(web, "todos.count")
    assert [m["name"] for m in h.take(new)] == ["count"]
    assert h.closed == {}


def test_a_step_in_flight_of_a_kept_deployment_is_answered_after_the_reload():
    h, web, old, new, script = fleet({**BASE, **SCRIPT})
    h.reload({**BASE, "audit": {}, "todos-deployment": {"deploys": f"todos@{NEW}", "stepTimeout": 5}})
    assert deployment(h)["inFlight"] == "offline"
    answer(h, script, "offline")
    assert state(h, NEW) == "live" and "offline step done" in h.events("info")


def test_a_record_being_written_during_the_reload_is_applied_once_written():
    h = Harness({**BASE, **SCRIPT}, auto_write=False)
    h.connect("todos", NEW), h.connect("todos-deployment")
    assert [r["event"] for r in h.unwritten] == ["started"]
    h.reload({**BASE, **SCRIPT, "audit": {}})
    write_all(h)
    assert deployment(h)["inFlight"] == "offline"
    assert [(r["step"], r["event"]) for r in h.ledger] == [("offline", "started")]


def test_a_removed_deployment_mid_step_abandons_the_step_and_its_version_is_treated_as_undeployed():
    h, web, old, new, script = fleet({**BASE, **SCRIPT})
    assert state(h, NEW) == "held" and deployment(h)["inFlight"] == "offline"
    [start] = h.take(script)
    h.reload({**BASE, "todos-deployment": {}})
    [removed] = [log for log in h.logs if log.event == "deployment removed"]
    assert removed.level == "warning" and removed.fields["abandoned_step"] == "offline"
    assert removed.fields["was"] == "held" and removed.fields["state"] == "live"
    assert state(h, NEW) == "live" and h.broker.deployments_json() == [] and h.closed == {}
    # The script's late answer is no deployment answer any more: refused as any name it may not send.
    h.send(script, start["name"].replace("-start", "-done"), activity=start["activityId"])
    assert [log.fields.get("code") for log in h.logs if log.event == "message refused"] == ["not_allowed"]


def test_a_removed_ramping_deployment_makes_its_version_live_as_a_restart_would():
    h, web, old, new, script = fleet({**BASE, **RAMP})
    answer(h, script, "offline")
    assert state(h, NEW) == "ramping"
    h.reload({**BASE, "todos-deployment": {}})
    assert state(h, NEW) == "live" and state(h, OLD) == "draining"
    assert [log.fields["was"] for log in h.logs if log.event == "deployment removed"] == ["ramping"]
    restarted = Harness({**BASE, "todos-deployment": {}}, records=h.ledger)
    restarted.connect("todos", OLD), restarted.connect("todos", NEW)
    assert state(restarted, NEW) == "live"


def test_a_changed_rollout_keeps_the_recorded_step_and_applies_the_new_steps_interval_and_gates():
    h, web, old, new, script = fleet({**BASE, **RAMP})
    answer(h, script, "offline")
    h.reload({**BASE, "todos-deployment": {"deploys": f"todos@{NEW}", "rollout": {
        "steps": [30, 60, 90, 100], "interval": 10, "gates": {**GATES, "maxErrorRate": 0.05}}}})
    d = deployment(h)
    assert d["rollout"]["step"] == 0 and d["share"] == 30 and d["rollout"]["interval"] == 10
    assert h.closed == {} and state(h, NEW) == "ramping"
    to_old, to_new = spread(h, web, old, new, 1000, "a")
    assert abs(len(to_new) / 1000 - 0.30) < 0.05
    reply_all(h, new, [{"activityId": a} for a in to_new[:20]])
    h.tick(11)  # the new interval, not the old 60 s
    assert deployment(h)["rollout"]["step"] == 1 and deployment(h)["share"] == 60
    # The new gate (5 % errors) judges: 2 errors in 22 replies fail it.
    h.take(new)
    to_old, to_new = spread(h, web, old, new, 100, "b")
    reply_all(h, new, [{"activityId": a} for a in to_new[:2]], "todos.failed")
    assert state(h, NEW) == "failed"
    [aborted] = [log for log in h.logs if log.event == "rollout aborted"]
    assert aborted.fields["gate"] == "errorRate"


def test_shorter_steps_put_a_ramp_past_its_last_ramping_step_live_as_a_restart_would():
    h, web, old, new, script = fleet({**BASE, **RAMP})
    answer(h, script, "offline")
    h.run(h.broker.rollout("todos", NEW, "pause", h.now))
    h.reload({**BASE, "todos-deployment": {"deploys": f"todos@{NEW}", "rollout": {"steps": [100]}}})
    assert state(h, NEW) == "live" and "version live" in h.events("info")


def test_the_error_names_of_a_rollout_follow_the_reload():
    h, web, old, new, script = fleet({**BASE, **RAMP})
    assert h.broker.router.error_names == {"todos": {"todos.failed"}}
    h.reload({**BASE, **SCRIPT})
    assert h.broker.router.error_names == {}
    h.reload({**BASE, "todos-deployment": {"deploys": f"todos@{NEW}", "rollout": {
        "steps": [10, 100], "gates": {"errorMessages": ["todos.listing"]}}}})
    assert h.broker.router.error_names == {"todos": {"todos.listing"}}


def test_the_security_adapter_is_switched_on_and_off():
    h, web, old, new, _ = fleet(BASE)
    h.reload({**BASE, "security": {}})
    security = h.connect("security")
    h.send(web, "todos.list")
    assert h.names(security) == ["authorize message"] and h.take(new) == []
    h.reload(BASE)
    assert h.closed[security][0] == CLOSE_ROLE_REMOVED
    h.disconnect(security)
    h.send(web, "todos.list")
    assert len(h.take(new)) == 1


ROLES = ("a", "b", "c", "d")


@st.composite
def configs(draw):
    roles = draw(st.sets(st.sampled_from(ROLES), min_size=1))
    data = {}
    for role in sorted(roles):
        data[role] = {"receives": sorted(draw(st.sets(st.sampled_from(["x", "y"])))),
                      "sends": sorted(draw(st.sets(st.sampled_from(["x", "y"]))))}
    deployer = draw(st.sampled_from([None, *sorted(roles)]))
    targets = [r for r in sorted(roles) if r != deployer]
    if deployer is not None and targets:
        data[deployer]["deploys"] = f"{draw(st.sampled_from(targets))}@{draw(st.sampled_from(['1.0.0', '2.0.0']))}"
    return data


@settings(max_examples=150, deadline=None)
@given(first=configs(), changes=st.lists(configs(), min_size=1, max_size=4),
       versions=st.lists(st.sampled_from(["1.0.0", "2.0.0"]), min_size=4, max_size=4))
def test_random_reloads_never_lose_a_connection_of_a_role_that_stays(first, changes, versions):
    h = Harness(first)
    conns = {}
    for role, version in zip(ROLES, versions):
        if role in first:
            conns[h.connect(role, version)] = role
    for data in changes:
        h.reload(data)
        for conn, role in list(conns.items()):
            if role in data:
                assert conn not in h.closed, (role, data)
                instance = h.broker.registry.by_conn[conn]
                assert instance.profile is h.broker.table.roles[role].profile_for(instance.version)
            else:
                assert h.closed.pop(conn)[0] == CLOSE_ROLE_REMOVED
                h.disconnect(conn)
                del conns[conn]
        write_all(h)
        # What derives from the configuration is what a fresh broker would build from it.
        fresh = Harness(data, records=h.ledger)
        assert {(d["role"], d["version"]) for d in h.broker.deployments_json()} == \
               {(d["role"], d["version"]) for d in fresh.broker.deployments_json()}
        assert h.broker.router.script_targets == fresh.broker.router.script_targets
        assert h.broker.table.receivers == fresh.broker.table.receivers
