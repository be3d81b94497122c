"""The broker core without sockets: routing, versions, refusals, deployments."""

import json

from core import Harness

from exocom.core.actions import (CLOSE_ALREADY_REGISTERED, CLOSE_BAD_REGISTRATION, CLOSE_BAD_VERSION,
                            CLOSE_NOT_REGISTERED, CLOSE_UNKNOWN_ROLE)
from exocom.core.budget import WARNING_BURST, WARNING_WINDOW

ROUTES = {
    "web": {"sends": ["users create", "ping"], "receives": ["users created", "pong"]},
    "users": {"receives": ["mongo create", "ping"], "sends": ["mongo created", "pong"],
              "translations": [{"public": "users create", "internal": "mongo create"},
                               {"public": "users created", "internal": "mongo created"}]},
    "audit": {"receives": ["users create"]},
}


def test_one_instance_of_every_receiving_role_under_its_internal_name():
    h = Harness(ROUTES)
    web = h.connect("web")
    users = [h.connect("users") for _ in range(3)]
    audit = h.connect("audit")
    for _ in range(6):
        h.send(web, "users create", {"n": 1})
    counts = [len(h.take(u)) for u in users]
    assert counts == [2, 2, 2]
    assert h.names(audit) == ["users create"] * 6


def test_delivered_frame_fields():
    h = Harness(ROUTES)
    web, users = h.connect("web"), h.connect("users")
    sent = h.send(web, "users create", {"x": 1}, activity="act", auth={"token": "t"}, isSecurity=False)
    [got] = h.take(users)
    assert got["name"] == "mongo create" and got["sender"] == ""
    assert (got["id"], got["activityId"], got["payload"]) == (sent["id"], "act", {"x": 1})
    assert got["auth"] == {"token": "t"} and got["isSecurity"] is False
    assert "responseTime" not in got and got["timestamp"].endswith("Z")
    h.now += 0.25
    h.send(users, "mongo created", None, activity="act")
    [reply] = h.take(web)
    assert reply["name"] == "users created"
    assert reply["responseTime"] == 250_000_000


def test_a_message_without_id_is_delivered_with_one():
    # The old JavaScript Exorelay ends its process on an incoming message without `id`.
    h = Harness(ROUTES)
    web, users = h.connect("web"), h.connect("users")
    h.frame(web, {"name": "ping", "activityId": "a1"})
    [got] = h.take(users)
    assert isinstance(got["id"], str) and got["id"] and got["activityId"] == "a1"


def test_affinity_reply_goes_to_asker_and_fails_over():
    h = Harness(ROUTES)
    webs = [h.connect("web") for _ in range(3)]
    users = [h.connect("users") for _ in range(2)]
    h.send(webs[1], "ping", activity="A")
    [target] = [u for u in users if h.take(u)]
    h.send(target, "pong", activity="A")
    assert [len(h.take(w)) for w in webs] == [0, 1, 0]
    # the same users instance keeps the activity
    for _ in range(3):
        h.send(webs[1], "ping", activity="A")
    assert len(h.take(target)) == 3
    other = next(u for u in users if u != target)
    h.disconnect(target)
    h.send(webs[1], "ping", activity="A")
    assert len(h.take(other)) == 1


def test_affinity_expires():
    h = Harness(ROUTES)
    web = h.connect("web")
    users = [h.connect("users") for _ in range(2)]
    h.send(web, "ping", activity="A")
    [first] = [u for u in users if h.take(u)]
    h.tick(61)
    h.send(web, "ping", activity="A")  # within two periods: still remembered
    assert len(h.take(first)) == 1
    h.tick(61)
    h.tick(61)
    # forgotten: round robin moves on to the other instance, which is then remembered
    [other] = [u for u in users if u != first]
    for _ in range(3):
        h.send(web, "ping", activity="A")
    assert (len(h.take(first)), len(h.take(other))) == (0, 3)


def test_refusals_keep_connection_and_others_working():
    h = Harness(ROUTES)
    web, users = h.connect("web"), h.connect("users")
    h.frame(web, "not json")
    h.frame(web, "[1, 2]")
    h.frame(web, {"id": "no name"})
    h.frame(web, {"name": "ping", "sender": "users"})  # spoofed
    h.frame(web, {"name": "pong", "sender": "web"})  # not in sends
    assert h.take(users) == [] and h.closed == {}
    refusals = [log.fields["reason"] for log in h.logs if log.event == "message refused"]
    assert len(refusals) == 5
    assert "not valid JSON" in refusals[0] and "not a JSON object" in refusals[1]
    assert "'name'" in refusals[2] and "sender 'users'" in refusals[3] and "not allowed" in refusals[4]
    h.send(web, "ping")
    assert len(h.take(users)) == 1


def test_a_flood_of_bad_frames_logs_a_burst_of_warnings_then_one_summary_per_window():
    h = Harness(ROUTES)
    web, users = h.connect("web"), h.connect("users")
    for _ in range(WARNING_BURST + 15):
        h.frame(web, "not json")
    h.frame(users, "not json either")  # another connection has a budget of its own
    refused = [log for log in h.logs if log.event == "message refused"]
    assert [log.fields["role"] for log in refused] == ["web"] * WARNING_BURST + ["users"]
    assert h.broker.stats.refused["not_json"] == WARNING_BURST + 16  # the metric counts every one
    assert "warnings suppressed" not in h.events()
    h.tick(WARNING_WINDOW / 2)
    assert "warnings suppressed" not in h.events()
    h.tick(WARNING_WINDOW / 2)
    [summary] = [log for log in h.logs if log.event == "warnings suppressed"]
    assert summary.level == "warning" and summary.fields["role"] == "web"
    assert summary.fields["suppressed"] == 15 and summary.fields["by_event"] == {"message refused": 15}
    # A new window logs again; what is held back when the client leaves is summed up then.
    # Messages nobody receives count against the same budget.
    h.logs.clear()
    h.disconnect(users)
    for _ in range(WARNING_BURST):
        h.frame(web, "not json")
    h.send(web, "ping")
    h.send(web, "ping")
    assert h.events().count("message refused") == WARNING_BURST and "message undeliverable" not in h.events()
    assert h.broker.stats.undeliverable["ping"] == 2
    h.disconnect(web)
    [summary] = [log for log in h.logs if log.event == "warnings suppressed"]
    assert summary.fields["by_event"] == {"message undeliverable": 2}
    h.tick(WARNING_WINDOW)
    assert h.events().count("warnings suppressed") == 1


def test_a_connection_above_its_message_rate_is_refused_and_others_are_not():
    h = Harness(ROUTES, max_messages_per_second=5)
    web, users = h.connect("web"), h.connect("users")
    other = h.connect("web")
    for _ in range(8):  # within one instant: a burst of 5, then refused
        h.send(web, "ping")
    assert len(h.take(users)) == 5
    assert h.broker.stats.refused["rate_limited"] == 3
    [refused, *_] = [log for log in h.logs if log.event == "message refused"]
    assert refused.fields["code"] == "rate_limited" and "--max-messages-per-second" in refused.fields["reason"]
    h.send(other, "ping")  # every connection has a bucket of its own
    assert len(h.take(users)) == 1
    h.now += 0.5  # refills 2.5 messages
    for _ in range(3):
        h.send(web, "ping")
    assert len(h.take(users)) == 2
    h.now += 60  # never more than one second's worth
    for _ in range(8):
        h.send(web, "ping")
    assert len(h.take(users)) == 5


def nested(depth: int) -> str:
    """JSON text of lists nested `depth` deep (json.dumps itself would recurse too deep)."""
    return "[" * depth + "]" * depth


def test_hostile_values_are_refused_not_raised():
    h = Harness({**ROUTES, "security": {}, "users-2-deployment": {"deploys": "users@2.0.0"}})
    web, users, security = h.connect("web"), h.connect("users"), h.connect("security")
    h.frame(web, '{"name": "ping", "payload": %s}' % nested(1000))  # deeper than orjson writes
    h.frame(web, '{"name": "ping", "sender": %s}' % nested(1000))
    h.frame(web, {"name": "x" * 1_000_000})
    h.frame(web, {"name": "ping", "version": "9" * 5000})
    h.frame(web, {"name": "ping", "activityId": [1, 2]})  # unhashable, with the security adapter on
    h.frame(security, {"name": "message authorized", "activityId": {"a": 1}})
    h.frame(security, {"name": "security request", "payload": {"name": "ping", "activityId": [1]}})
    codes = [log.fields["code"] for log in h.logs if log.event == "message refused"]
    # (with a security role, a version requirement is checked once the message is authorized)
    assert codes == ["not_forwardable", "spoofed_sender", "not_allowed", "unknown_authorization"]
    plain = Harness(ROUTES)
    plain_web = plain.connect("web")
    plain.frame(plain_web, {"name": "ping", "version": "9" * 5000})
    assert [log.fields["code"] for log in plain.logs if log.event == "message refused"] == ["bad_version_requirement"]
    assert all(len(log.fields["reason"]) < 300 for log in h.logs if log.event == "message refused")
    refused = h.connect()
    h.register(refused, "users", payload={"version": "1" * 5000 + ".0.0"})
    assert h.closed[refused][0] == CLOSE_BAD_VERSION
    # A deployment script's failure reason of any shape is recorded, shortened.
    v2, script = h.connect("users", "2.0.0"), h.connect("users-2-deployment")
    [start] = h.take(script)
    h.frame(script, '{"name": "deployment-users-2.0.0-offline-failed", "activityId": "%s", "payload": {"reason": %s}}'
            % (start["activityId"], nested(1000)))
    [failed] = [r for r in h.ledger if r["event"] == "failed"]
    assert "of type list" in failed["error"]


def test_a_connection_that_does_not_register_in_time_is_closed_with_4000():
    h = Harness(ROUTES)
    early = h.connect()
    h.tick(6)
    late, registered = h.connect(), h.connect("web")
    h.tick(4)
    assert h.closed == {early: (CLOSE_NOT_REGISTERED, "no registration within 10s of connecting")}
    [refused] = [log for log in h.logs if log.event == "registration refused"]
    assert refused.fields["conn"] == early and h.broker.stats.registrations_refused[CLOSE_NOT_REGISTERED] == 1
    h.tick(6)
    assert set(h.closed) == {early, late}  # a registered connection may idle as long as it likes
    h.disconnect(early)
    h.disconnect(late)
    assert not h.broker.pending


def test_registration_refusals():
    h = Harness(ROUTES)
    cases = {
        CLOSE_NOT_REGISTERED: {"name": "ping", "sender": "web"},
        CLOSE_BAD_REGISTRATION: {"name": "exocom.register-service"},
        CLOSE_UNKNOWN_ROLE: {"name": "exocom.register-service", "sender": "hacker"},
        CLOSE_BAD_VERSION: {"name": "exocom.register-service", "sender": "web", "payload": {"version": "banana"}},
    }
    for code, frame in cases.items():
        conn = h.connect()
        h.frame(conn, frame)
        assert h.closed[conn][0] == code, frame
    conn = h.connect()
    h.frame(conn, "garbage")
    assert h.closed[conn][0] == CLOSE_NOT_REGISTERED
    web = h.connect("web")
    h.register(web, "web")
    assert h.closed[web][0] == CLOSE_ALREADY_REGISTERED
    assert h.events("warning").count("registration refused") == 5


def test_old_client_registration_is_version_zero():
    h = Harness(ROUTES)
    h.connect("web", payload={"clientName": "web"})
    [client] = h.broker.config_json()["clients"]
    assert client["versions"] == [{"version": "0.0.0", "state": "live", "instances": 1, "share": 100.0}]


def test_no_receivers_is_logged():
    h = Harness({"web": {"sends": ["lonely"]}})
    web = h.connect("web")
    h.send(web, "lonely")
    assert "message undeliverable" in h.events("warning")


VERSIONED = {
    "web": {"sends": ["todos.list"], "receives": ["todos.listing"]},
    "todos": {"receives": ["todos.list"], "sends": ["todos.listing"],
              "versions": {"2": {"receives": ["todos.list", "todos.search"]}}},
    "todos-v2-deployment": {"deploys": "todos@2.0.0", "sends": ["todos.list"], "receives": ["todos.listing"]},
}


def test_newest_live_version_and_pinning():
    h = Harness({k: v for k, v in VERSIONED.items() if k != "todos-v2-deployment"})
    web = h.connect("web")
    v1, v2, v11 = h.connect("todos", "1.0.0"), h.connect("todos", "2.0.0"), h.connect("todos", "1.1.0")
    h.send(web, "todos.list")
    assert (len(h.take(v1)), len(h.take(v11)), len(h.take(v2))) == (0, 0, 1)
    h.send(web, "todos.list", version="1")
    assert (len(h.take(v1)), len(h.take(v11))) == (0, 1)
    h.send(web, "todos.list", version="1.0.0")
    assert len(h.take(v1)) == 1
    h.send(web, "todos.list", version="3")
    assert not any(h.take(c) for c in (v1, v2, v11))
    assert any("satisfies version '3'" in str(log.fields) for log in h.logs if log.event == "message undeliverable")


def test_a_role_that_misses_a_message_others_got_is_logged_at_info_with_why():
    h = Harness({**VERSIONED, "audit": {"receives": ["todos.list"]}})
    web, audit, v1 = h.connect("web"), h.connect("audit", "2.0.0"), h.connect("todos", "1.0.0")
    h.send(web, "todos.list", version="2")
    assert len(h.take(audit)) == 1 and h.take(v1) == []
    [missed] = [log for log in h.logs if log.event == "message undeliverable"]
    assert missed.level == "info"  # shown at the default level: some roles got it, todos did not
    assert "satisfies version '2'" in missed.fields["missed"]["todos"]


def test_response_to_answers_only_the_asker():
    h = Harness({"a": {"sends": ["q"], "receives": ["r"]}, "b": {"sends": ["q"], "receives": ["r"]},
                 "server": {"receives": ["q"], "sends": ["r"]}})
    a, b, server = h.connect("a"), h.connect("b"), h.connect("server")
    question = h.send(a, "q")
    h.take(server)
    h.send(server, "r", activity=question["activityId"], responseTo=question["id"])
    assert len(h.take(a)) == 1 and h.take(b) == []
    h.send(server, "r")  # without responseTo: like the old broker, every receiving role
    assert len(h.take(a)) == 1 and len(h.take(b)) == 1


def test_deployment_handshake_holds_then_goes_live():
    h = Harness(VERSIONED)
    web, v1 = h.connect("web"), h.connect("todos", "1.0.0")
    v2 = h.connect("todos", "2.0.0")
    assert h.broker.registry.pool("todos", v2_version()).state == "held"
    h.send(web, "todos.list")
    assert (len(h.take(v1)), len(h.take(v2))) == (1, 0)
    script = h.connect("todos-v2-deployment", "1.0.0")
    [start] = h.take(script)
    assert start["name"] == "deployment-todos-2.0.0-offline-start"
    # the script reaches the held version; production traffic still does not
    h.send(script, "todos.list", activity="migration")
    assert len(h.take(v2)) == 1
    h.send(web, "todos.list")
    assert (len(h.take(v1)), len(h.take(v2))) == (1, 0)
    h.send(script, "deployment-todos-2.0.0-offline-done", activity=start["activityId"])
    [online] = h.take(script)
    assert online["name"] == "deployment-todos-2.0.0-online-start"
    h.send(web, "todos.list")
    assert (len(h.take(v1)), len(h.take(v2))) == (0, 1)
    h.send(web, "todos.list", version="1")
    assert len(h.take(v1)) == 1
    h.send(script, "deployment-todos-2.0.0-online-done", activity=online["activityId"])
    assert h.broker.deployments_json()[0]["finished"] is True
    assert [r["event"] for r in h.ledger] == ["started", "done", "started", "done"]
    assert h.take(web) == []  # the answers are consumed, not routed


def test_a_version_with_build_metadata_is_held_like_the_version_it_deploys():
    h = Harness(VERSIONED)
    web, v1 = h.connect("web"), h.connect("todos", "1.0.0")
    build = h.connect("todos", "2.0.0+build.7")
    plain = h.connect("todos", "2.0.0")
    assert h.broker.registry.pool("todos", v2_version()).state == "held"
    for _ in range(4):
        h.send(web, "todos.list")
    assert (len(h.take(v1)), len(h.take(build)), len(h.take(plain))) == (4, 0, 0)


def test_the_security_adapter_never_asks_a_held_security_version():
    h = Harness({
        "web": {"sends": ["ping"]},
        "users": {"receives": ["ping"]},
        "security": {},  # as under Exocom 0.27: the adapter's messages need not be listed
        "security-deployment": {"deploys": "security@2.0.0"},
    })
    web, users = h.connect("web"), h.connect("users")
    held = h.connect("security", "2.0.0")
    h.send(web, "ping")
    assert h.take(held) == [] and h.take(users) == []
    assert "message undeliverable" in h.events("warning")
    live = h.connect("security", "1.0.0")
    for _ in range(3):
        h.send(web, "ping")
    assert h.names(live) == ["authorize message"] * 3 and h.take(held) == []


def v2_version():
    from exocom.core.versions import Version
    return Version("2.0.0")


def test_nothing_is_live_before_the_done_record_is_written():
    h = Harness(VERSIONED, auto_write=False)
    web, v1, v2, script = (h.connect("web"), h.connect("todos", "1.0.0"), h.connect("todos", "2.0.0"),
                           h.connect("todos-v2-deployment"))
    h.write_one()  # offline started
    [start] = h.take(script)
    h.send(script, "deployment-todos-2.0.0-offline-done", activity=start["activityId"])
    assert h.unwritten and h.unwritten[0]["event"] == "done"
    h.send(web, "todos.list")
    assert (len(h.take(v1)), len(h.take(v2))) == (1, 0)
    h.write_one()
    h.send(web, "todos.list")
    assert (len(h.take(v1)), len(h.take(v2))) == (0, 1)


def test_failure_takes_version_out_and_retry_rearms():
    h = Harness(VERSIONED)
    web, v1, v2, script = (h.connect("web"), h.connect("todos", "1.0.0"), h.connect("todos", "2.0.0"),
                           h.connect("todos-v2-deployment"))
    [start] = h.take(script)
    h.send(script, "deployment-todos-2.0.0-offline-done", activity=start["activityId"])
    [online] = h.take(script)
    h.send(web, "todos.list")
    assert len(h.take(v2)) == 1
    h.send(script, "deployment-todos-2.0.0-online-failed", {"reason": "index corrupt"}, activity=online["activityId"])
    assert h.broker.registry.pool("todos", v2_version()).state == "failed"
    h.send(web, "todos.list")
    assert (len(h.take(v1)), len(h.take(v2))) == (1, 0)
    [d] = h.broker.deployments_json()
    assert d["state"] == "failed" and d["steps"][1]["lastError"] == "index corrupt"
    h.run(h.broker.retry("todos", "2.0.0", h.now))
    [again] = h.take(script)
    assert again["name"] == "deployment-todos-2.0.0-online-start" and again["payload"] == {"attempt": 2}
    # offline stays done: never started again
    assert [r["step"] for r in h.ledger if r["event"] == "started"] == ["offline", "online", "online"]


def test_step_time_limit():
    h = Harness(VERSIONED, step_timeout=30)
    h.connect("todos", "2.0.0")
    script = h.connect("todos-v2-deployment")
    [start] = h.take(script)
    h.tick(29)
    assert h.broker.deployments_json()[0]["state"] == "held"
    h.tick(2)
    [d] = h.broker.deployments_json()
    assert d["state"] == "failed" and "time limit of 30s" in d["steps"][0]["lastError"]
    h.send(script, "deployment-todos-2.0.0-offline-done", activity=start["activityId"])
    assert h.broker.deployments_json()[0]["state"] == "failed"
    assert "deployment answer ignored" in h.events("warning")


def test_script_disconnect_mid_step_gets_the_step_again():
    h = Harness(VERSIONED)
    h.connect("todos", "2.0.0")
    script = h.connect("todos-v2-deployment")
    [start] = h.take(script)
    h.disconnect(script)
    script2 = h.connect("todos-v2-deployment")
    [again] = h.take(script2)
    assert again["name"] == start["name"] and again["activityId"] != start["activityId"]
    assert again["payload"] == {"attempt": 2}


def test_restart_from_ledger_neither_repeats_nor_loses_steps():
    h = Harness(VERSIONED)
    h.connect("todos", "2.0.0")
    script = h.connect("todos-v2-deployment")
    [start] = h.take(script)
    h.send(script, "deployment-todos-2.0.0-offline-done", activity=start["activityId"])
    # broker restarts: online was started but never answered
    h2 = Harness(VERSIONED, records=h.ledger)
    v2 = h2.connect("todos", "2.0.0")
    web = h2.connect("web")
    h2.send(web, "todos.list")
    assert len(h2.take(v2)) == 1  # live as soon as it registers
    script = h2.connect("todos-v2-deployment")
    [again] = h2.take(script)
    assert again["name"] == "deployment-todos-2.0.0-online-start"


def test_only_the_script_may_answer():
    h = Harness(VERSIONED)
    h.connect("todos", "2.0.0")
    web = h.connect("web")
    script = h.connect("todos-v2-deployment")
    [start] = h.take(script)
    h.send(web, "deployment-todos-2.0.0-offline-done", activity=start["activityId"])
    assert h.broker.deployments_json()[0]["state"] == "held"


def test_config_json_shows_the_security_roles_implicit_routes():
    # Exocom 0.27 showed what the adapter lets `security` receive and send;
    # before the fix /config.json had empty lists for it.
    h = Harness({**ROUTES, "security": {"receives": ["session data"]}})
    routes = h.broker.config_json()["routes"]
    assert routes["security"]["receives"] == ["session data", "authorize message", "security response"]
    assert sorted(routes["security"]["sends"]) == ["message authorized", "message unauthorized", "security request"]
    assert routes["web"] == Harness(ROUTES).broker.config_json()["routes"]["web"]  # others untouched


# ------------------------------------------------ a stuck instance (item 11)


def test_a_congested_instance_is_passed_over_while_another_of_its_version_has_room():
    h = Harness(ROUTES)
    web, first, second = h.connect("web"), h.connect("users", "1.0.0"), h.connect("users", "1.0.0")
    h.run(h.broker.outbox_congested(first, True))
    assert "instance congested" in h.events("warning")
    for _ in range(6):
        h.send(web, "ping")
    assert len(h.take(first)) == 0 and len(h.take(second)) == 6
    h.run(h.broker.outbox_congested(second, True))  # all congested: round robin as before
    for _ in range(4):
        h.send(web, "ping")
    assert len(h.take(first)) == 2 and len(h.take(second)) == 2
    h.run(h.broker.outbox_congested(first, False))
    assert "instance drained" in h.events("info")
    for _ in range(3):
        h.send(web, "ping")
    assert len(h.take(first)) == 3 and not h.take(second)


def test_frames_queued_for_an_instance_that_is_gone_go_to_another_of_its_version():
    h = Harness(ROUTES)
    web, a, b, newer = h.connect("web"), h.connect("users", "1.0.0"), h.connect("users", "1.0.0"), h.connect("users", "2.0.0")
    for n in range(3):
        h.send(web, "ping", {"n": n})
    queued = [json.dumps(m).encode() for m in h.inbox.pop(newer)]
    assert len(queued) == 3
    h.disconnect(newer, queued)
    # 2.0.0 had no other instance: nothing may go to 1.0.0 (the frames may have been pinned to "2")
    assert not h.take(a) and not h.take(b)
    assert h.broker.stats.outbox_dropped_frames == 3
    lost = [log for log in h.logs if log.event == "queued frames lost"]
    assert lost and lost[0].fields["lost"] == 3 and lost[0].fields["rerouted"] == 0

    for n in range(3):
        h.send(web, "ping", {"n": n}, activity="shared")
    got_them, other = (a, b) if a in h.inbox else (b, a)
    frames = [json.dumps(m).encode() for m in h.inbox.pop(got_them)]  # affinity: all went to one instance
    assert len(frames) == 3
    h.disconnect(got_them, frames)
    assert [m["payload"] for m in h.take(other)] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert h.broker.stats.frames_rerouted == 3
    assert "queued frames re-routed" in h.events("info")
    # the activity now follows the instance that took its frames
    h.send(web, "ping", activity="shared")
    assert len(h.take(other)) == 1


def test_the_brokers_own_messages_queued_for_a_gone_script_are_not_resent():
    h = Harness({**ROUTES, "users-2-deployment": {"deploys": "users@2.0.0"}})
    first, second = h.connect("users-2-deployment"), h.connect("users-2-deployment")
    h.connect("users", "2.0.0")
    started = first if first in h.inbox else second
    starts = h.take(started)
    assert [m["name"] for m in starts] == ["deployment-users-2.0.0-offline-start"]
    h.disconnect(started, [json.dumps(m).encode() for m in starts])
    # the deployer starts the step again itself: exactly one start, as a new attempt
    again = h.take(first) + h.take(second)
    assert [(m["name"], m["payload"]["attempt"]) for m in again] == [("deployment-users-2.0.0-offline-start", 2)]
