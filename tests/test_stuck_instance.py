"""Nothing accepted is lost to a stuck instance (issue 8, item 11).

A role with two instances of one version; one stops reading its socket (as a
process under SIGSTOP does). Before: round robin kept giving it half the
messages until its outbox overflowed, and everything queued for it was
dropped with it. Now it is passed over once its outbox is congested, and
what is queued for it when it goes goes to the other instance.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio
from structlog.testing import capture_logs

from exocom.server.listener import Limits
from raw_ws import RawClient
from wire import new_id, running_broker

ROUTES = {"flooder": {"sends": ["bulk"]}, "sink": {"receives": ["bulk"]}}
MESSAGES = 1500
PAYLOAD = "x" * 4000  # 6 MB in all, 3 MB for the stuck instance under plain round robin
LIMITS = Limits(max_outbox_bytes=256 * 1024)


async def reading_sink(rb, received: list, task_status=trio.TASK_STATUS_IGNORED):
    async with rb.service("sink") as sink:
        task_status.started()
        while True:
            received.append((await sink.receive(timeout=60))["payload"]["n"])


async def stuck_sink(rb) -> RawClient:
    stuck = await RawClient.connect(rb.port, receive_buffer=4096)
    await stuck.send_json({"name": "exocom.register-service", "sender": "sink", "id": new_id()})
    with trio.fail_after(5):
        while sum(c["instances"] for c in rb.broker.config_json()["clients"] if c["role"] == "sink") < 2:
            await trio.sleep(0.005)
    return stuck


async def flood(rb) -> None:
    async with rb.service("flooder") as flooder:
        for n in range(MESSAGES):
            await flooder.send("bulk", {"n": n, "text": PAYLOAD})


@asynccontextmanager
async def flooded_past_a_stuck_instance():
    """A broker, a reading sink, a stuck sink, and MESSAGES sent to the role:
    yields (broker, what the reading sink received so far, the stuck sink, the logs)."""
    received: list[int] = []
    async with running_broker(ROUTES, limits=LIMITS) as rb:
        async with trio.open_nursery() as nursery:
            await nursery.start(reading_sink, rb, received)
            stuck = await stuck_sink(rb)
            try:
                with capture_logs() as logs:
                    await flood(rb)
                    yield rb, received, stuck, logs
            finally:
                nursery.cancel_scope.cancel()
                await stuck.aclose()


async def test_a_stuck_instance_that_resumes_loses_nothing():
    async with flooded_past_a_stuck_instance() as (rb, received, stuck, logs):
        with trio.fail_after(20):
            while len(received) < MESSAGES - 200 and rb.broker.stats.slow_consumers == 0:
                await trio.sleep(0.01)
        assert rb.broker.stats.slow_consumers == 0, "the stuck instance was dropped with what was queued for it"
        assert any(e["event"] == "instance congested" for e in logs)
        # it resumes: it reads what was queued for it
        late = [m["payload"]["n"] for m in await stuck.receive_until_quiet()]
        with trio.fail_after(10):
            while len(received) + len(late) < MESSAGES:
                await trio.sleep(0.01)
    assert sorted(received + late) == list(range(MESSAGES))
    assert len(late) < MESSAGES // 10, f"the stuck instance got {len(late)} of {MESSAGES} messages"


async def test_frames_queued_for_a_stuck_instance_that_dies_go_to_the_other_one():
    async with flooded_past_a_stuck_instance() as (rb, received, stuck, logs):
        await stuck.aclose()  # it dies without having read anything
        with trio.fail_after(10):
            while not any(e["event"].startswith("queued frames") for e in logs):
                await trio.sleep(0.01)
        outcome = next(e for e in logs if e["event"].startswith("queued frames"))
        assert outcome["event"] == "queued frames re-routed" and outcome["lost"] == 0
        assert outcome["rerouted"] > 0
        await quiet(received)
    assert rb.broker.stats.frames_rerouted == outcome["rerouted"]
    assert len(received) == len(set(received)), "a message was delivered twice"
    # Lost: only what the broker had already handed to the dead socket.
    lost = MESSAGES - len(received)
    assert lost < MESSAGES // 10, f"{lost} of {MESSAGES} messages lost"


async def quiet(received: list, seconds: float = 0.5) -> None:
    """Until nothing more arrives for `seconds`."""
    with trio.fail_after(20):
        while True:
            before = len(received)
            await trio.sleep(seconds)
            if len(received) == before:
                return
