"""The outbox bound of one receiver, on the trio shell with an in-memory
stream whose other end never reads (deterministic, unlike kernel buffers)."""

import trio
import trio.testing
from wsproto.frame_protocol import FrameProtocol

from exocom.core.actions import Deliver, Redeliver
from exocom.core.broker import Broker
from exocom.core.config import parse_service_data
from exocom.server.listener import Limits, Peer, Server

LIMIT = 1000
PAYLOAD = b"x" * 300  # 302 bytes with its frame header


def one_peer():
    """A server with one connection whose other end (`theirs`) never reads unless told."""
    broker = Broker(parse_service_data({"sink": {}}, "test"))
    server = Server(broker, None, Limits(max_outbox_bytes=LIMIT), handle_signals=False)
    ours, theirs = trio.testing.lockstep_stream_pair()
    peer = Peer(1, "test", ours)
    server.peers[1] = peer
    return broker, server, peer, theirs


async def test_the_outbox_limit_counts_what_the_writer_is_still_sending():
    broker, server, peer, theirs = one_peer()
    accepted = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._writer, peer)
        while not peer.closing:
            server.execute([Deliver(1, PAYLOAD)])
            if not peer.closing:
                accepted += 1
            # Let the writer take what is queued into its (stuck) send.
            await trio.testing.wait_all_tasks_blocked()
            assert peer.outbox_bytes <= LIMIT
        nursery.cancel_scope.cancel()
    # 3 x 302 bytes fit in 1000, in flight and queued together; a fourth does not.
    assert accepted == 3
    assert broker.stats.slow_consumers == 1


async def test_pings_whose_pongs_are_never_read_count_against_the_outbox():
    broker, server, peer, theirs = one_peer()
    ping = FrameProtocol(client=True, extensions=[]).ping(b"p" * 125)  # a pong of 127 bytes
    sent = 0
    async with trio.open_nursery() as nursery:
        peer.cancel_scope = nursery.cancel_scope
        nursery.start_soon(server._writer, peer)
        nursery.start_soon(server._reader, peer, b"")
        with trio.fail_after(5):
            while not peer.closing:
                await theirs.send_all(ping)  # `theirs` sends pings and never reads a pong
                sent += 1
                await trio.testing.wait_all_tasks_blocked()
    assert broker.stats.slow_consumers == 1
    assert sent <= LIMIT // 127 + 2, f"{sent} pings were answered into an outbox of {LIMIT} bytes"


async def test_a_backlog_rerouted_from_a_gone_instance_never_drops_the_one_that_takes_it():
    # Found in review: re-routing a dropped instance's whole outbox to its
    # sibling in one pass made the healthy sibling a slow consumer too.
    broker, server, peer, theirs = one_peer()
    broker.stats.frames_rerouted = 4  # as the core counts them when it offers them
    server.execute([Redeliver(1, PAYLOAD) for _ in range(4)])  # the fourth does not fit in 1000 bytes
    assert not peer.closing and broker.stats.slow_consumers == 0
    assert peer.outbox_bytes == 3 * (len(PAYLOAD) + 4)  # a 300-byte text frame has a 4-byte header
    assert (broker.stats.frames_rerouted, broker.stats.outbox_dropped_frames) == (3, 1)
