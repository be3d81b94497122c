"""Gradual rollouts in the core (contract 7 and 8), without sockets."""

from __future__ import annotations

import pytest

from core import Harness

GATES = {"minSamples": 10, "errorMessages": ["todos.failed"], "maxErrorRate": 0.2, "maxDisconnects": 1}
ROUTES = {
    "web": {"sends": ["todos.list"], "receives": ["todos.listing", "todos.failed"]},
    "todos": {"receives": ["todos.list"], "sends": ["todos.listing", "todos.failed"]},
    "todos-deployment": {"deploys": "todos@2.0.0",
                         "rollout": {"steps": [10, 50, 100], "interval": 60, "gates": GATES}},
}
OLD, NEW = "1.0.0", "2.0.0"


def ramping(**options) -> tuple[Harness, int, int, int, int]:
    """A broker where todos 2.0.0 just started ramping beside 1.0.0: (harness, web, old, new, script)."""
    h = Harness(ROUTES, **options)
    web, old, new, script = h.connect("web"), h.connect("todos", OLD), h.connect("todos", NEW), h.connect("todos-deployment")
    write_all(h)
    answer(h, script, "offline")
    write_all(h)
    assert state(h, NEW) == "ramping"
    return h, web, old, new, script


def write_all(h: Harness) -> None:
    while h.unwritten:
        h.write_one()


def answer(h: Harness, script: int, step: str, outcome: str = "done", payload=None) -> None:
    [start] = [m for m in h.take(script) if m["name"].endswith(f"{step}-start")]
    h.send(script, start["name"].replace("-start", f"-{outcome}"), payload, activity=start["activityId"])


def state(h: Harness, version: str) -> str:
    [todos] = [c for c in h.broker.config_json()["clients"] if c["role"] == "todos"]
    return {v["version"]: v["state"] for v in todos["versions"]}[version]


def deployment(h: Harness) -> dict:
    [d] = h.broker.deployments_json()
    return d


def spread(h: Harness, web: int, old: int, new: int, count: int, tag: str) -> tuple[list[str], list[str]]:
    """Send `count` new activities; the activity ids that reached each version."""
    for i in range(count):
        h.send(web, "todos.list", activity=f"{tag}-{i}")
    return [m["activityId"] for m in h.take(old)], [m["activityId"] for m in h.take(new)]


def reply_all(h: Harness, instance: int, messages: list[dict], name: str = "todos.listing", after: float = 0.001) -> None:
    h.now += after
    for m in messages:
        h.send(instance, name, activity=m["activityId"])


def test_a_ramping_version_takes_its_share_of_new_activities_and_activities_stick():
    h, web, old, new, _ = ramping()
    to_old, to_new = spread(h, web, old, new, 4000, "a")
    # The bucket of an activity is a hash of its id: over 4000 activities 10 % within 1.5 points.
    assert abs(len(to_new) / 4000 - 0.10) < 0.015, len(to_new)
    assert len(to_old) + len(to_new) == 4000
    # Every later message of an activity goes to the version it started on.
    for activity in to_new[:50] + to_old[:50]:
        h.send(web, "todos.list", activity=activity)
    assert [m["activityId"] for m in h.take(new)] == to_new[:50]
    assert [m["activityId"] for m in h.take(old)] == to_old[:50]


def test_a_version_requirement_only_the_ramping_version_satisfies_reaches_it():
    h, web, old, new, _ = ramping()
    h.send(web, "todos.list", version="2")
    h.send(web, "todos.list", version="1")
    assert len(h.take(new)) == 1 and len(h.take(old)) == 1


def test_the_ramp_steps_up_after_its_interval_with_evidence_and_waits_for_the_online_step_at_the_last():
    h, web, old, new, script = ramping()
    h.tick(61)
    assert deployment(h)["rollout"]["step"] == 0, "no replies yet: no evidence, no more traffic"
    for i in range(400):
        h.send(web, "todos.list", activity=f"b-{i}")
    reply_all(h, new, h.take(new))
    h.tick(1)
    assert deployment(h)["rollout"]["step"] == 1 and deployment(h)["share"] == 50
    assert "rollout stepped up" in h.events("info")
    h.tick(61)
    assert deployment(h)["rollout"]["step"] == 1, "the last step waits for the online step"
    answer(h, script, "online")
    h.tick(1)
    assert state(h, NEW) == "live" and state(h, OLD) == "draining"
    assert deployment(h)["share"] == 100 and "rollout finished" in h.events("info")
    h.take(old), h.take(new)
    to_old, to_new = spread(h, web, old, new, 20, "c")
    assert to_old == [] and len(to_new) == 20


def test_a_failing_gate_aborts_on_the_reply_that_fails_it_and_the_next_activity_goes_to_the_stable_version():
    h, web, old, new, _ = ramping(auto_write=False)
    for i in range(300):
        h.send(web, "todos.list", activity=f"a-{i}")
    to_new = h.take(new)
    assert len(to_new) >= 10
    reply_all(h, new, to_new[:9], "todos.failed")  # fewer than minSamples: not judged yet
    assert state(h, NEW) == "ramping"
    reply_all(h, new, to_new[9:10], "todos.failed")
    # Taken out before the abort record is written (auto_write is off).
    assert state(h, NEW) == "failed" and h.unwritten and h.unwritten[-1]["event"] == "aborted"
    [aborted] = [log for log in h.logs if log.event == "rollout aborted"]
    assert aborted.fields["gate"] == "errorRate" and aborted.fields["figures"]["errors"] == 10
    _, to_new_after = spread(h, web, old, new, 200, "b")
    assert to_new_after == []
    write_all(h)
    assert deployment(h)["stopped"].startswith("gate errorRate failed")


def test_an_online_failure_takes_the_version_out_before_its_record_is_written():
    h, web, old, new, script = ramping(auto_write=False)
    answer(h, script, "online", "failed", {"reason": "boom"})
    assert h.unwritten and state(h, NEW) == "failed"
    assert spread(h, web, old, new, 200, "a")[1] == []


def test_operators_pause_resume_promote_and_abort():
    h, web, old, new, _ = ramping()
    h.run(h.broker.rollout("todos", NEW, "pause", h.now))
    assert deployment(h)["rollout"]["paused"]
    with pytest.raises(ValueError, match="paused already"):
        h.broker.rollout("todos", NEW, "pause", h.now)
    h.run(h.broker.rollout("todos", NEW, "resume", h.now))
    h.run(h.broker.rollout("todos", NEW, "promote", h.now))
    assert state(h, NEW) == "live" and state(h, OLD) == "draining"
    with pytest.raises(ValueError, match="not ramping"):
        h.broker.rollout("todos", NEW, "abort", h.now)
    with pytest.raises(KeyError):
        h.broker.rollout("web", "1.0.0", "abort", h.now)


def test_rolling_back_a_live_version_makes_the_previous_one_stable_again():
    h, web, old, new, _ = ramping()
    h.run(h.broker.rollout("todos", NEW, "promote", h.now))
    h.run(h.broker.rollback("todos", NEW, h.now))
    assert state(h, NEW) == "failed" and state(h, OLD) == "live"
    assert spread(h, web, old, new, 50, "a")[1] == []
    # A rollback never leaves a role without a live version.
    with pytest.raises(ValueError, match="no other live version"):
        h.broker.rollback("todos", OLD, h.now)
    # A version without a deployment can be rolled back too, and it stays so after a restart.
    h.connect("todos", "0.9.0")
    assert state(h, "0.9.0") == "draining"
    h.run(h.broker.rollback("todos", OLD, h.now))
    assert state(h, OLD) == "failed" and state(h, "0.9.0") == "live"
    again = Harness(ROUTES, records=h.ledger)
    again.connect("todos", OLD), again.connect("todos", "0.9.0")
    assert state(again, OLD) == "failed"


def test_a_restart_resumes_the_ramp_at_its_recorded_step():
    h, web, old, new, script = ramping()
    h.run(h.broker.rollout("todos", NEW, "pause", h.now))
    h.run(h.broker.rollout("todos", NEW, "resume", h.now))
    for i in range(200):
        h.send(web, "todos.list", activity=f"a-{i}")
    reply_all(h, new, h.take(new))
    h.tick(61)
    assert deployment(h)["rollout"]["step"] == 1
    again = Harness(ROUTES, records=h.ledger)
    again.connect("todos", OLD), again.connect("todos", NEW)
    assert state(again, NEW) == "ramping"
    [d] = again.broker.deployments_json()
    assert d["rollout"]["step"] == 1 and d["share"] == 50 and not d["rollout"]["paused"]


def test_a_replaced_version_drains_then_is_drained_after_the_quiet_period():
    h = Harness({"web": {"sends": ["todos.list"]}, "todos": {"receives": ["todos.list"]}}, drain_period=30,
                activity_ttl=10)
    web, old = h.connect("web"), h.connect("todos", OLD)
    h.send(web, "todos.list", activity="long")
    new = h.connect("todos", NEW)
    assert state(h, OLD) == "draining" and state(h, NEW) == "live"
    h.tick(20)
    h.send(web, "todos.list", activity="long")  # affinity keeps the old activity on the old version
    assert len(h.take(old)) == 2 and not h.take(new)
    h.tick(25)
    assert state(h, OLD) == "draining", "touched 25 s ago: not quiet for the drain period yet"
    h.tick(10)
    h.tick(10)
    h.tick(10)  # the activity memory (10 s TTL, two generations) has forgotten "long" by now
    assert state(h, OLD) == "drained"
    assert "version drained" in h.events("info")
    h.send(web, "todos.list", version="1")  # a pinned message: draining again
    h.tick(1)
    assert state(h, OLD) == "draining"


# ------------------------------------------------ found in review (each failed before its fix)


def records_of_a_ramp_at_step_0() -> list[dict]:
    return [{"role": "todos", "version": NEW, "step": "offline", "event": event, "attempt": 1, "at": 0.0,
             "error": None, "detail": {"rollout": {}} if event == "done" else None} for event in ("started", "done")]


def test_after_a_restart_the_reply_time_gate_judges_against_the_stable_version_connected_later():
    routes = {**ROUTES, "todos-deployment": {"deploys": "todos@2.0.0", "rollout": {
        "steps": [10, 100], "interval": 600, "gates": {"minSamples": 5, "maxReplyTimeRatio": 1.5}}}}
    h = Harness(routes, records=records_of_a_ramp_at_step_0())
    h.tick(1)  # the first judgement comes before any version is connected again
    web, old, new = h.connect("web"), h.connect("todos", OLD), h.connect("todos", NEW)
    for i in range(400):
        h.send(web, "todos.list", activity=f"a-{i}")
    reply_all(h, old, h.take(old), after=0.001)
    reply_all(h, new, h.take(new), after=5.0)
    assert state(h, NEW) == "failed"
    [aborted] = [log for log in h.logs if log.event == "rollout aborted"]
    assert aborted.fields["gate"] == "replyTimeRatio"


def test_a_version_registered_with_build_metadata_is_judged_like_the_version_it_deploys():
    h = Harness(ROUTES)
    web, old, new, script = h.connect("web"), h.connect("todos", OLD), h.connect("todos", "2.0.0+build7"), \
        h.connect("todos-deployment")
    answer(h, script, "offline")
    assert state(h, "2.0.0+build7") == "ramping"
    for i in range(400):
        h.send(web, "todos.list", activity=f"a-{i}")
    reply_all(h, new, h.take(new), "todos.failed")
    assert state(h, "2.0.0+build7") == "failed"


def test_queued_frames_with_any_activity_id_are_rerouted_but_never_to_a_failed_version():
    h, web, old, new, _ = ramping()
    sibling = h.connect("todos", NEW)
    h.send(web, "todos.list", activityId=[1], version="2")  # not a string: forwarded as it is
    [frame] = h.take(new) + h.take(sibling)
    h.disconnect(new, [orjson_frame(frame)])  # raised TypeError before
    assert "queued frames re-routed" in h.events("info")
    h.take(sibling)
    h.run(h.broker.rollout("todos", NEW, "abort", h.now))
    h.send(web, "todos.list", version="2")
    assert h.take(sibling) == []  # nothing for a failed version
    h.disconnect(sibling, [orjson_frame(frame)])
    assert [log.fields["lost"] for log in h.logs if log.event == "queued frames lost"] == [1]


def orjson_frame(message: dict) -> bytes:
    import orjson
    return orjson.dumps(message)


def test_a_retried_online_step_starts_the_ramp_again_from_its_first_step():
    h, web, old, new, script = ramping()
    for i in range(200):
        h.send(web, "todos.list", activity=f"a-{i}")
    reply_all(h, new, h.take(new))
    h.tick(61)
    assert deployment(h)["share"] == 50
    answer(h, script, "online", "failed", {"reason": "boom"})
    assert state(h, NEW) == "failed"
    h.run(h.broker.retry("todos", NEW, h.now))
    assert state(h, NEW) == "ramping" and deployment(h)["share"] == 10
    assert deployment(h)["rollout"]["figures"]["replies"] == 0


def test_the_rollback_of_a_version_without_a_deployment_is_undone_by_retry():
    h = Harness(ROUTES)
    h.connect("todos", "0.9.0"), h.connect("todos", OLD)
    h.run(h.broker.rollback("todos", OLD, h.now))
    assert state(h, OLD) == "failed"
    h.run(h.broker.retry("todos", OLD, h.now))
    assert state(h, OLD) == "live" and "rollback undone" in h.events("info")
    again = Harness(ROUTES, records=h.ledger)
    again.connect("todos", OLD)
    assert state(again, OLD) == "live"


def test_while_no_stable_version_is_connected_the_ramping_version_takes_new_activities():
    h, web, old, new, _ = ramping()
    h.disconnect(old)
    for i in range(20):
        h.send(web, "todos.list", activity=f"a-{i}")
    assert len(h.take(new)) == 20 and state(h, NEW) == "ramping"
