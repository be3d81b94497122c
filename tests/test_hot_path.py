"""The structural wins of the message path, pinned by counting (never by
timing): a later change that undoes one fails here, however fast the machine.

- A request/reply round trip costs the broker two task steps: each message
  is read, routed and written by the reader of its sender, with no hand-over
  to the receiver's writer task (which cost two more steps per message: its
  wake-up and the checkpoint after its send).
- The messages of one read go to a receiver in one system call, and so do
  those that several senders' reads in one pass of trio's scheduler deliver.
- An idle connection keeps nothing of its HTTP upgrade (the parser and the
  handshake were half of its memory).
"""

from __future__ import annotations

import gc
import json
import os
from collections import Counter

import h11
import trio
import trio.lowlevel
from wsproto.events import TextMessage
from wsproto.handshake import H11Handshake

from exocom.core.actions import Deliver
from exocom.core.broker import Broker
from exocom.core.config import parse_service_data
from exocom.server import listener
from raw_ws import RawClient
from wire import new_id, running_broker

ROUTES = {"asker": {"sends": ["ping"], "receives": ["pong"]}, "answerer": {"receives": ["ping"], "sends": ["pong"]}}
ROUND_TRIPS = 200


class TaskSteps(trio.abc.Instrument):
    """Counts the steps of the broker's own tasks, by task name."""

    def __init__(self):
        self.steps: Counter[str] = Counter()

    def before_task_step(self, task):
        name = task.name
        if name.startswith(("exocom.server", "trio._highlevel_serve_listeners")):
            self.steps[name.rsplit(".", 1)[-1]] += 1


async def registered(port: int, role: str) -> RawClient:
    client = await RawClient.connect(port)
    await client.send_json({"name": "exocom.register-service", "sender": role, "id": new_id()})
    return client


async def all_registered(broker, connections: int) -> None:
    with trio.fail_after(5):
        while len(broker.broker.registry.by_conn) < connections:
            await trio.sleep(0.01)


async def next_message(client: RawClient) -> dict:
    with trio.fail_after(5):
        while True:
            for event in client.ws.events():
                if isinstance(event, TextMessage):
                    return json.loads(event.data)
            client.ws.receive_data(await client.stream.receive_some(65536))


async def test_a_round_trip_costs_the_broker_two_task_steps():
    async with running_broker(ROUTES) as broker:
        asker = await registered(broker.port, "asker")
        answerer = await registered(broker.port, "answerer")
        await broker.wait_registered("asker")
        await broker.wait_registered("answerer")
        # One round trip outside the count: the first message of a connection takes other paths (warnings, caches).
        counter = TaskSteps()
        for i in range(ROUND_TRIPS + 1):
            if i == 1:
                trio.lowlevel.add_instrument(counter)
            activity = new_id()
            await asker.send_json({"name": "ping", "sender": "asker", "id": new_id(), "activityId": activity})
            request = await next_message(answerer)
            await answerer.send_json({"name": "pong", "sender": "answerer", "id": new_id(),
                                      "activityId": activity, "responseTo": request["id"]})
            assert (await next_message(asker))["name"] == "pong"
        trio.lowlevel.remove_instrument(counter)
        steps = counter.steps
        # The broker's ticker may step once or twice while this runs.
        assert steps["_writer"] == 0, f"the writer tasks woke for messages the readers could write: {dict(steps)}"
        assert sum(steps.values()) <= 2 * ROUND_TRIPS + 4, f"{dict(steps)} for {ROUND_TRIPS} round trips"


async def test_the_messages_of_one_read_go_to_a_receiver_in_one_write(monkeypatch):
    writes = []
    real_write = listener.write_now

    def counting_write(fd, buffers):
        writes.append(sum(map(len, buffers)))
        return real_write(fd, buffers)

    monkeypatch.setattr(listener, "write_now", counting_write)
    async with running_broker(ROUTES) as broker:
        asker = await registered(broker.port, "asker")
        answerer = await registered(broker.port, "answerer")
        await broker.wait_registered("asker")
        await broker.wait_registered("answerer")
        writes.clear()
        burst = b"".join(asker.ws.send(TextMessage(data=json.dumps(
            {"name": "ping", "sender": "asker", "id": new_id(), "activityId": new_id()}))) for _ in range(32))
        await asker.stream.send_all(burst)  # 32 messages in one TCP segment
        received = [await next_message(answerer) for _ in range(32)]
        assert len(received) == 32
        assert len(writes) == 1, f"32 messages of one read went out in {len(writes)} writes: {writes}"


async def test_what_two_senders_deliver_in_one_scheduler_pass_goes_out_in_one_write(monkeypatch):
    writes = []
    real_write = listener.write_now
    monkeypatch.setattr(listener, "write_now", lambda fd, buffers: writes.append(len(buffers)) or real_write(fd, buffers))
    async with running_broker(ROUTES) as broker:
        askers = [await registered(broker.port, "asker") for _ in range(2)]
        answerer = await registered(broker.port, "answerer")
        await all_registered(broker, 3)
        writes.clear()
        for asker in askers:
            # Written without yielding to trio: both reads are ready at the broker's next wait for I/O.
            data = asker.ws.send(TextMessage(data=json.dumps(
                {"name": "ping", "sender": "asker", "id": new_id(), "activityId": new_id()})))
            assert os.write(asker.stream.socket.fileno(), data) == len(data)
        received = [await next_message(answerer) for _ in range(2)]
        assert len(received) == 2
        assert len(writes) == 1, f"two senders' messages went out in {len(writes)} writes: {writes}"


async def test_an_idle_connection_keeps_nothing_of_its_http_upgrade():
    async with running_broker(ROUTES) as broker:
        clients = [await registered(broker.port, "asker") for _ in range(3)]
        await all_registered(broker, len(clients))
        gc.collect()
        # The clients' own parsers are client-side; the broker's are the server-side ones.
        kept = [o for o in gc.get_objects()
                if (isinstance(o, h11.Connection) and o.our_role is h11.SERVER)
                or (isinstance(o, H11Handshake) and not o.client)]
        assert kept == [], f"{len(kept)} HTTP parsers or handshakes kept for {len(clients)} idle connections"


def test_the_rest_of_a_frame_the_socket_took_in_part_is_never_taken_for_a_message():
    header, message = b"\x81\x0b", b'{"name":"x"}'[:11]
    outbox = [header, message, b"\x81\x0b", b'{"name":"y"}'[:11]]
    listener._drop_sent(outbox, 2 + 5)  # the first header and 5 bytes of its message went out
    assert outbox == [bytearray(message[5:]), b"\x81\x0b", b'{"name":"y"}'[:11]]
    assert listener._messages_in(outbox) == [b'{"name":"y"}'[:11]]
    listener._drop_sent(outbox, 6)
    assert outbox == [b"\x81\x0b", b'{"name":"y"}'[:11]]


async def test_what_a_full_socket_did_not_take_goes_out_after_it_in_order():
    """The reader's write takes what fits; the writer task sends the rest, and
    nothing is lost, doubled or reordered across the two."""
    ours, theirs = trio.socket.socketpair()
    ours.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 4096)
    server = listener.Server(Broker(parse_service_data({"sink": {}}, "test")), None, handle_signals=False)
    peer = listener.Peer(1, "test", trio.SocketStream(ours))
    server.peers[1] = peer
    messages = [json.dumps({"n": i, "pad": "x" * 300}).encode() for i in range(400)]
    async with trio.open_nursery() as nursery:
        peer.cancel_scope = nursery.cancel_scope
        nursery.start_soon(server._writer, peer)
        for batch in range(0, len(messages), 50):
            server.execute([Deliver(1, m) for m in messages[batch:batch + 50]])
        assert peer.outbox, "the socket took everything: the test needs a full socket"
        received = bytearray()
        with trio.fail_after(10):
            while len(received) < sum(len(m) + 4 for m in messages):
                received += await theirs.recv(65536)
        nursery.cancel_scope.cancel()
    got, i = [], 0  # the server's frames: unmasked, lengths under 65536
    while i < len(received):
        length = received[i + 1] & 0x7F
        start = i + 2 + (2 if length == 126 else 0)
        if length == 126:
            length = int.from_bytes(received[i + 2:i + 4], "big")
        got.append(bytes(received[start:start + length]))
        i = start + length
    assert got == messages
