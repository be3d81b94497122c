"""The Python Exorelay: a trio client for services and deployment scripts.

    async with open_relay("ws://127.0.0.1:4100/services", "todos", "1.0.0") as relay:
        @relay.handler("todos.list")
        async def list_todos(message):
            await message.reply("todos.listing", load_todos())
        await trio.sleep_forever()

    async with open_relay(url, "web") as relay:
        answer = await relay.request("todos.list", timeout=5)
        old = await relay.request("todos.list", version="1")     # any todos 1.x.y

It connects with retry and exponential backoff, registers with role and
version, and registers again after the broker restarts. `open_relay` returns
once the broker accepted the registration. `request` sends a message and
awaits the answer on the same activity; `stream` collects several answers.

Errors a caller can act on are exceptions (all `RelayError`):
`RequestTimeout` (no answer in time, or not connected in time), `RelayClosed`
(the relay was closed), `RegistrationRefused` (the broker closed the
connection with a code in 4000-4999: unknown role, invalid version, ...; the
relay does not retry it), `ConnectionLost` (a send bound to one connection
with `session=` after that connection was lost). A message without a handler is logged, not fatal.

The broker does not acknowledge a registration. The relay sends a WebSocket
ping right after the registration frame: the broker handles frames in order,
so a pong means the registration was accepted, and a refusal closes the
connection before the ping is answered.
"""

from __future__ import annotations

import json
import math
import os
import ssl
import urllib.parse
import uuid
import contextlib
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionTimeout,
    DisconnectionTimeout,
    HandshakeError,
    open_websocket_url,
)

from ..logs import library_logger

REGISTER = "exocom.register-service"


class RelayError(Exception):
    """Base of the errors a caller can act on."""


class RequestTimeout(RelayError):
    """No answer within the time limit (or no connection to send on)."""


class RelayClosed(RelayError):
    """The relay was closed; it sends and receives nothing any more."""


class ConnectionLost(RelayError):
    """The connection a send was bound to (`send(..., session=...)`) is gone;
    nothing was sent. The peer's state of that connection went with it."""


class RegistrationRefused(RelayError):
    """The broker refused the registration (close code 4000-4999); retrying
    would not help: fix the role, the version or the routing configuration."""

    def __init__(self, message: str, code: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass
class Message:
    """A message this service received."""

    relay: Relay
    name: str
    payload: Any
    id: str | None
    activity_id: str | None
    raw: dict = field(repr=False)
    # Which connection of the relay it arrived on (see `Relay.session`).
    session: int = field(default=0, repr=False)

    async def reply(self, name: str, payload: Any = None, **options) -> str:
        """Answer on the same activity, with `responseTo` set to this message,
        so that the broker delivers the answer to the asker only."""
        return await self.relay.send(name, payload, activity_id=self.activity_id, response_to=self.id,
                                     auth=self.raw.get("auth"), is_security=self.raw.get("isSecurity"), **options)


Handler = Callable[[Message], Awaitable[Any]]


class Relay:
    """One connection of one service instance to the broker.

    Use `open_relay`; or call `run` in a nursery yourself and `close` it."""

    def __init__(self, url: str | Sequence[str], role: str, version: str | None = None, *,
                 min_backoff: float = 0.05, max_backoff: float = 5.0, close_timeout: float = 2.0,
                 ssl_context: ssl.SSLContext | None = None, token: str | None = None):
        # Several brokers of one cluster: a list (or "ws://a/services,ws://b/services"); after a failed connect
        # or a lost connection the next one is tried, so that a dead broker's services move to a live one.
        self.urls = [u.strip() for u in (url.split(",") if isinstance(url, str) else url) if u.strip()]
        if not self.urls:
            raise ValueError("no broker URL given")
        self.url = self.urls[0]
        # For wss:// URLs: whom to trust and, when the broker asks for one, the client certificate
        # (`tls_context`); None: the system's CAs, no client certificate.
        self.ssl_context = ssl_context
        # The role's token (its `tokenFile`/`tokenEnv`/`tokenSha256` in the routing file), sent as
        # `Authorization: Bearer` on the upgrade, never in a frame; default: $EXOCOM_TOKEN.
        token = token if token is not None else os.environ.get("EXOCOM_TOKEN") or None
        self._headers = [(b"authorization", b"Bearer " + token.encode())] if token else None
        self.role = role
        self.version = version
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.close_timeout = close_timeout
        self.handlers: dict[str, Handler] = {}
        self.log = library_logger("exocom.relay").bind(relay=role)
        # Public counters: accepted registrations (1 + reconnections), attempts
        # to connect, and messages dropped for lack of a handler.
        self.registrations = 0
        self.connect_attempts = 0
        self.unhandled = 0
        self.session = 0
        # The session whose WebSocket is open right now (None between two).
        self._open_session: int | None = None
        # Why the last attempt to connect failed, for error messages.
        self.problem: str | None = None
        # Set when the relay stopped for good on a refusal.
        self.error: RelayError | None = None
        self._ws = None
        self._online = trio.Event()  # set while registered; replaced when the connection ends
        self._closed = False
        self._changed = trio.Event()  # set and replaced on every change of state
        self._stopped = trio.Event()
        self._waiting: dict[str, trio.MemorySendChannel] = {}
        # While not None, messages without a handler are kept here instead of
        # dropped: `open_relay` keeps those that arrive before its block had
        # a chance to register its handlers (a deployment step's start
        # message comes right after the registration).
        self._held: list[Message] | None = None
        self._handlers: trio.Nursery | None = None  # where handlers run: `run`'s nursery
        # The scope `close()` cancels: around connecting and waiting to retry,
        # and inside an open connection -- never around the block that owns the
        # WebSocket, so that leaving it closes the WebSocket with a close
        # handshake from the task that owns it (closing it from another task
        # lost trio-websocket's close handshake and hung).
        self._stop_scope = trio.CancelScope()

    # ------------------------------------------------------------- handlers

    def handler(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator: `fn(message)` handles each message called `name`."""
        def register(fn: Handler) -> Handler:
            self.handlers[name] = fn
            return fn
        return register

    # ---------------------------------------------------------------- state

    @property
    def online(self) -> bool:
        """Connected and registered."""
        return self._online.is_set() and self._ws is not None

    @property
    def closed(self) -> bool:
        """`close()` was called, or the relay stopped on a refusal."""
        return self._closed

    @property
    def stopped(self) -> bool:
        """The connection task ended: the WebSocket is closed."""
        return self._stopped.is_set()

    @property
    def pending_requests(self) -> int:
        """Requests and streams waiting for answers."""
        return len(self._waiting)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _stopped_error(self) -> RelayError:
        """A fresh exception for why the relay does not work any more."""
        e = self.error
        if isinstance(e, RegistrationRefused):
            return RegistrationRefused(str(e), e.code, e.reason)
        if e is not None:
            return type(e)(*e.args)
        return RelayClosed(f"relay {self.role} is closed")

    async def wait_online(self, timeout: float = math.inf) -> None:
        """Until connected and registered; `RequestTimeout` after `timeout`
        seconds, `RelayClosed`/`RelayError` if the relay stops meanwhile."""
        await self._connection(trio.current_time() + timeout, f"relay {self.role} to register")

    async def _connection(self, deadline: float, what: str, session: int | None = None):
        with trio.move_on_at(deadline):
            while True:
                if self._closed:
                    raise self._stopped_error()
                if session is not None and self._open_session != session:
                    raise ConnectionLost(f"the connection to {self.url} that {what} was bound to is lost")
                if self.online:
                    return self._ws
                await self._changed.wait()
        raise RequestTimeout(f"gave up waiting for {what}: not connected to {self.url}")

    # -------------------------------------------------------------- sending

    async def send(self, name: str, payload: Any = None, *, version: str | None = None,
                   activity_id: str | None = None, response_to: str | None = None, auth: Any = None,
                   is_security: bool | None = None, timeout: float = 10.0, session: int | None = None) -> str:
        """Send a message; returns its activity id. `version` is a requirement
        on the receiving role's version ("2", "2.1", "2.1.3"). While
        disconnected it waits up to `timeout` seconds for the connection.
        `session` (a `Message.session`) sends only on the connection that
        message arrived on, and raises `ConnectionLost` once it is gone: for
        answers that mean nothing to a later connection."""
        if self._closed:
            raise self._stopped_error()
        frame: dict[str, Any] = {"name": name, "sender": self.role, "id": new_id(),
                                 "activityId": activity_id or new_id(), "payload": payload}
        if version is not None:
            frame["version"] = version
        if response_to is not None:
            frame["responseTo"] = response_to
        if auth is not None:
            frame["auth"] = auth
        if is_security is not None:
            frame["isSecurity"] = is_security
        data = json.dumps(frame)
        deadline = trio.current_time() + timeout
        while True:
            ws = await self._connection(deadline, f"a connection to send {name!r}", session)
            try:
                await ws.send_message(data)
                return frame["activityId"]
            except ConnectionClosed:
                # The connection task notices, reconnects and registers again.
                with trio.move_on_at(deadline):
                    while self._ws is ws and not self._closed:
                        await self._changed.wait()

    async def request(self, name: str, payload: Any = None, *, timeout: float = 10.0,
                      version: str | None = None) -> Message:
        """Send and wait for the first answer on the same activity."""
        async with self._exchange(name, payload, timeout, version) as next_answer:
            return await next_answer()

    async def stream(self, name: str, payload: Any = None, *, final: str | Callable[[Message], bool],
                     timeout: float = 10.0, version: str | None = None) -> list[Message]:
        """Send and collect every answer on the activity until the final one:
        `final` is its message name, or a test `final(answer) -> bool`.
        `timeout` bounds the whole exchange."""
        is_final = (lambda m: m.name == final) if isinstance(final, str) else final
        answers: list[Message] = []
        async with self._exchange(name, payload, timeout, version) as next_answer:
            while not answers or not is_final(answers[-1]):
                answers.append(await next_answer())
        return answers

    @asynccontextmanager
    async def _exchange(self, name: str, payload: Any, timeout: float, version: str | None):
        activity_id = new_id()
        send_channel, receive_channel = trio.open_memory_channel(math.inf)
        self._waiting[activity_id] = send_channel
        deadline = trio.current_time() + timeout

        async def next_answer() -> Message:
            # The deadline is re-entered per answer: no cancel scope spans a yield.
            with trio.move_on_at(deadline):
                try:
                    return await receive_channel.receive()
                except trio.EndOfChannel:
                    raise self._stopped_error() from None
            raise RequestTimeout(f"no answer to {name!r} within {timeout:g}s")

        try:
            await self.send(name, payload, version=version, activity_id=activity_id,
                            timeout=max(deadline - trio.current_time(), 0))
            yield next_answer
        finally:
            self._waiting.pop(activity_id, None)
            send_channel.close()
            receive_channel.close()

    # ------------------------------------------------------------ receiving

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected until `close()`: connect, register, dispatch, and
        reconnect with backoff. Signals `task_status.started(self)` at the
        first accepted registration; raises `RegistrationRefused` when the
        broker refuses a registration."""
        try:
            async with trio.open_nursery() as nursery:
                # Handlers run in this nursery too; they are cancelled when the relay stops.
                self._handlers = nursery

                async def connect_loop():
                    try:
                        await self._connect_loop()
                    finally:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(connect_loop)
                while self.registrations == 0 and not self._closed:
                    await self._changed.wait()
                if self.registrations:
                    task_status.started(self)
        finally:
            self._closed = True
            self._ws = None
            for channel in list(self._waiting.values()):
                channel.close()
            self._notify()
            self._stopped.set()
        if self.error is not None:
            raise self.error

    async def _connect_loop(self) -> None:
        backoff = self.min_backoff
        failures = 0
        while not self._closed:
            self._stop_scope = scope = trio.CancelScope()
            self.connect_attempts += 1
            registrations = self.registrations
            close = problem = None
            with scope:
                try:
                    if self.url.startswith("wss://"):
                        await _check_tls(self.url, self.ssl_context)
                    async with open_websocket_url(self.url, self.ssl_context, message_queue_size=64,
                                                  extra_headers=self._headers,
                                                  disconnect_timeout=self.close_timeout) as ws:
                        close = await self._session(ws)
                except ConnectionClosed as e:
                    close = e.reason
                except (OSError, HandshakeError, ConnectionTimeout, DisconnectionTimeout,
                        trio.BrokenResourceError) as e:
                    problem = _describe(e)
            if self._closed:
                return
            code = getattr(close, "code", None)
            reason = getattr(close, "reason", None)
            if code is not None and 4000 <= code <= 4999:
                self.error = RegistrationRefused(
                    f"the broker at {self.url} refused {self.role}"
                    + (f"@{self.version}" if self.version else "")
                    + f": {reason or 'no reason given'} (close code {code})", code, reason)
                self.log.error("relay registration refused", url=self.url, version=self.version, code=code,
                               reason=reason)
                self._closed = True
                return
            self.problem = problem or (f"the broker closed the connection (code {code}{': ' + reason if reason else ''})"
                                       if code is not None else None)
            if self.registrations > registrations:
                backoff, failures = self.min_backoff, 0
                self.log.warning("relay disconnected", url=self.url, code=code, reason=reason or problem,
                                 retry_in_s=backoff)
            else:
                failures += 1
                level = "warning" if failures == 1 else "debug"
                getattr(self.log, level)("relay cannot connect", url=self.url, attempt=failures,
                                         problem=problem or f"closed with code {code} {reason or ''}".strip(),
                                         retry_in_s=backoff)
            self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]
            self._stop_scope = scope = trio.CancelScope()
            if self._closed:
                return
            with scope:
                await trio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    async def _session(self, ws):
        """One connection: register, confirm, dispatch until it closes. Returns
        the close reason, or None when `close()` ended it."""
        self._stop_scope = scope = trio.CancelScope()
        if self._closed:
            return None
        self.session += 1
        session = self._open_session = self.session
        register = {"name": REGISTER, "sender": self.role, "id": new_id(), "activityId": new_id(),
                    "payload": {"clientName": self.role}}
        if self.version:
            register["payload"]["version"] = self.version
        close = None
        try:
            with scope:
                await ws.send_message(json.dumps(register))
                async with trio.open_nursery() as confirm:
                    confirm.start_soon(self._confirm_registration, ws)
                    try:
                        await self._dispatch(ws, session)
                    except ConnectionClosed as e:
                        close = e.reason
                    confirm.cancel_scope.cancel()
        except ConnectionClosed as e:
            close = e.reason
        finally:
            self._open_session = None
            if self._ws is ws:
                self._ws = None
            if self._online.is_set():
                self._online = trio.Event()
            self._notify()
        return close

    async def _confirm_registration(self, ws) -> None:
        try:
            await ws.ping()
        except ConnectionClosed:
            return  # refused or lost: the dispatch loop sees why
        self._ws = ws
        self._online.set()
        self.registrations += 1
        self._notify()
        self.log.info("relay online", url=self.url, version=self.version, registrations=self.registrations)

    async def _dispatch(self, ws, session: int) -> None:
        while True:
            data = await ws.get_message()
            try:
                raw = json.loads(data)
                message = Message(self, raw["name"], raw.get("payload"), raw.get("id"), raw.get("activityId"),
                                  raw, session)
            except (ValueError, KeyError, TypeError):
                self.log.warning("relay got an unreadable frame", frame=str(data)[:200])
                continue
            self._deliver(message)

    def _deliver(self, message: Message) -> None:
        waiting = self._waiting.get(message.activity_id)
        handler = self.handlers.get(message.name)
        if waiting is not None and handler is None:
            try:
                waiting.send_nowait(message)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
        elif handler is not None:
            self._handlers.start_soon(self._handle, handler, message)
        elif self._held is not None:
            self._held.append(message)
        else:
            self.unhandled += 1
            self.log.warning("no handler for message", name=message.name, activity_id=message.activity_id,
                             handlers=sorted(self.handlers))

    def _release_held(self) -> None:
        held, self._held = self._held, None
        for message in held or ():
            self._deliver(message)

    async def _handle(self, handler: Handler, message: Message) -> None:
        try:
            await handler(message)
        except RelayClosed:
            pass
        except Exception as e:
            self.log.exception("handler failed", name=message.name, error=str(e))

    def close(self) -> None:
        """Stop (from any task): the connection task closes the WebSocket with a
        close handshake and ends; waiting requests raise `RelayClosed`."""
        if self._closed:
            return
        self._closed = True
        self._stop_scope.cancel()
        for channel in list(self._waiting.values()):
            channel.close()
        self._notify()

    async def aclose(self) -> None:
        """Close and wait (up to `close_timeout`) until the connection is closed."""
        self.close()
        with trio.move_on_after(self.close_timeout):
            await self._stopped.wait()


async def _check_tls(url: str, context: ssl.SSLContext | None) -> None:
    """A TLS handshake with the broker, to fail at once with the reason: trio-websocket waits out its 60 s connect
    timeout when the handshake fails under it (python-trio/trio-websocket#199). One more handshake per connection
    attempt, none per message."""
    parts = urllib.parse.urlsplit(url)
    problem = None
    try:
        stream = await trio.open_ssl_over_tcp_stream(parts.hostname, parts.port or 443,
                                                     ssl_context=context or ssl.create_default_context(),
                                                     https_compatible=True)
        try:
            with trio.fail_after(10):
                await stream.do_handshake()
        finally:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.aclose()
    except trio.TooSlowError:
        problem = f"no TLS handshake with {parts.netloc} within 10s: is it a TLS port?"
    except trio.BrokenResourceError as e:
        cause = e.__cause__ or e
        hint = (" (is the broker serving plaintext? then use ws://)"
                if isinstance(cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError))
                or getattr(cause, "reason", None) == "WRONG_VERSION_NUMBER" else "")
        problem = f"TLS handshake with {parts.netloc} failed: {cause}{hint}"
    if problem is not None:
        # Raised outside the handler: `_describe` reads the innermost exception of a HandshakeError's chain.
        raise HandshakeError(problem)


def _describe(e: BaseException) -> str:
    """A short text for why connecting failed: "Connection refused" rather
    than trio-websocket's wrapper or trio's "all attempts ... failed"."""
    while isinstance(e, HandshakeError) and (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    cause = e.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        first = cause.exceptions[0]
        return f"{e}: {getattr(first, 'strerror', None) or first}"
    return str(e) or type(e).__name__


def _reraise(exc: BaseException):
    """Raise `exc` out of the nursery's exception group without chaining the
    group to it (which would print it twice)."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context


@asynccontextmanager
async def open_relay(url: str | Sequence[str], role: str, version: str | None = None, *, connect_timeout: float = math.inf,
                     setup: Callable[[Relay], Any] | None = None, **options) -> AsyncIterator[Relay]:
    """A connected, registered relay for the duration of the block.

    `url` may name several brokers of one cluster (a list, or one string with
    commas): the relay connects to the first and, whenever a connection
    fails or is lost, tries the next one.

    `setup(relay)` is called before the relay connects: register handlers
    there (or `DeploymentScript.attach`) when a message may arrive as soon as
    the relay is registered, as a deployment step's start message does.

    Waits (retrying with backoff) until the broker accepts the registration,
    or raises `RequestTimeout` after `connect_timeout` seconds (default: wait
    as long as it takes); raises `RegistrationRefused` if the broker refuses
    it (4006: a missing or wrong `token=`, default $EXOCOM_TOKEN; 4008: too
    many of those from this host lately). If the broker refuses a later
    registration (after it restarted with another configuration), the block is
    cancelled and `RegistrationRefused` raised. Leaving the block closes the
    connection cleanly, also on an exception or Ctrl-C."""
    relay = Relay(url, role, version, **options)
    if setup is not None:
        setup(relay)
    refused_in_block = False
    gave_up = None
    try:
        async with trio.open_nursery() as nursery:
            in_block = False

            async def run() -> None:
                nonlocal refused_in_block
                try:
                    await relay.run()
                except RelayError:
                    if in_block:
                        refused_in_block = True
                        nursery.cancel_scope.cancel()

            relay._held = []
            nursery.start_soon(run)
            with trio.move_on_after(connect_timeout):
                while relay.registrations == 0 and not relay.closed:
                    await relay._changed.wait()
            if relay.registrations == 0 and not relay.closed:
                relay.close()
                gave_up = RequestTimeout(f"could not register {role} with the broker at {url} within "
                                         f"{connect_timeout:g}s" + (f": {relay.problem}" if relay.problem else ""))
            if relay.error is None and not relay.closed:
                in_block = True

                async def release_held() -> None:
                    # Runs once the block reached its first checkpoint: by then
                    # it registered the handlers it registers right away.
                    relay._release_held()

                nursery.start_soon(release_held)
                try:
                    yield relay
                finally:
                    in_block = False
                    relay.close()
                    with trio.CancelScope(shield=True) as scope:
                        scope.deadline = trio.current_time() + relay.close_timeout
                        await relay._stopped.wait()
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            _reraise(group.exceptions[0])
        raise
    if relay.error is not None and (refused_in_block or relay.registrations == 0):
        raise relay._stopped_error()
    if gave_up is not None:
        raise gave_up


class DeploymentScript:
    """Write a deployment script as two functions; the answers are sent for you.

        async def fill_index(relay): ...

        script = DeploymentScript("todo-search", "0.0.1", online=fill_index)
        async with open_relay(url, "todo-search-deployment", setup=script.attach):
            await trio.sleep_forever()

    Each step function gets the relay; returning means done
    (`deployment-R-V-<step>-done`), raising means failed
    (`deployment-R-V-<step>-failed` with the exception text as the reason).
    A missing function is a step with nothing to do: it is answered done at
    once. The broker may start a step again (after a crash or a lost
    connection): steps must be safe to run twice. Runs never overlap: a new
    start cancels a run that is still going (the broker gave up on it), and a
    run that outlived its connection is not answered.
    """

    def __init__(self, role: str, version: str, *, offline: Callable[[Relay], Awaitable[Any]] | None = None,
                 online: Callable[[Relay], Awaitable[Any]] | None = None):
        self.role = role
        self.version = version
        self.steps = {"offline": offline, "online": online}
        self._lock = trio.Lock()
        self._current: trio.CancelScope | None = None

    def message_name(self, step: str, outcome: str) -> str:
        return f"deployment-{self.role}-{self.version}-{step}-{outcome}"

    def attach(self, relay: Relay) -> None:
        for step, fn in self.steps.items():
            relay.handler(self.message_name(step, "start"))(self._runner(step, fn))

    def _runner(self, step: str, fn):
        async def run(message: Message) -> None:
            relay = message.relay
            attempt = message.payload.get("attempt") if isinstance(message.payload, dict) else None
            log = relay.log.bind(deployment=f"{self.role}@{self.version}", step=step, attempt=attempt)
            # The broker starts a step only when the previous one is over as far
            # as it knows (answered, failed, or its connection was lost): a run
            # still going is stale. Stop it, so that runs never overlap.
            scope = trio.CancelScope()
            previous, self._current = self._current, scope
            if previous is not None:
                previous.cancel()
            try:
                with scope:
                    async with self._lock:
                        log.info("deployment step started")
                        try:
                            if fn is not None:
                                await fn(relay)
                        except RelayClosed:
                            return
                        except Exception as e:
                            reason = f"{type(e).__name__}: {e}"
                            outcome, payload = "failed", {"reason": reason}
                            log.error("deployment step failed", reason=reason)
                        else:
                            outcome, payload = "done", None
                            log.info("deployment step done")
                        try:
                            # Only on the connection the start came on: the broker
                            # forgot this run with it, and a later connection may
                            # carry a new attempt of the step.
                            await message.reply(self.message_name(step, outcome), payload, session=message.session)
                        except ConnectionLost:
                            log.warning("deployment step not answered: the connection it started on was lost, "
                                        "the broker starts the step again", outcome=outcome)
                            return
                if scope.cancelled_caught:
                    log.warning("deployment step abandoned: the broker started a step again")
            finally:
                if self._current is scope:
                    self._current = None
        return run
