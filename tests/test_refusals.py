"""Every refusal, end to end: the offending connection gets the documented
treatment (a close code, or the frame dropped with the connection left open),
the broker logs a warning, and the other services keep working.
"""

from __future__ import annotations

import json

import pytest
import trio
from structlog.testing import capture_logs
from trio_websocket import ConnectionClosed

from exocom.server.listener import Limits
from raw_ws import RawClient
from wire import new_id, running_broker

ROUTES = {
    "web": {"sends": ["users create"], "receives": ["users created"]},
    "users": {"receives": ["users create", "wipe"], "sends": ["users created"]},
    "admin": {"sends": ["wipe"]},
    # a bystander pair that must keep talking whatever happens to the others
    "pinger": {"sends": ["ping"], "receives": ["pong"]},
    "ponger": {"receives": ["ping"], "sends": ["pong"]},
}


def events(logs, name):
    return [entry for entry in logs if entry["event"] == name]


async def wait_for_event(logs, name, count: int = 1) -> list:
    with trio.fail_after(5):
        while len(events(logs, name)) < count:
            await trio.sleep(0.005)
    return events(logs, name)


async def round_trip(pinger, ponger, timeout: float = 5.0) -> float:
    """pinger asks, ponger answers on the same activity; returns the seconds it took."""
    start = trio.current_time()
    sent = await pinger.send("ping", {"at": start})
    got = await ponger.receive(timeout)
    assert got["name"] == "ping" and got["id"] == sent["id"]
    await ponger.send("pong", {"at": start}, activityId=got["activityId"])
    answer = await pinger.receive(timeout)
    assert answer["name"] == "pong" and answer["activityId"] == sent["activityId"]
    return trio.current_time() - start


async def still_delivers(web, users) -> None:
    sent = await web.send("users create", {"name": "still here"})
    got = await users.receive()
    assert got["id"] == sent["id"] and got["payload"] == {"name": "still here"}


# ----------------------------------------------------------- registration refusals

REGISTER = "exocom.register-service"

REGISTRATION_REFUSALS = {
    "message before registration": ([{"name": "users create", "sender": "web", "id": "1"}], 4000),
    "non-JSON before registration": (["hello broker"], 4000),
    "registration not an object": ([["exocom.register-service"]], 4000),
    "unknown role": ([{"name": REGISTER, "sender": "payments", "id": "1"}], 4001),
    "invalid version": ([{"name": REGISTER, "sender": "web", "id": "1", "payload": {"version": "banana"}}], 4002),
    "version not a string": ([{"name": REGISTER, "sender": "web", "id": "1", "payload": {"version": 1}}], 4002),
    "no sender": ([{"name": REGISTER, "id": "1"}], 4004),
    "sender not a string": ([{"name": REGISTER, "sender": 42, "id": "1"}], 4004),
    "empty sender": ([{"name": REGISTER, "sender": "", "id": "1"}], 4004),
}


@pytest.mark.parametrize("frames, code", REGISTRATION_REFUSALS.values(), ids=REGISTRATION_REFUSALS.keys())
async def test_registration_refusals_close_the_connection(frames, code):
    async with running_broker(ROUTES) as rb:
        async with rb.service("web") as web, rb.service("users") as users, \
                rb.service("pinger") as pinger, rb.service("ponger") as ponger:
            with capture_logs() as logs:
                async with rb.service("offender", register=False) as offender:
                    for frame in frames:
                        await offender.send_raw(frame if isinstance(frame, str) else json.dumps(frame))
                    closed_code, reason = await offender.closed_with()
                assert closed_code == code
                assert reason  # a reason a person can read
                refusal = (await wait_for_event(logs, "registration refused"))[0]
            assert refusal["log_level"] == "warning" and refusal["code"] == code
            assert all(c["role"] != "offender" for c in rb.broker.config_json()["clients"])
            await still_delivers(web, users)
            await round_trip(pinger, ponger)


async def test_a_second_registration_closes_with_4003():
    async with running_broker(ROUTES) as rb:
        async with rb.service("users") as users, rb.service("pinger") as pinger, rb.service("ponger") as ponger:
            with capture_logs() as logs:
                async with rb.service("web") as web:
                    await web.register()
                    code, reason = await web.closed_with()
                    assert code == 4003 and "web" in reason
                refusal = (await wait_for_event(logs, "message refused"))[0]
                assert refusal["log_level"] == "warning" and refusal["role"] == "web"
            # the refused connection is deregistered; a new web instance works
            with trio.fail_after(5):
                while any(c["role"] == "web" for c in rb.broker.config_json()["clients"]):
                    await trio.sleep(0.005)
            async with rb.service("web") as web:
                await still_delivers(web, users)
            await round_trip(pinger, ponger)


async def test_a_second_registration_as_another_role_closes_with_4003():
    async with running_broker(ROUTES) as rb:
        async with rb.service("web") as web:
            await web.send_raw(json.dumps({"name": REGISTER, "sender": "users", "id": new_id()}))
            code, _ = await web.closed_with(timeout=1)
            assert code == 4003


# ------------------------------------------------- frames dropped, connection open

DROPPED = {
    "spoofed sender": json.dumps({"name": "users create", "sender": "admin", "id": "1", "activityId": "2"}),
    "spoofed sender, name of the claimed role": json.dumps({"name": "wipe", "sender": "admin", "id": "1"}),
    "not JSON": "users create, please",
    "truncated JSON": '{"name": "users create", "sender": "web"',
    "JSON list": json.dumps(["users create"]),
    "JSON string": json.dumps("users create"),
    "JSON number": "42",
    "JSON null": "null",
    "no name": json.dumps({"sender": "web", "id": "1", "payload": {}}),
    "name not a string": json.dumps({"name": ["users create"], "sender": "web", "id": "1"}),
    "name null": json.dumps({"name": None, "sender": "web", "id": "1"}),
    "binary frame, not JSON": b"\x00\xff\x00",
}


@pytest.mark.parametrize("frame", DROPPED.values(), ids=DROPPED.keys())
async def test_bad_frames_are_dropped_and_the_connection_stays_open(frame):
    async with running_broker(ROUTES) as rb:
        async with rb.service("web") as web, rb.service("users") as users, \
                rb.service("pinger") as pinger, rb.service("ponger") as ponger:
            with capture_logs() as logs:
                await web.send_raw(frame)
                refusal = (await wait_for_event(logs, "message refused"))[0]
            assert refusal["log_level"] == "warning" and refusal["role"] == "web" and refusal["reason"]
            await users.receive_nothing(0.1)
            # the offender's connection is open and still registered as web
            await still_delivers(web, users)
            await round_trip(pinger, ponger)


# ---------------------------------------------------------------- frame size

async def test_a_frame_above_the_size_limit_closes_with_1009():
    async with running_broker(ROUTES, limits=Limits(max_frame_bytes=10_000)) as rb:
        async with rb.service("users") as users, rb.service("pinger") as pinger, rb.service("ponger") as ponger:
            with capture_logs() as logs:
                async with rb.service("web") as web:
                    await web.send("users create", "x" * 9_000)  # below the limit: delivered
                    assert len((await users.receive())["payload"]) == 9_000
                    await web.send("users create", "x" * 20_000)
                    code, reason = await web.closed_with()
                    assert code == 1009 and "10000" in reason
                warning = (await wait_for_event(logs, "frame too large"))[0]
            assert warning["log_level"] == "warning" and warning["limit_bytes"] == 10_000
            await users.receive_nothing(0.1)
            await round_trip(pinger, ponger)
            async with rb.service("web") as web:
                await still_delivers(web, users)


async def test_a_frame_much_larger_than_the_limit_closes_with_1009():
    # the broker stops reading in the middle of the frame: the close frame must still arrive
    async with running_broker(ROUTES, limits=Limits(max_frame_bytes=10_000)) as rb:
        async with rb.service("users") as users, rb.service("pinger") as pinger, rb.service("ponger") as ponger:
            async with rb.service("web") as web:
                try:
                    await web.send("users create", "x" * 500_000)
                except ConnectionClosed as e:  # closed while the client was still sending
                    code = e.reason.code
                else:
                    code, _ = await web.closed_with()
                assert code == 1009
            await users.receive_nothing(0.1)
            await round_trip(pinger, ponger)


# ------------------------------------------------------------- slow consumer


SLOW = {
    "flooder": {"sends": ["bulk"]},
    "sink": {"receives": ["bulk"]},
    "pinger": {"sends": ["ping"], "receives": ["pong"]},
    "ponger": {"receives": ["ping"], "sends": ["pong"]},
}


def connected(rb, role: str) -> bool:
    return any(c["role"] == role for c in rb.broker.config_json()["clients"])


async def test_a_slow_consumer_is_disconnected_and_delays_nobody():
    outbox_limit = 256 * 1024
    bulk = "x" * 65536
    async with running_broker(SLOW, limits=Limits(max_outbox_bytes=outbox_limit)) as rb:
        async with rb.service("flooder") as flooder, rb.service("pinger") as pinger, rb.service("ponger") as ponger:
            sink = await RawClient.connect(rb.port, receive_buffer=4096)
            try:
                await sink.send_json({"name": REGISTER, "sender": "sink", "id": new_id()})
                await rb.wait_registered("sink")
                # from here on the sink never reads its socket until it was dropped
                with capture_logs() as logs:
                    sent, slowest = 0, 0.0
                    with trio.fail_after(20):
                        while connected(rb, "sink"):
                            assert sent < 3000, "the sink was never disconnected"
                            await flooder.send("bulk", bulk)
                            sent += 1
                            slowest = max(slowest, await round_trip(pinger, ponger))
                    slowest = max(slowest, await round_trip(pinger, ponger))
                    dropped = await wait_for_event(logs, "slow consumer disconnected")
                assert slowest < 0.5, f"a round trip of the bystanders took {slowest:.3f}s during the flood"
                assert dropped[0]["log_level"] == "warning"
                assert dropped[0]["instance"].startswith("sink@")
                assert len(dropped) == 1
                # the sink finds its connection gone, with fewer frames than were sent to it
                received, _ = await sink.drain()
                assert received < sent
            finally:
                await sink.aclose()
            # the flooder is still connected, and a sink that reads gets its messages again
            async with rb.service("sink") as reading_sink:
                sent_frame = await flooder.send("bulk", "small")
                assert (await reading_sink.receive())["id"] == sent_frame["id"]
            await round_trip(pinger, ponger)
