"""Wire compatibility with Exocom 0.27, end to end.

Every scenario of the Go broker's feature files (broadcasting-messages,
translating-messages, multiple-instances, register-service, security-adapter)
plus the behaviour recorded in the reference page exocom-0.27.md (`/config.json`, other HTTP
paths, the fields of a delivered frame), run against a real broker on
127.0.0.1 with real WebSocket clients and real HTTP requests.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timezone

import pytest
import trio
from structlog.testing import capture_logs

import auth_mode
from raw_ws import RawClient
from wire import new_id, running_broker

# --------------------------------------------------------------------- helpers


def _http(url: str, method: str) -> tuple[int, dict, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


async def http(port: int, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    """A real HTTP request to the broker (urllib, in a worker thread)."""
    return await trio.to_thread.run_sync(_http, f"http://127.0.0.1:{port}{path}", method)


async def config_json(port: int) -> dict:
    status, headers, body = await http(port, "/config.json")
    assert status == 200, body
    assert headers.get("content-type", headers.get("Content-Type")) == "application/json"
    return json.loads(body)


async def wait_config(port: int, condition, timeout: float = 5.0) -> dict:
    """Poll `GET /config.json` until `condition(config)` holds."""
    with trio.fail_after(timeout):
        while True:
            config = await config_json(port)
            if condition(config):
                return config
            await trio.sleep(0.01)


def instance_count(rb, role: str) -> int:
    return next((c["instances"] for c in rb.broker.config_json()["clients"] if c["role"] == role), 0)


async def wait_instances(rb, role: str, n: int) -> None:
    with trio.fail_after(5):
        while instance_count(rb, role) != n:
            await trio.sleep(0.005)


@asynccontextmanager
async def instances(rb, role: str, n: int):
    """`n` registered instances of `role`, each one known to the broker before the next connects."""
    async with AsyncExitStack() as stack:
        out = []
        for i in range(n):
            out.append(await stack.enter_async_context(rb.service(role, register=False)))
            await out[-1].register()
            await wait_instances(rb, role, i + 1)
        yield out


async def disconnect(rb, service, remaining: int) -> None:
    await service.ws.aclose()
    await wait_instances(rb, service.role, remaining)


async def receive_any(services, timeout: float = 5.0):
    """The first message any of `services` gets: (service, message)."""
    result = []
    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            async def one(service):
                message = await service.ws.get_message()  # cancel-safe: a channel receive
                result.append((service, json.loads(message)))
                nursery.cancel_scope.cancel()

            for s in services:
                nursery.start_soon(one, s)
    assert len(result) == 1, result
    return result[0]


def events(logs, name):
    return [entry for entry in logs if entry["event"] == name]


# ---------------------------------------------------------------- broadcasting

BROADCAST = {
    "web": {"receives": ["users.created"], "sends": ["users.create", "users.list", "delete user"]},
    "users": {"receives": ["mongo.create", "delete user"], "sends": ["mongo.created"],
              "translations": [{"public": "users.create", "internal": "mongo.create"},
                               {"public": "users.created", "internal": "mongo.created"}]},
    "log": {"receives": ["users.create"]},
}


async def test_broadcast_goes_to_one_instance_of_every_receiving_role():
    async with running_broker(BROADCAST) as rb:
        async with rb.service("web") as web, rb.service("users") as users, rb.service("log") as log:
            sent = await web.send("users.create", {"name": "Jean"})
            to_users = await users.receive()
            to_log = await log.receive()
            # each receiving role gets it under the name it knows it by
            assert to_users["name"] == "mongo.create"
            assert to_log["name"] == "users.create"
            for got in (to_users, to_log):
                assert got["id"] == sent["id"] and got["activityId"] == sent["activityId"]
                assert got["payload"] == {"name": "Jean"}
            await web.receive_nothing(0.1)  # the sender does not get its own message


async def test_broadcast_a_reply():
    async with running_broker(BROADCAST) as rb:
        async with rb.service("web") as web, rb.service("users") as users, rb.service("log") as log:
            command = await web.send("users.create", {"name": "Jean"})
            await users.receive()
            await log.receive()
            await users.send("mongo.created", {"id": 1}, activityId=command["activityId"])
            reply = await web.receive()
            assert reply["name"] == "users.created"
            assert reply["activityId"] == command["activityId"]
            assert reply["payload"] == {"id": 1}
            await log.receive_nothing(0.1)


async def test_broadcast_a_message_name_with_whitespace():
    async with running_broker(BROADCAST) as rb:
        async with rb.service("web") as web, rb.service("users") as users, rb.service("log") as log:
            await web.send("delete user", {"id": 7})
            got = await users.receive()
            assert got["name"] == "delete user" and got["payload"] == {"id": 7}
            await log.receive_nothing(0.1)


@pytest.mark.parametrize("sender", ["web", "log"])
async def test_a_sender_not_allowed_to_send_a_name_is_refused(sender):
    # admin receives users.get-SSN, but neither web nor log lists it in its sends
    async with running_broker({**BROADCAST, "admin": {"receives": ["users.get-SSN"]}}) as rb:
        async with rb.service("web") as web, rb.service("users") as users, rb.service("log") as log, \
                rb.service("admin") as admin:
            offender = {"web": web, "log": log}[sender]
            with capture_logs() as logs:
                await offender.send("users.get-SSN", {"ssn": "secret"})
                if sender == "log":
                    # users receives users.create, but log (no sends at all) may not send it
                    await offender.send("users.create", {"name": "x"})
                with trio.fail_after(5):
                    while len(events(logs, "message refused")) < (2 if sender == "log" else 1):
                        await trio.sleep(0.005)
            for receiver in (web, users, log, admin):
                await receiver.receive_nothing(0.1)
            refusal = events(logs, "message refused")[0]
            assert refusal["log_level"] == "warning"
            assert refusal["role"] == sender and refusal["name"] == "users.get-SSN"
            assert "not allowed to send" in refusal["reason"]
            # the sender's connection is still usable
            if sender == "web":
                await web.send("delete user", {"id": 1})
                assert (await users.receive())["name"] == "delete user"


async def test_a_message_with_no_receivers_is_dropped():
    async with running_broker(BROADCAST) as rb:
        async with rb.service("web") as web, rb.service("users") as users, rb.service("log") as log:
            with capture_logs() as logs:
                await web.send("users.list")
                with trio.fail_after(5):
                    while not events(logs, "message undeliverable"):
                        await trio.sleep(0.005)
            warning = events(logs, "message undeliverable")[0]
            assert warning["log_level"] == "warning" and warning["name"] == "users.list"
            for receiver in (web, users, log):
                await receiver.receive_nothing(0.1)


async def test_a_receiving_role_with_no_instance_connected_is_skipped():
    async with running_broker(BROADCAST) as rb:
        async with rb.service("web") as web, rb.service("users") as users:  # no "log" instance
            with capture_logs() as logs:
                await web.send("users.create", {"name": "Jean"})
                assert (await users.receive())["name"] == "mongo.create"
            assert not [e for e in events(logs, "message undeliverable") if e["log_level"] == "warning"]


# ----------------------------------------------------------------- translation

TWEETS = {
    "web": {"receives": ["tweets.created"], "sends": ["tweets.create"]},
    "tweets": {"receives": ["text-snippets.create"], "sends": ["text-snippets.created"],
               "translations": [{"public": "tweets.create", "internal": "text-snippets.create"},
                                {"public": "tweets.created", "internal": "text-snippets.created"}]},
}


async def test_translating_a_message_and_its_reply():
    async with running_broker(TWEETS) as rb:
        async with rb.service("web") as web, rb.service("tweets") as tweets:
            with capture_logs() as logs:
                command = await web.send("tweets.create", {"text": "hello"})
                got = await tweets.receive()
                assert got["name"] == "text-snippets.create"
                assert got["payload"] == {"text": "hello"}
                await tweets.send("text-snippets.created", {"id": 3}, activityId=command["activityId"])
                reply = await web.receive()
            assert reply["name"] == "tweets.created" and reply["payload"] == {"id": 3}
            deliveries = [(e["sender"], e["sender_name"], e["name"], e["internal_name"], e["receiver"])
                          for e in events(logs, "message delivered")]
            assert deliveries == [
                ("web", "tweets.create", "tweets.create", "text-snippets.create", "tweets"),
                ("tweets", "text-snippets.created", "tweets.created", "tweets.created", "web"),
            ]


async def test_a_translating_role_may_not_send_the_public_name_it_does_not_list():
    async with running_broker(TWEETS) as rb:
        async with rb.service("web") as web, rb.service("tweets") as tweets:
            await tweets.send("tweets.created", {"id": 3})  # its sends list the internal name only
            await web.receive_nothing(0.2)


# ---------------------------------------------------------- multiple instances

MULTI = {
    "web": {"receives": ["user created"], "sends": ["create user"]},
    "users": {"receives": ["create user"], "sends": ["user created"]},
    "audit": {"receives": ["create user"]},
}


@pytest.mark.parametrize("offline", [0, 1])
async def test_tolerates_instances_disconnecting(offline):
    async with running_broker(MULTI) as rb:
        async with instances(rb, "web", 2) as webs, rb.service("users") as users:
            await disconnect(rb, webs[offline], 1)
            online = webs[1 - offline]
            for _ in range(3):
                sent = await users.send("user created", {"n": 1})
                got = await online.receive()
                assert got["id"] == sent["id"]


@pytest.mark.parametrize("asker", [0, 1])
async def test_a_reply_goes_back_to_the_instance_that_asked(asker):
    async with running_broker(MULTI) as rb:
        async with instances(rb, "web", 2) as webs, rb.service("users") as users:
            for _ in range(3):  # whatever the round robin position, affinity wins
                command = await webs[asker].send("create user", {"name": "Jean"})
                assert (await users.receive())["id"] == command["id"]
                await users.send("user created", {"id": 1}, activityId=command["activityId"])
                who, got = await receive_any(webs)
                assert who is webs[asker]
                assert got["name"] == "user created" and got["activityId"] == command["activityId"]
            await webs[1 - asker].receive_nothing(0.1)


async def test_all_messages_of_an_activity_go_to_the_instance_chosen_first():
    async with running_broker(MULTI) as rb:
        async with instances(rb, "web", 2) as webs, rb.service("users") as users:
            activity = new_id()
            await users.send("user created", {"n": 1}, activityId=activity)
            first, _ = await receive_any(webs)
            await users.send("user created", {"n": 2}, activityId=activity)
            second, got = await receive_any(webs)
            assert second is first and got["payload"] == {"n": 2}
            for web in webs:
                await web.receive_nothing(0.1)


async def test_exactly_one_instance_per_receiving_role_and_load_spreads():
    async with running_broker(MULTI) as rb:
        async with instances(rb, "users", 2) as users, instances(rb, "audit", 2) as audits, rb.service("web") as web:
            per_instance = {id(s): 0 for s in [*users, *audits]}
            for _ in range(10):
                sent = await web.send("create user", {"name": "x"})  # a fresh activity each time
                for pool in (users, audits):
                    who, got = await receive_any(pool)
                    assert got["id"] == sent["id"]
                    per_instance[id(who)] += 1
            for s in [*users, *audits]:
                await s.receive_nothing(0.05)  # nobody got a second copy
            assert sum(per_instance[id(s)] for s in users) == 10
            assert all(per_instance[id(s)] >= 1 for s in [*users, *audits]), per_instance


async def test_after_the_remembered_instance_disconnects_another_one_gets_the_activity():
    async with running_broker(MULTI) as rb:
        async with instances(rb, "web", 2) as webs, rb.service("users") as users:
            command = await webs[0].send("create user", {"name": "Jean"})
            await users.receive()
            await disconnect(rb, webs[0], 1)
            await users.send("user created", {"id": 1}, activityId=command["activityId"])
            got = await webs[1].receive()
            assert got["activityId"] == command["activityId"]


async def test_after_failover_the_activity_sticks_to_the_new_instance():
    async with running_broker(MULTI) as rb:
        async with instances(rb, "web", 3) as webs, rb.service("users") as users:
            command = await webs[0].send("create user", {"name": "Jean"})
            await users.receive()
            await disconnect(rb, webs[0], 2)
            await users.send("user created", {"n": 1}, activityId=command["activityId"])
            first, _ = await receive_any(webs[1:])
            await users.send("user created", {"n": 2}, activityId=command["activityId"])
            second, _ = await receive_any(webs[1:])
            assert second is first


# --------------------------------------------------------- service registration

REGISTRATION = {
    "users": {},
    "tweets": {},
    "web": {"sends": ["hello"]},
}


async def test_the_old_exorelay_registration_works_and_is_version_0_0_0():
    async with running_broker({**REGISTRATION, "users": {"receives": ["hello"]}}) as rb:
        async with rb.service("users", register=False) as users, rb.service("web") as web:
            # exactly what the JavaScript Exorelay sends on open; it expects no answer
            await users.send_raw(json.dumps({"name": "exocom.register-service", "sender": "users", "id": new_id(),
                                             "activityId": new_id(), "payload": {"clientName": "users"}}))
            config = await wait_config(rb.port, lambda c: any(x["role"] == "users" for x in c["clients"]))
            client = next(c for c in config["clients"] if c["role"] == "users")
            assert client["instances"] == 1
            assert [v["version"] for v in client["versions"]] == ["0.0.0"]
            await users.receive_nothing(0.1)  # no acknowledgement, no unasked-for frame
            await web.send("hello", {"x": 1})
            assert (await users.receive())["name"] == "hello"


async def test_a_versioned_registration_shows_its_version():
    async with running_broker(REGISTRATION) as rb:
        async with rb.service("users", version="1.2.0"):
            config = await wait_config(rb.port, lambda c: any(x["role"] == "users" for x in c["clients"]))
            client = next(c for c in config["clients"] if c["role"] == "users")
            assert client["instances"] == 1
            assert [v["version"] for v in client["versions"]] == ["1.2.0"]


async def test_a_closed_connection_is_deregistered():
    async with running_broker(REGISTRATION) as rb:
        async with rb.service("users"):
            async with rb.service("tweets"):
                await wait_config(rb.port, lambda c: {x["role"] for x in c["clients"]} == {"users", "tweets"})
            config = await wait_config(rb.port, lambda c: {x["role"] for x in c["clients"]} == {"users"})
            assert set(config["routes"]) == {"users", "tweets", "web"}  # the routes stay
        await wait_config(rb.port, lambda c: c["clients"] == [])


async def test_a_dropped_tcp_connection_is_deregistered():
    async with running_broker(REGISTRATION) as rb:
        users = await RawClient.connect(rb.port)
        await users.send_json({"name": "exocom.register-service", "sender": "users", "id": new_id()})
        await wait_config(rb.port, lambda c: [x["role"] for x in c["clients"]] == ["users"])
        await users.aclose()  # no close handshake: the peer just vanishes
        await wait_config(rb.port, lambda c: c["clients"] == [])


# ------------------------------------------------------------------ HTTP paths

CONFIG = {
    "web": {"receives": ["users created"], "sends": ["users create"]},
    "users": {"receives": ["mongo create"], "sends": ["mongo created"],
              "translations": [{"public": "users create", "internal": "mongo create"},
                               {"public": "users created", "internal": "mongo created"}]},
    "tweets": {"receives": ["tweets create"]},
}


async def test_config_json_shape():
    async with running_broker(CONFIG) as rb:
        async with instances(rb, "users", 2), rb.service("web"):
            config = await config_json(rb.port)
            if auth_mode.ON:  # every role has a token then
                config["routes"] = {role: {k: v for k, v in entry.items() if k != "credential"}
                                    for role, entry in config["routes"].items()}
            assert set(config) == {"clients", "routes"}
            clients = sorted(config["clients"], key=lambda c: c["role"])
            assert [(c["role"], c["instances"]) for c in clients] == [("users", 2), ("web", 1)]  # no tweets
            assert config["routes"] == {
                "web": {"receives": ["users created"], "sends": ["users create"], "translations": []},
                "users": {"receives": ["mongo create"], "sends": ["mongo created"],
                          "translations": [{"public": "users create", "internal": "mongo create"},
                                           {"public": "users created", "internal": "mongo created"}]},
                "tweets": {"receives": ["tweets create"], "sends": [], "translations": []},
            }
            status, _, _ = await http(rb.port, "/config.json?cache=no")
            assert status == 200


@pytest.mark.parametrize("method, path", [
    ("GET", "/index.html"), ("GET", "/nothing-here"), ("GET", "/config"),
    ("GET", "/services"),  # without upgrade
    ("POST", "/config.json"),
])
async def test_other_paths_answer_400(method, path):
    async with running_broker(CONFIG) as rb:
        status, _, body = await http(rb.port, path, method)
        assert status == 400, body
        # and the broker still answers afterwards
        assert (await config_json(rb.port))["clients"] == []


# ------------------------------------------------------------ delivered frames


async def test_delivered_frame_fields():
    async with running_broker(CONFIG) as rb:
        async with rb.service("web") as web, rb.service("users") as users:
            before = datetime.now(timezone.utc)
            command = await web.send("users create", {"name": "Jean", "tags": [1, None, {"a": "é"}]},
                                     auth={"token": "t0k3n"}, isSecurity=False)
            got = await users.receive()
            after = datetime.now(timezone.utc)
            assert got["name"] == "mongo create"
            assert got["id"] == command["id"]
            assert got["activityId"] == command["activityId"]
            assert got["payload"] == {"name": "Jean", "tags": [1, None, {"a": "é"}]}
            assert got["auth"] == {"token": "t0k3n"}
            assert got["isSecurity"] is False
            assert got["sender"] == ""
            stamp = datetime.fromisoformat(got["timestamp"])
            assert stamp.tzinfo is not None and before.replace(microsecond=0) <= stamp <= after
            assert "responseTime" not in got  # the first message of its activity

            await trio.sleep(0.01)  # make the time between the two messages measurably large
            await users.send("mongo created", {"id": 1}, activityId=command["activityId"],
                             auth={"token": "t0k3n"}, isSecurity=True)
            reply = await web.receive()
            assert reply["auth"] == {"token": "t0k3n"} and reply["isSecurity"] is True
            # nanoseconds since the previous message of the activity, like a Go duration
            assert isinstance(reply["responseTime"], int)
            assert 10_000_000 <= reply["responseTime"] < 5_000_000_000

            other = await web.send("users create", None)  # another activity: no responseTime
            got = await users.receive()
            assert got["activityId"] == other["activityId"] and "responseTime" not in got
            assert got["payload"] is None


async def test_fields_the_sender_leaves_out_are_not_invented():
    async with running_broker(CONFIG) as rb:
        async with rb.service("web") as web, rb.service("users") as users:
            await web.send_raw(json.dumps({"name": "users create", "sender": "web", "id": "1", "activityId": "2"}))
            got = await users.receive()
            assert "auth" not in got and "isSecurity" not in got
            assert got["id"] == "1" and got["activityId"] == "2"


# ------------------------------------------------------------ security adapter

SECURITY_MESSAGES = {"receives": ["authorize message", "security response"],
                     "sends": ["message authorized", "message unauthorized", "security request"]}
SECURED = {
    "web": {"receives": ["user created", "message unauthorized"], "sends": ["create user"]},
    "users": {"receives": ["create user"], "sends": ["user created"]},
    "security": SECURITY_MESSAGES,
    "sessions": {"receives": ["create session", "get session"], "sends": ["session data"]},
}


@asynccontextmanager
async def secured(routes=SECURED):
    async with running_broker(routes) as rb:
        async with rb.service("web") as web, rb.service("users") as users, \
                rb.service("security") as security, rb.service("sessions") as sessions:
            yield web, users, security, sessions


def create_user_frame(**extra):
    frame = {"name": "create user", "payload": {"name": "John Smith"}, "id": new_id(), "auth": "222",
             "isSecurity": False, "activityId": new_id(), "sender": "web"}
    frame.update(extra)
    return frame


async def test_security_gets_every_message_to_authorize_first():
    async with secured() as (web, users, security, _):
        original = create_user_frame()
        await web.send_raw(json.dumps(original))
        ask = await security.receive()
        assert ask["name"] == "authorize message"
        assert ask["payload"] == original  # the whole original message
        assert ask["activityId"] != original["activityId"]
        uuid.UUID(ask["activityId"]), uuid.UUID(ask["id"])  # a fresh activity, a fresh id
        await users.receive_nothing(0.1)  # not routed before it is authorized


async def test_an_authorized_message_is_routed():
    async with secured() as (web, users, security, _):
        original = create_user_frame()
        await web.send_raw(json.dumps(original))
        ask = await security.receive()
        await security.send("message authorized", activityId=ask["activityId"])
        got = await users.receive()
        assert got["name"] == "create user"
        assert got["payload"] == {"name": "John Smith"}
        assert (got["id"], got["activityId"], got["auth"]) == (original["id"], original["activityId"], "222")
        await web.receive_nothing(0.1)


async def test_an_unauthorized_message_is_refused_to_its_sender():
    async with secured() as (web, users, security, _):
        original = create_user_frame()
        with capture_logs() as logs:
            await web.send_raw(json.dumps(original))
            ask = await security.receive()
            await security.send("message unauthorized", activityId=ask["activityId"])
            refused = await web.receive()
        assert refused["name"] == "message unauthorized"
        assert refused["payload"] == original
        assert refused["activityId"] == original["activityId"]
        assert isinstance(refused["id"], str) and refused["id"]
        await users.receive_nothing(0.1)
        warning = events(logs, "message unauthorized")
        assert warning and warning[0]["log_level"] == "warning" and warning[0]["name"] == "create user"


async def test_is_security_does_not_bypass_the_check():
    async with secured() as (web, users, security, _):
        await web.send_raw(json.dumps(create_user_frame(isSecurity=True)))
        ask = await security.receive()
        assert ask["name"] == "authorize message"
        await users.receive_nothing(0.2)


async def test_a_security_request_is_routed_and_answered_in_a_security_response():
    async with secured() as (web, users, security, sessions):
        request = {"name": "get session", "payload": {"id": "2"}, "id": new_id(), "activityId": new_id()}
        security_activity = new_id()
        await security.send("security request", request, activityId=security_activity)
        got = await sessions.receive()
        assert got["name"] == "get session" and got["payload"] == {"id": "2"}
        assert got["id"] == request["id"] and got["activityId"] == request["activityId"]

        answer = {"name": "session data", "payload": {"isAdmin": True}, "id": new_id(),
                  "activityId": request["activityId"], "isSecurity": True, "sender": "sessions"}
        await sessions.send_raw(json.dumps(answer))
        response = await security.receive()
        assert response["name"] == "security response"
        assert response["isSecurity"] is True
        assert response["activityId"] == security_activity
        assert response["payload"] == answer
        for other in (web, users):
            await other.receive_nothing(0.1)


async def test_a_security_request_is_delivered_marked_is_security():
    async with secured() as (_, _, security, sessions):
        request = {"name": "get session", "payload": {"id": "2"}, "id": new_id(), "activityId": new_id()}
        await security.send("security request", request)
        got = await sessions.receive()
        assert got["isSecurity"] is True


async def test_the_security_role_needs_no_sends_or_receives_of_its_own():
    async with secured({**SECURED, "security": {}}) as (web, users, security, _):
        await web.send_raw(json.dumps(create_user_frame()))
        ask = await security.receive()
        await security.send("message authorized", activityId=ask["activityId"])
        got = await users.receive(timeout=1)
        assert got["name"] == "create user"
