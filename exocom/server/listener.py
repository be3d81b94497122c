"""The trio shell around the broker core: it moves bytes, owns the tasks,
timers and outboxes, and carries out the actions the core returns.

Each TCP connection is parsed with h11; `GET /services` with a WebSocket
upgrade is handed to wsproto, everything else is a small HTTP endpoint. Each
WebSocket connection has a reader task that feeds frames to the core and a
writer task that drains the connection's outbox when the socket cannot take
it at once. Outboxes are bounded in bytes: a receiver that does not read is
disconnected ("slow consumer") instead of delaying anybody else.

The hot path (`Server.flush`): what the readers delivered while trio ran its
ready tasks is written just before trio waits for I/O again (`FlushBeforeIOWait`),
without waking the receivers' writer tasks, in one system call per receiver.
Handing each message to another task would cost two task switches per
delivery (the wake-up, and the checkpoint after its send), which is most of a
request/reply round trip's time; writing once per scheduler pass instead of
once per read merges what several senders sent to the same receiver.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable

import h11
import trio
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError as HandshakeError

from ..core.actions import CLOSE_GOING_AWAY, CLOSE_TOO_LARGE, Close, Deliver, HandOver, Log, Redeliver, WriteRecord
from ..core.broker import Broker
from .closing import CLOSE_TIMEOUT, RECEIVE_SIZE, discard_until_eof, receive_or_eof
from .frames import BINARY, CLOSE, PING, PONG, TEXT, FrameDecoder, ProtocolError, close_frame, frame, parse_close, text_header
from .ledger import Ledger, LedgerError, LedgerLost
from ..logs import get_logger
from . import endpoints
from .endpoints import respond
from .reloading import Reloader, reload
from . import tls as tls_
from .tls import TLS

HTTP_TIMEOUT = 10.0
MAX_REQUEST_HEAD = 16 * 1024  # request line and headers; larger ones get 431
# How often the ledger writer checks, when idle, that the ledger file is still there.
LEDGER_WATCH_INTERVAL = 1.0


@dataclass
class Limits:
    max_frame_bytes: int = 1024 * 1024
    max_outbox_bytes: int = 8 * 1024 * 1024

    @property
    def outbox_high_water(self) -> int:
        """Above this an instance is congested and others of its version go
        first: well below the limit, so that a stuck instance stops getting
        traffic long before it would be dropped with everything queued."""
        return self.max_outbox_bytes // 8

    @property
    def outbox_low_water(self) -> int:
        # Hysteresis: an instance at the mark does not flap in and out.
        return self.max_outbox_bytes // 32


class Peer:
    """One WebSocket connection: its stream and outbox."""

    __slots__ = ("id", "address", "stream", "socket", "outbox", "outbox_bytes", "wakeup", "sending", "closing",
                 "close_sent", "cancel_scope", "congested", "unsent")

    def __init__(self, conn_id: int, address: str, stream: trio.abc.Stream):
        self.id = conn_id
        self.address = address
        self.stream = stream
        # Where the reader may write at once (`Server.flush`): a plain TCP
        # socket. A TLS stream's bytes must go through its SSL object, in order.
        self.socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.outbox: list[bytes] = []
        self.outbox_bytes = 0
        self.wakeup = trio.Event()
        self.sending = False  # the writer task is in a send: nobody else may write to the socket
        self.closing = False
        self.close_sent = False
        self.cancel_scope: trio.CancelScope | None = None
        self.congested = False
        # Messages delivered to it that will never reach its socket (it is
        # closing or was dropped): re-routed by the core once it is gone.
        self.unsent: list[bytes] = []

    def push(self, data: bytes) -> None:
        self.outbox.append(data)
        self.outbox_bytes += len(data)
        self.wakeup.set()

    def close(self, code: int, reason: str) -> None:
        """Send a close frame after what is queued, and stop reading."""
        self.closing = True
        if not self.close_sent:
            self.close_sent = True
            self.push(close_frame(code, reason))


class FlushBeforeIOWait(trio.abc.Instrument):
    """Writes the outboxes the readers filled, once per pass of trio's
    scheduler: trio calls it after running every task that was ready, right
    before it waits for I/O."""

    def __init__(self, server: "Server"):
        self.server = server

    def before_io_wait(self, timeout: float) -> None:
        try:
            self.server.flush()
        except Exception:
            # trio removes an instrument that raises: log, and leave what is queued to the writer tasks.
            self.server.log.exception("flush failed")
            for peer in self.server.peers.values():
                peer.wakeup.set()


def bearer_token(headers) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header (h11 gives names lowercased), else None."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip().decode("latin-1")
    return None


class Server:
    def __init__(self, broker: Broker, ledger: Ledger | None, limits: Limits | None = None, *,
                 grace_period: float = 5.0, handle_signals: bool = True, reloader: Reloader | None = None,
                 tls: TLS | None = None, admin_token_sha256: bytes | None = None, protect_reads: bool = False):
        self.broker = broker
        # The operator token's digest (--admin-token-file): every POST needs it, and the reads with protect_reads.
        self.admin_token_sha256 = admin_token_sha256
        self.protect_reads = protect_reads
        self.ledger = ledger
        self.limits = limits or Limits()
        self.grace_period = grace_period
        self.handle_signals = handle_signals
        self.log = get_logger()
        self.peers: dict[int, Peer] = {}
        self._ids = itertools.count(1)
        # Peers whose outbox became non-empty since the last flush.
        self._ready: list[Peer] = []
        # While serving, FlushBeforeIOWait flushes; a reader run without it (a test) flushes after each read.
        self._flushing_before_io_wait = False
        self._ledger_send, self._ledger_receive = trio.open_memory_channel(math.inf)
        self.ledger_problem: str | None = None  # why the ledger is being written again, while it is
        self.listeners: list[trio.SocketListener] = []
        # Cancelled to stop accepting connections (on SIGTERM); it also closes the listeners.
        self._accept_scope = trio.CancelScope()
        self.started_at = time.time()
        self.stopping = False
        self.forced_stop = False  # a second signal cut the graceful stop short
        self._all_closed: trio.Event | None = None  # set during a graceful stop once no peer is left
        self.reloader = reloader  # how to read the configuration again (SIGHUP, POST /reload)
        self.reload_lock = trio.Lock()
        self.tls = tls  # None: plaintext (ws://, http://)
        self.cluster = None  # server.cluster.ClusterLink when clustered (exocom serve --cluster)

    # --------------------------------------------------------------- actions

    def execute(self, actions: list) -> None:
        self.apply(actions)
        self.flush()

    def apply(self, actions: list) -> None:
        """Carries out `actions`; deliveries are queued, and go out at the next `flush`."""
        peers = self.peers
        max_outbox = self.limits.max_outbox_bytes
        high_water = self.limits.outbox_high_water
        for action in actions:
            cls = action.__class__
            if cls is Deliver:
                peer = peers.get(action.conn)
                if peer is None:
                    continue
                if peer.closing:
                    peer.unsent.append(action.data)
                    continue
                data = action.data
                header = text_header(len(data))
                size = len(header) + len(data)
                # outbox_bytes counts what is queued and what the writer is
                # still sending: all the memory this receiver holds.
                if peer.outbox_bytes + size > max_outbox:
                    self._drop_slow_consumer(peer)
                    continue
                outbox = peer.outbox
                if not outbox:
                    self._ready.append(peer)
                outbox.append(header)
                outbox.append(data)
                peer.outbox_bytes += size
                if peer.outbox_bytes > high_water and not peer.congested:
                    peer.congested = True
                    self.apply(self.broker.outbox_congested(peer.id, True))
            elif cls is Redeliver:
                self._redeliver(action)
            elif cls is Log:
                getattr(self.log, action.level)(action.event, **action.fields)
            elif cls is Close:
                peer = peers.get(action.conn)
                if peer is not None:
                    peer.close(action.code, action.reason)
            elif cls is WriteRecord:
                self._ledger_send.send_nowait(action.record)
            elif cls is HandOver:
                self.cluster.hand_over(action.broker, action.data)

    def flush(self) -> None:
        """Writes the outboxes that `apply` filled, each in one system call,
        where the socket takes them at once; what it does not take, and every
        outbox whose writer task is busy, is left to that task."""
        ready = self._ready
        if not ready:
            return
        self._ready = []
        for peer in ready:
            outbox = peer.outbox
            if not outbox:
                continue  # dropped as a slow consumer meanwhile
            sock = peer.socket
            # fileno() is -1 once the stream is closed: never write to a number the kernel may have reused.
            fd = -1 if sock is None or peer.sending or peer.closing else sock.fileno()
            if fd < 0:
                peer.wakeup.set()
                continue
            # The frames as they are, headers and messages, in one writev: nothing is copied to join them.
            buffers = outbox if len(outbox) <= IOV_MAX else [b"".join(outbox)]
            try:
                sent = write_now(fd, buffers)
            except OSError:
                sent = 0  # full (BlockingIOError) or broken: the writer finds out which and handles it
            peer.outbox_bytes -= sent
            if sent == sum(map(len, buffers)):
                outbox.clear()
            else:
                _drop_sent(outbox, sent)
                peer.wakeup.set()
            if peer.congested and peer.outbox_bytes <= self.limits.outbox_low_water:
                peer.congested = False
                self.apply(self.broker.outbox_congested(peer.id, False))
        if self._ready:
            self.flush()  # deliveries re-routed by a congestion change

    def _redeliver(self, action: Redeliver) -> None:
        """A frame of an instance that is gone, offered to another: taken only
        where it fits, so that a backlog never drops a healthy receiver."""
        peer = self.peers.get(action.conn)
        data = action.data
        header = text_header(len(data))
        if peer is None or peer.closing or peer.outbox_bytes + len(header) + len(data) > self.limits.max_outbox_bytes:
            stats = self.broker.stats
            stats.frames_rerouted -= 1
            stats.outbox_dropped_frames += 1
            instance = self.broker.registry.by_conn.get(action.conn)
            if instance is not None:
                stats.deliveries[instance.metric_key] -= 1
            return
        self.apply([Deliver(action.conn, data)])

    def _drop_slow_consumer(self, peer: Peer) -> None:
        instance = self.broker.registry.by_conn.get(peer.id)
        queued = _messages_in(peer.outbox)
        self.log.warning(
            "slow consumer disconnected",
            instance=instance.label if instance else None, peer=peer.address,
            outbox_bytes=peer.outbox_bytes, queued_frames=len(queued),
            reason=f"its outbox exceeded {self.limits.max_outbox_bytes} bytes; the frames queued for it go to "
                   "another instance of its version where one is connected",
        )
        peer.closing = True
        self.broker.stats.slow_consumers += 1
        peer.unsent += queued
        peer.outbox.clear()
        peer.outbox_bytes = 0
        # Its writer is stuck on a socket nobody reads: abort the whole connection.
        if peer.cancel_scope is not None:
            peer.cancel_scope.cancel()

    # ------------------------------------------------------------------ tasks

    async def serve(self, host: str, port: int, *, announce: Callable[[], None] | None = None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled or stopped by a signal. `announce`
        is called once listening, before anything else is logged."""
        listeners = await trio.open_tcp_listeners(port, host=host or None)
        self.listeners = listeners
        flusher = FlushBeforeIOWait(self)
        trio.lowlevel.add_instrument(flusher)
        self._flushing_before_io_wait = True
        try:
            await self._serve(listeners, announce, task_status)
        finally:
            self._flushing_before_io_wait = False
            with contextlib.suppress(KeyError):  # trio had removed it after an error it logged
                trio.lowlevel.remove_instrument(flusher)

    async def _serve(self, listeners, announce, task_status) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ticker)
            nursery.start_soon(self._ledger_writer)
            if self.cluster is not None:
                await nursery.start(self.cluster.run, self)
            if self.handle_signals:
                await nursery.start(self._signals, nursery)
            await nursery.start(self._accept, listeners, nursery)
            if announce is not None:
                announce()
            self.execute(self.broker.starting(time.time()))
            task_status.started(listeners)

    async def _accept(self, listeners, handler_nursery, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # Connections run in the server's nursery, so that stopping to accept
        # does not end the connections that are already open.
        with self._accept_scope:
            await trio.serve_listeners(self._handle_tcp, listeners, handler_nursery=handler_nursery,
                                       task_status=task_status)

    @property
    def port(self) -> int:
        return self.listeners[0].socket.getsockname()[1]

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(1.0)
            self.execute(self.broker.tick(time.time()))

    async def _ledger_writer(self) -> None:
        """Writes records in order and, between them, watches that the ledger's
        path still names the open file (see `_recover_lost_ledger`)."""
        while True:
            record = None
            with trio.move_on_after(LEDGER_WATCH_INTERVAL):
                record = await self._ledger_receive.receive()
            if self.cluster is not None:  # the ledger is in Redis, written under the deployment's lease
                if record is not None:
                    await self.cluster.write_record(self, record)
                continue
            if self.ledger is not None:
                await self._write_durably(record)
            if record is not None:
                self.execute(self.broker.record_written(record, time.time()))

    async def _write_durably(self, record: dict | None) -> None:
        delay = 0.5
        while True:
            try:
                if record is not None:
                    await trio.to_thread.run_sync(self.ledger.append, record)
                # Checked after the append: a record that went to a file no
                # longer at the path would be lost at the next start.
                await trio.to_thread.run_sync(self.ledger.check_path)
                return
            except LedgerLost as e:
                await self._recover_lost_ledger(str(e))  # then the record goes to the fresh ledger
            except LedgerError as e:
                self._ledger_write_failed(str(e), delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _recover_lost_ledger(self, error: str) -> None:
        """The ledger file was deleted or replaced under the broker. Every record
        it acknowledged is in the core (`Broker.records`), so it writes them all
        to a fresh ledger at the same path; no step starts meanwhile."""
        path = self.ledger.path
        self.ledger_problem = error
        self.broker.ledger_lost()
        self.log.error("ledger lost", path=str(path), error=error,
                       hint="no deployment step starts until the broker has written the records it holds to a "
                            "fresh ledger at the same path (whatever is there now is moved aside); find out what "
                            "deleted or replaced the file")
        # Closed first: on close SQLite removes its -wal/-shm files, which
        # would otherwise be taken for the fresh ledger's.
        await trio.to_thread.run_sync(self.ledger.close)
        delay = 0.5
        while True:
            try:
                records = list(self.broker.records)
                self.ledger, moved_aside = await trio.to_thread.run_sync(self.ledger.recreate, records)
                break
            except (LedgerError, OSError) as e:
                self._ledger_write_failed(str(e), delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.ledger_problem = None
        self.log.warning("ledger rewritten", path=str(path), records=len(records), moved_aside=moved_aside)
        self.execute(self.broker.ledger_restored(time.time()))

    def _ledger_write_failed(self, error: str, retry_in_s: float) -> None:
        self.log.error("ledger write failed", error=error, retry_in_s=retry_in_s,
                       hint="check the state directory's disk space and permissions")

    async def _signals(self, nursery: trio.Nursery, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if not self.stopping:
                        nursery.start_soon(reload, self, name)
                    continue
                if self.stopping:
                    self.log.warning("second signal: exiting at once", signal=name)
                    self.forced_stop = True
                    nursery.cancel_scope.cancel()
                    return
                self.stopping = True
                self.log.info("broker stopping", signal=name, grace_period_s=self.grace_period)
                # Runs beside this loop, which keeps listening for a second signal.
                nursery.start_soon(self._stop_gracefully, nursery.cancel_scope)

    async def _stop_gracefully(self, cancel_scope: trio.CancelScope) -> None:
        # Closing a listener under serve_listeners' pending accept() would make it
        # raise ClosedResourceError and crash the server: cancel the accept loop
        # instead (it closes the listeners as it ends).
        self._accept_scope.cancel()
        for peer in list(self.peers.values()):
            peer.close(CLOSE_GOING_AWAY, "exocom is shutting down")
        # A ledger write in progress finishes (worker threads are not
        # abandoned); what is still queued is not acknowledged to anyone yet.
        self._all_closed = trio.Event()
        with trio.move_on_after(self.grace_period):
            if self.peers:
                await self._all_closed.wait()
        cancel_scope.cancel()

    # --------------------------------------------------------------- per TCP

    async def _handle_tcp(self, tcp: trio.SocketStream) -> None:
        try:
            address = "%s:%s" % tcp.socket.getpeername()[:2]
        except OSError:
            address = "?"
        stream: trio.abc.Stream = tcp
        try:
            cert_roles = None
            if self.tls is not None:
                stream = await self._tls_handshake(tcp, address)
                if stream is None:
                    return
                if self.tls.client_certificates:
                    cert_roles = tls_.cert_roles(stream.getpeercert())
            upgraded = await self._handle_http(stream, address)
            if upgraded is not None:
                # Here, not inside _handle_http: the HTTP parser and the handshake are freed for the connection's
                # lifetime (they were a third of an idle connection's memory).
                bearer, leftover = upgraded
                await self._websocket(stream, address, bearer, leftover, cert_roles)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        except Exception:
            # One connection's failure never takes the server down.
            self.log.exception("connection failed", peer=address)
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError):
                await (stream or tcp).aclose()

    async def _tls_handshake(self, tcp: trio.SocketStream, address: str) -> trio.SSLStream | None:
        """The TLS handshake, bounded in time; None (and a `tls handshake failed` event) if it fails."""
        reason = None
        with trio.move_on_after(tls_.HANDSHAKE_TIMEOUT) as scope:
            # A peek, so that a plaintext client gets an answer it can read instead of a TLS alert.
            try:
                first = await tcp.socket.recv(1, socket.MSG_PEEK)
            except OSError:
                return None
            if not first:
                return None  # connected and closed without a byte: a port probe
            if first[0] != tls_.TLS_HANDSHAKE_BYTE:
                reason = "plaintext on the TLS port: use https:// or wss://"
                await self._refuse_plaintext(tcp)
            else:
                stream = trio.SSLStream(tcp, self.tls.context, server_side=True, https_compatible=True)
                try:
                    await stream.do_handshake()
                    return stream
                except trio.BrokenResourceError as e:
                    reason = tls_.describe(e)
        if scope.cancelled_caught:
            reason = f"no TLS handshake within {tls_.HANDSHAKE_TIMEOUT:g}s"
        self._tls_failed(address, reason)
        return None

    def _tls_failed(self, address: str, reason: str) -> None:
        suppressed = self.tls.failure_to_log(time.monotonic()) if self.tls else 0
        if suppressed is not None:
            self.log.warning("tls handshake failed", peer=address, reason=reason,
                             **({"suppressed": suppressed} if suppressed else {}))

    async def _refuse_plaintext(self, tcp: trio.SocketStream) -> None:
        body = b'{"error": "this port serves TLS: use https:// or wss://"}\n'
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await tcp.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
                               b"content-length: %d\r\n\r\n%s" % (len(body), body))
            await tcp.send_eof()
            await discard_until_eof(tcp)

    async def _handle_http(self, stream: trio.abc.Stream, address: str) -> tuple[str | None, bytes] | None:
        """Answers one HTTP request; for a WebSocket upgrade it sends the 101 and returns
        the request's bearer token and the bytes read past the request."""
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        request = None
        try:
            with trio.move_on_after(HTTP_TIMEOUT):
                while request is None:
                    event = http.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(RECEIVE_SIZE)
                        if not data:
                            return
                        if data[0] == tls_.TLS_HANDSHAKE_BYTE and self.tls is None and http.their_state is h11.IDLE:
                            self._tls_failed(address, "a TLS client on the plaintext port: use http:// or ws://, "
                                                      "or start exocom serve with --tls-cert and --tls-key")
                            return
                        http.receive_data(data)
                    elif isinstance(event, h11.Request):
                        request = event
                    else:
                        return
            # h11 enforces its limit only on a head that is still incomplete: one that arrived whole in a single
            # read is measured here, so that the limit does not depend on how the bytes were split.
            if request is not None and len(request.target) + sum(
                    len(name) + len(value) + 4 for name, value in request.headers) > MAX_REQUEST_HEAD:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint
            error = (f"request line and headers larger than {MAX_REQUEST_HEAD} bytes"
                     if status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE else f"bad HTTP request: {e}")
            await respond(stream, http, status, {"error": error})
            return
        if request is None:
            return
        target = request.target.decode("latin-1")
        path = target.split("?", 1)[0]
        headers = {k.lower(): v for k, v in request.headers}
        if path == "/services" and headers.get(b"upgrade", b"").lower() == b"websocket":
            # h11 gives the request's end first, then pauses at the protocol
            # switch; what it read past the request (frames a client sent
            # without waiting for the 101) is the WebSocket's first bytes.
            event = http.next_event()
            if isinstance(event, h11.EndOfMessage):
                event = http.next_event()
            leftover = http.trailing_data[0] if event is h11.PAUSED else b""
            if await self._upgrade(stream, http, request):
                return bearer_token(request.headers), leftover
            return None
        # HEAD (health checkers use it) answers as GET, without the body.
        method = b"GET" if request.method == b"HEAD" else request.method
        refusal = endpoints.guard(self, method.decode("latin-1"), path, bearer_token(request.headers), address)
        if refusal is not None:
            status, body, challenge = refusal
            await respond(stream, http, status, body, with_body=request.method != b"HEAD", headers=challenge)
            return
        status, body = await endpoints.answer(self, method.decode("latin-1"), path)
        await respond(stream, http, status, body, with_body=request.method != b"HEAD")

    # --------------------------------------------------------------- per peer

    async def _upgrade(self, stream: trio.abc.Stream, http: h11.Connection, request: h11.Request) -> bool:
        """Sends the 101 that makes the connection a WebSocket, or the refusal (then False)."""
        if request.method != b"GET":
            # wsproto's initiate_upgrade_connection takes every request for a GET.
            await respond(stream, http, HTTPStatus.METHOD_NOT_ALLOWED,
                                {"error": f"a WebSocket upgrade must be a GET request, not {request.method.decode()}"},
                                headers=[(b"allow", b"GET")])
            return False
        handshake = H11Handshake(ConnectionType.SERVER)
        try:
            handshake.initiate_upgrade_connection(request.headers, request.target)
            accept = handshake.send(AcceptConnection())
        except HandshakeError as e:
            # wsproto says how to refuse: 426 with the versions it speaks for a Sec-WebSocket-Version other than 13.
            refusal = e.event_hint if isinstance(e.event_hint, RejectConnection) else RejectConnection()
            await respond(stream, http, refusal.status_code, {"error": f"bad WebSocket handshake: {e}"},
                                headers=refusal.headers)
            return False
        if self.stopping:
            return False
        await stream.send_all(accept)
        return True

    async def _websocket(self, stream: trio.abc.Stream, address: str, bearer: str | None, leftover: bytes,
                         cert_roles: frozenset[str] | None = None) -> None:
        conn_id = next(self._ids)
        peer = Peer(conn_id, address, stream)
        self.peers[conn_id] = peer
        self.execute(self.broker.connected(conn_id, address, time.time(), bearer=bearer, cert_roles=cert_roles))
        try:
            async with trio.open_nursery() as nursery:
                peer.cancel_scope = nursery.cancel_scope
                nursery.start_soon(self._writer, peer)
                await self._reader(peer, leftover)
                # Let the writer flush what is queued (e.g. a close frame), briefly.
                peer.closing = True
                peer.wakeup.set()
                nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT
        finally:
            self._disconnected(peer, peer.unsent + _messages_in(peer.outbox))

    def _disconnected(self, peer: Peer, unsent: list[bytes]) -> None:
        """The broker is done with the peer: what may follow (a lingering close) is the transport's.
        `unsent`: messages delivered to it that will never reach its socket, for the core to re-route."""
        if self.peers.pop(peer.id, None) is None:
            return
        if self._all_closed is not None and not self.peers:
            self._all_closed.set()
        self.execute(self.broker.disconnected(peer.id, time.time(), unsent))

    async def _linger(self, peer: Peer, decoder: FrameDecoder | None, data: bytes = b"") -> None:
        """The broker closed the connection: wait for the peer to finish, reading what it still sends, while the writer
        flushes the close frame (a peer blocked sending an oversized frame reads nothing)."""
        # The writer still flushes the outbox: only what never got into it goes elsewhere.
        self._disconnected(peer, peer.unsent)
        await discard_until_eof(peer.stream, decoder, data)

    async def _reader(self, peer: Peer, data: bytes) -> None:
        stream = peer.stream
        frame_received = self.broker.frame_received
        stats = self.broker.stats
        apply = self.apply
        flush = _nothing if self._flushing_before_io_wait else self.flush
        clock = time.time
        perf_counter = time.perf_counter
        decoder = FrameDecoder(self.limits.max_frame_bytes)
        conn = peer.id
        while True:
            if peer.closing:  # closed by the broker (a refusal, shutting down) while this task was reading
                await self._linger(peer, decoder, data)
                return
            if data:
                violation = None
                try:
                    frames = decoder.feed(data)
                except ProtocolError as e:
                    frames, violation = e.frames, e
                now = clock()
                ended = False
                for opcode, payload in frames:
                    if opcode == TEXT or opcode == BINARY:
                        started = perf_counter()
                        apply(frame_received(conn, payload, now))
                        stats.observe_latency(perf_counter() - started)
                        if peer.closing:
                            # The rest of `frames` is dropped (a close frame among them is missed: the linger then
                            # lasts until the peer closes its side or the bound passes).
                            ended = True
                            break
                    elif opcode == PING:
                        pong = frame(PONG, payload)
                        if peer.outbox_bytes + len(pong) > self.limits.max_outbox_bytes:
                            # Pings sent faster than their pongs are read: as any slow reader.
                            self._drop_slow_consumer(peer)
                            flush()
                            return
                        peer.push(pong)
                    elif opcode == CLOSE:
                        code, _ = parse_close(payload)
                        # Echo the peer's close code, as RFC 6455 asks (the decoder refused codes that may not be sent).
                        peer.close(1000 if code == 1005 else code, "")
                        flush()
                        return
                flush()
                if ended:
                    await self._linger(peer, decoder if violation is None else None)
                    return
                if violation is not None:
                    self._protocol_error(peer, violation, decoder.max_message)
                    await self._linger(peer, None)
                    return
            data = await receive(peer.socket, stream)
            if not data:
                return

    def _protocol_error(self, peer: Peer, e: ProtocolError, max_message: int) -> None:
        if e.code == CLOSE_TOO_LARGE:
            self.broker.stats.frames_too_large += 1
            self.log.warning("frame too large", conn=peer.id, peer=peer.address, limit_bytes=max_message,
                             reason="frames above the limit close the connection (--max-frame-bytes)")
        else:
            self.log.warning("protocol error", conn=peer.id, peer=peer.address, code=e.code, reason=e.reason)
        peer.close(e.code, e.reason)

    async def _writer(self, peer: Peer) -> None:
        stream = peer.stream
        while True:
            if not peer.outbox:
                if peer.closing:
                    # The end of our side: a peer that waits for the server to close first (RFC 6455 §7.1.1) closes
                    # its own, which ends the lingering close.
                    # TLS cannot half-close (trio.SSLStream has no send_eof): there the peer's close frame or
                    # CLOSE_TIMEOUT ends the lingering close.
                    if hasattr(stream, "send_eof"):
                        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                            await stream.send_eof()
                    return
                peer.wakeup = trio.Event()
                await peer.wakeup.wait()
                continue
            data = b"".join(peer.outbox)
            peer.outbox.clear()
            peer.sending = True
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                peer.closing = True
                if peer.cancel_scope is not None:
                    peer.cancel_scope.cancel()
                return
            finally:
                peer.sending = False
            peer.outbox_bytes -= len(data)
            if peer.congested and peer.outbox_bytes <= self.limits.outbox_low_water:
                peer.congested = False
                self.execute(self.broker.outbox_congested(peer.id, False))


def _nothing() -> None:
    pass


async def receive(sock: trio.socket.SocketType | None, stream: trio.abc.Stream) -> bytes:
    """The next bytes from the peer; b"" once it closed or reset the connection.
    On a plain socket it waits for data and then reads, instead of trying a
    read first as trio's socket does: on request/reply traffic that read
    nearly always fails, a wasted system call per message."""
    if sock is None:
        return await receive_or_eof(stream)
    while True:
        try:
            await wait_readable(sock)
            return read_now(sock.fileno(), RECEIVE_SIZE)
        except BlockingIOError:
            continue  # woken without data after all
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError):
            return b""


wait_readable = trio.lowlevel.wait_readable
read_now = os.read
# The non-blocking write of `Server.flush` (a name of its own so that a test can count the calls).
write_now = os.writev
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16


def _drop_sent(outbox: list[bytes], sent: int) -> None:
    """Removes the first `sent` bytes from `outbox`. The rest of a frame the
    socket took in part stays a bytearray, so that `_messages_in` never takes
    it for a whole message."""
    i = 0
    while sent and sent >= len(outbox[i]):
        sent -= len(outbox[i])
        i += 1
    if sent:
        outbox[i] = bytearray(outbox[i][sent:])
    del outbox[:i]


def _messages_in(outbox: list[bytes]) -> list[bytes]:
    """The messages in an outbox, without their frame headers and without
    control frames: a message is a JSON object (it starts with "{"), a frame
    header or a control frame starts with its FIN bit set (0x8_); the rest
    of a frame that went out in part is a bytearray."""
    return [data for data in outbox if data.__class__ is bytes and data[:1] == b"{"]
