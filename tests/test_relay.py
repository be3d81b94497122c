"""The Python client `exocom.relay` against the real broker: in this process
(`running_broker`, real sockets) and, to restart it under the relays, as an
`exocom serve` subprocess on a fixed port."""

from __future__ import annotations

import contextlib
import json
import signal
import urllib.request
from contextlib import asynccontextmanager

import pytest
import trio
from trio_websocket import ConnectionClosed, serve_websocket

from exocom.relay import (DeploymentScript, Message, RegistrationRefused, RelayClosed, RelayError, RequestTimeout,
                          open_relay)
from fleet import failure_recorded, relay_events, wait_until
from processes import BrokerProcess
from wire import running_broker

ROUTES = {
    "web": {"sends": ["todos.create", "todos.list", "todos.search"],
            "receives": ["todos.created", "todos.listing", "todos.found", "todos.search-done"]},
    # Also receives the answer `todos.created`: `responseTo` must keep the answer from it.
    "audit": {"receives": ["todos.created"]},
    "todos": {"receives": ["todos.create", "todos.list", "todos.search"],
              "sends": ["todos.created", "todos.listing", "todos.found", "todos.search-done"]},
    "todos-deployment": {"deploys": "todos@2.0.0", "sends": ["todos.list"], "receives": ["todos.listing"]},
}
FAST = {"min_backoff": 0.01, "max_backoff": 0.1}


def http_get(port: int, path: str):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return json.loads(response.read())


async def deployments(port: int) -> dict:
    """GET /deployments, keyed by ROLE@VERSION."""
    body = await trio.to_thread.run_sync(http_get, port, "/deployments")
    return {f"{d['role']}@{d['version']}": d for d in body["deployments"]}


@asynccontextmanager
async def todos_service(url: str, version: str | None = None, got: list | None = None):
    """`todos`: answers todos.create and todos.list with its version; streams
    three todos.found and a todos.search-done for todos.search."""
    async with open_relay(url, "todos", version, **FAST) as relay:
        @relay.handler("todos.create")
        async def create(message: Message):
            if got is not None:
                got.append(message)
            await message.reply("todos.created", {"title": message.payload["title"], "version": version})

        @relay.handler("todos.list")
        async def listing(message: Message):
            if got is not None:
                got.append(message)
            await message.reply("todos.listing", {"version": version})

        @relay.handler("todos.search")
        async def search(message: Message):
            for i in range(3):
                await message.reply("todos.found", {"n": i})
            await message.reply("todos.search-done", {"count": 3})

        yield relay


# ------------------------------------------------------------- request / reply

async def test_request_gets_the_reply_with_response_to_and_only_the_asker_gets_it():
    async with running_broker(ROUTES) as broker:
        received, audited = [], []
        async with todos_service(broker.url, "1.0.0", received) as todos, open_relay(broker.url, "web") as web, \
                open_relay(broker.url, "audit") as audit:
            @audit.handler("todos.created")
            async def record(message):
                audited.append(message.payload)

            answer = await web.request("todos.create", {"title": "buy milk"}, timeout=5)
            assert answer.name == "todos.created"
            assert answer.payload == {"title": "buy milk", "version": "1.0.0"}
            [command] = received
            assert answer.raw["responseTo"] == command.id
            assert answer.activity_id == command.activity_id

            # A marker that `audit` must get (no responseTo: routed to every role
            # that receives the name), sent after the answer on the same
            # connection: once `audit` has the marker, it would also have had
            # the answer.
            await todos.send("todos.created", {"marker": True})
            await wait_until(lambda: audited, "the marker to reach audit")
            assert audited == [{"marker": True}]


async def test_a_reply_carries_the_auth_and_is_security_of_the_message_it_answers():
    async with running_broker(ROUTES) as broker:
        answers = []
        async with todos_service(broker.url, "1.0.0"), open_relay(broker.url, "web") as web:
            @web.handler("todos.created")
            async def answered(message):
                answers.append(message.raw)

            await web.send("todos.create", {"title": "x"}, auth={"token": "t0k3n"}, is_security=True)
            [answer] = await wait_until(lambda: answers, "the answer")
            assert answer["auth"] == {"token": "t0k3n"} and answer["isSecurity"] is True


async def test_stream_collects_answers_until_the_final_one():
    async with running_broker(ROUTES) as broker:
        async with todos_service(broker.url, "1.0.0"), open_relay(broker.url, "web") as web:
            answers = await web.stream("todos.search", {"text": "milk"}, final="todos.search-done", timeout=5)
            assert [(a.name, a.payload) for a in answers] == [
                ("todos.found", {"n": 0}), ("todos.found", {"n": 1}), ("todos.found", {"n": 2}),
                ("todos.search-done", {"count": 3})]
            assert len({a.activity_id for a in answers}) == 1
            # `final` may also be a test on the answer.
            answers = await web.stream("todos.search", final=lambda a: a.payload.get("count") == 3, timeout=5)
            assert len(answers) == 4


async def test_a_request_nobody_answers_raises_request_timeout():
    async with running_broker(ROUTES) as broker:
        async with open_relay(broker.url, "web") as web:
            start = trio.current_time()
            with pytest.raises(RequestTimeout, match=r"no answer to 'todos.list' within 0.3s"):
                await web.request("todos.list", timeout=0.3)
            assert 0.3 <= trio.current_time() - start < 2
            # A stream that stops short of its final answer times out too.
            async with open_relay(broker.url, "todos", "1.0.0") as silent:
                @silent.handler("todos.search")
                async def two_only(message):
                    await message.reply("todos.found", {"n": 0})

                with pytest.raises(RequestTimeout, match="todos.search"):
                    await web.stream("todos.search", final="todos.search-done", timeout=0.3)


async def test_a_request_waiting_when_the_relay_closes_raises_relay_closed():
    async with running_broker(ROUTES) as broker:
        async with open_relay(broker.url, "web") as web:
            async def close_soon():
                await wait_until(lambda: web.pending_requests, "the request to wait")
                web.close()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(close_soon)
                with pytest.raises(RelayClosed), trio.fail_after(2):
                    await web.request("todos.list", timeout=10)
            with pytest.raises(RelayClosed):
                await web.send("todos.list")


# ------------------------------------------------------------------- refusals

@pytest.mark.parametrize("role, version, code, reason", [
    ("nobody", None, 4001, "role 'nobody' is not in the routing configuration"),
    ("todos", "banana", 4002, "invalid version"),
])
async def test_a_refused_registration_raises_relay_error_with_the_reason(role, version, code, reason):
    async with running_broker(ROUTES) as broker:
        with trio.fail_after(5), pytest.raises(RelayError, match=reason) as refused:
            async with open_relay(broker.url, role, version, **FAST):
                raise AssertionError("the block must not run")  # pragma: no cover
        assert isinstance(refused.value, RegistrationRefused)
        assert refused.value.code == code and reason in refused.value.reason
        assert f"close code {code}" in str(refused.value)


async def test_a_message_without_handler_is_logged_and_the_relay_keeps_working():
    async with running_broker(ROUTES) as broker:
        with relay_events() as logs:
            async with open_relay(broker.url, "todos", "1.0.0") as todos, open_relay(broker.url, "web") as web:
                @todos.handler("todos.create")
                async def create(message):
                    await message.reply("todos.created", {"ok": True})

                await web.send("todos.list")  # todos has no handler for it
                await wait_until(lambda: todos.unhandled == 1, "todos to drop todos.list")
                answer = await web.request("todos.create", {"title": "x"}, timeout=5)
                assert answer.payload == {"ok": True}
        [entry] = [e for e in logs if e["event"] == "no handler for message"]
        assert entry["name"] == "todos.list" and entry["relay"] == "todos" and entry["log_level"] == "warning"


async def test_a_failing_handler_is_logged_and_the_relay_keeps_working():
    async with running_broker(ROUTES) as broker:
        with relay_events() as logs:
            async with open_relay(broker.url, "todos", "1.0.0") as todos, open_relay(broker.url, "web") as web:
                @todos.handler("todos.create")
                async def create(message):
                    if message.payload["title"] == "boom":
                        raise ValueError("cannot store boom")
                    await message.reply("todos.created", {"ok": True})

                with pytest.raises(RequestTimeout):
                    await web.request("todos.create", {"title": "boom"}, timeout=0.3)
                assert (await web.request("todos.create", {"title": "fine"}, timeout=5)).payload == {"ok": True}
        [entry] = [e for e in logs if e["event"] == "handler failed"]
        assert entry["error"] == "cannot store boom" and entry["name"] == "todos.create"


# -------------------------------------------------------------- close / restart

async def test_leaving_the_block_closes_with_a_handshake_and_the_broker_forgets_the_instance():
    async with running_broker(ROUTES) as broker:
        start = trio.current_time()
        async with open_relay(broker.url, "todos", "1.0.0") as relay:
            await broker.wait_registered("todos", "1.0.0")
        # Without the close handshake the exit waits for close_timeout (2s).
        assert trio.current_time() - start < 1
        assert relay.closed and not relay.online
        assert not broker.broker.registry.by_conn

        with pytest.raises(ZeroDivisionError):  # also when the block raises
            async with open_relay(broker.url, "todos", "1.0.0"):
                1 / 0
        await wait_until(lambda: not broker.broker.registry.by_conn, "the broker to forget the instance", 1)


async def test_closing_while_waiting_to_reconnect_returns_at_once(tmp_path):
    broker = BrokerProcess(tmp_path, "--config", str(write_routes(tmp_path)))
    await trio.to_thread.run_sync(broker.start)
    try:
        busy = trio.Event()
        async with open_relay(broker.url, "todos", "1.0.0", min_backoff=1, max_backoff=1) as relay, \
                open_relay(broker.url, "web", **FAST) as web:
            @relay.handler("todos.list")
            async def slow(message):
                busy.set()
                await trio.sleep_forever()

            await web.send("todos.list")
            with trio.fail_after(5):
                await busy.wait()
            await trio.to_thread.run_sync(broker.kill)
            await wait_until(lambda: relay.connect_attempts >= 2, "a reconnect attempt")
            start = trio.current_time()
            await relay.aclose()  # in its 1s backoff, with a handler running
            assert relay.stopped and trio.current_time() - start < 0.5
    finally:
        broker.stop()


async def test_close_sends_a_websocket_close_frame_and_waits_for_the_answer():
    """Seen from the other end of the connection (a plain trio-websocket
    server, which records how the client closed): code 1000, not an abort."""
    closes = []

    async def endpoint(request):
        ws = await request.accept()
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as e:
            closes.append(e.reason.code)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, endpoint, "127.0.0.1", 0, None)
        port = server.port
        async with open_relay(f"ws://127.0.0.1:{port}/services", "web"):
            pass
        await wait_until(lambda: closes, "the server to see the close")
        nursery.cancel_scope.cancel()
    assert closes == [1000]


async def test_a_message_that_comes_before_the_block_registered_its_handler_is_not_lost():
    """A deployment step's start message may come right after the
    registration, before `open_relay` returned. Here a plain trio-websocket
    peer sends a message as soon as it has the registration, so that it
    arrives before the pong that confirms the registration."""
    async def endpoint(request):
        ws = await request.accept()
        await ws.get_message()  # the registration
        await ws.send_message(json.dumps({"name": "deployment-x-1.0.0-offline-start", "id": "s1",
                                          "activityId": "a1", "payload": {"attempt": 1}}))
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.get_message()

    got = []
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, endpoint, "127.0.0.1", 0, None)
        async with open_relay(f"ws://127.0.0.1:{server.port}/services", "x-deployment") as relay:
            @relay.handler("deployment-x-1.0.0-offline-start")
            async def start(message):
                got.append(message.payload)

            await wait_until(lambda: got, "the start message to reach its handler", 2)
            assert relay.unhandled == 0
        nursery.cancel_scope.cancel()
    assert got == [{"attempt": 1}]


def write_routes(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text(json.dumps(ROUTES))
    return path


async def test_relays_register_again_after_the_broker_restarts_on_the_same_port(tmp_path):
    broker = BrokerProcess(tmp_path, "--config", str(write_routes(tmp_path)))
    await trio.to_thread.run_sync(broker.start)
    try:
        async with todos_service(broker.url, "1.0.0") as todos, open_relay(broker.url, "web", **FAST) as web:
            assert (await web.request("todos.list", timeout=5)).payload == {"version": "1.0.0"}
            assert await trio.to_thread.run_sync(broker.kill) == -signal.SIGKILL
            await wait_until(lambda: not web.online and not todos.online, "the relays to notice")
            with pytest.raises(RequestTimeout, match="not connected"):
                await web.send("todos.list", timeout=0.2)

            await trio.to_thread.run_sync(broker.start)  # same port, same state dir
            await wait_until(lambda: web.registrations == 2 and todos.registrations == 2, "both to register again")
            clients = (await trio.to_thread.run_sync(http_get, broker.port, "/config.json"))["clients"]
            assert sorted(c["role"] for c in clients) == ["todos", "web"]
            assert (await web.request("todos.list", timeout=5)).payload == {"version": "1.0.0"}
    finally:
        broker.stop()


# ----------------------------------------------------------------- deployments

async def test_deployment_script_success_makes_the_version_live(tmp_path):
    async with running_broker(ROUTES, tmp_path) as broker:
        seen = []

        async def offline(relay):
            # While 2.0.0 is held, the script's messages to todos reach 2.0.0.
            seen.append(("offline", (await relay.request("todos.list", timeout=5)).payload["version"]))

        async def online(relay):
            seen.append(("online", (await relay.request("todos.list", timeout=5)).payload["version"]))

        async with todos_service(broker.url, "1.0.0"), todos_service(broker.url, "2.0.0"), \
                open_relay(broker.url, "web") as web:
            assert (await web.request("todos.list", timeout=5)).payload["version"] == "1.0.0"
            async with open_relay(broker.url, "todos-deployment") as script_relay:
                DeploymentScript("todos", "2.0.0", offline=offline, online=online).attach(script_relay)
                d = await wait_until(
                    lambda: (lambda d: d if d["finished"] else None)(broker.broker.deployments_json()[0]),
                    "the deployment to finish")
            assert seen == [("offline", "2.0.0"), ("online", "2.0.0")]
            assert [(s["step"], s["status"], s["attempts"]) for s in d["steps"]] == [
                ("offline", "done", 1), ("online", "done", 1)]
            assert (await deployments(broker.port))["todos@2.0.0"]["state"] == "live"
            assert (await web.request("todos.list", timeout=5)).payload["version"] == "2.0.0"
            assert (await web.request("todos.list", timeout=5, version="1")).payload["version"] == "1.0.0"


async def test_deployment_script_failure_reports_the_exception_text(tmp_path):
    async with running_broker(ROUTES, tmp_path) as broker:
        async def offline(relay):
            raise RuntimeError("the search index at /var/index is corrupt")

        online_ran = []

        async def online(relay):
            online_ran.append(True)
        async with todos_service(broker.url, "1.0.0"), todos_service(broker.url, "2.0.0"), \
                open_relay(broker.url, "web") as web, open_relay(broker.url, "todos-deployment") as script_relay:
            DeploymentScript("todos", "2.0.0", offline=offline, online=online).attach(script_relay)

            async def failed():
                d = (await deployments(broker.port))["todos@2.0.0"]
                return d if failure_recorded(d) else None
            d = await wait_until(failed, "the deployment to fail")
            [offline_step, online_step] = d["steps"]
            assert offline_step["status"] == "failed"
            assert offline_step["lastError"] == "RuntimeError: the search index at /var/index is corrupt"
            assert online_step["status"] == "pending" and not online_ran
            # Production traffic stays with the old version.
            assert (await web.request("todos.list", timeout=5)).payload["version"] == "1.0.0"


async def test_a_deployment_script_can_pin_its_messages_to_the_old_version():
    async with running_broker(ROUTES) as broker:
        async with todos_service(broker.url, "1.0.0"), todos_service(broker.url, "2.0.0"), \
                open_relay(broker.url, "todos-deployment") as script:
            # While 2.0.0 is held, the script talks to the version it deploys ...
            assert (await script.request("todos.list", timeout=5)).payload["version"] == "2.0.0"
            # ... unless it pins a message to a version 2.0.0 does not satisfy.
            assert (await script.request("todos.list", version="1", timeout=5)).payload["version"] == "1.0.0"
