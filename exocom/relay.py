"""The Python Exorelay: a trio client for services and deployment scripts.

    async with open_relay("ws://127.0.0.1:4100/services", "todos", "1.0.0") as relay:
        @relay.handler("todos.list")
        async def list_todos(message):
            await message.reply("todos.listing", load_todos())
        await trio.sleep_forever()

It connects with retry and exponential backoff, registers with role and
version, and registers again after the broker restarts. `request` sends a
message and awaits the answer(s) on the same activity.
"""

from __future__ import annotations

import json
import math
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from .logs import get_logger


class RelayError(Exception):
    """Base of the errors a caller can act on."""


class RequestTimeout(RelayError):
    pass


class RelayClosed(RelayError):
    pass


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

    async def reply(self, name: str, payload: Any = None) -> str:
        """Answer on the same activity, with `responseTo` set to this message."""
        return await self.relay.send(name, payload, activity_id=self.activity_id, response_to=self.id,
                                     auth=self.raw.get("auth"))


Handler = Callable[[Message], Awaitable[Any]]


class Relay:
    def __init__(self, url: str, role: str, version: str | None = None, *,
                 min_backoff: float = 0.05, max_backoff: float = 5.0):
        self.url = url
        self.role = role
        self.version = version
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.handlers: dict[str, Handler] = {}
        self.log = get_logger().bind(relay=role)
        self._ws = None
        self._online = trio.Event()
        self._waiting: dict[str, trio.MemorySendChannel] = {}
        self._closed = False
        self._dispatch_scope = trio.CancelScope()
        self.registrations = 0

    # ------------------------------------------------------------- handlers

    def handler(self, name: str) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            self.handlers[name] = fn
            return fn
        return register

    # -------------------------------------------------------------- sending

    async def wait_online(self, timeout: float = math.inf) -> None:
        with trio.fail_after(timeout):
            await self._online.wait()

    async def send(self, name: str, payload: Any = None, *, version: str | None = None,
                   activity_id: str | None = None, response_to: str | None = None, auth: Any = None,
                   timeout: float = 10.0) -> str:
        """Send a message; returns its activity id. Waits (up to `timeout`) while disconnected."""
        if self._closed:
            raise RelayClosed(f"relay {self.role} is closed")
        frame: dict[str, Any] = {"name": name, "sender": self.role, "id": new_id(),
                                 "activityId": activity_id or new_id(), "payload": payload}
        if version is not None:
            frame["version"] = version
        if response_to is not None:
            frame["responseTo"] = response_to
        if auth is not None:
            frame["auth"] = auth
        data = json.dumps(frame)
        try:
            with trio.fail_after(timeout):
                while True:
                    await self._online.wait()
                    try:
                        await self._ws.send_message(data)
                        return frame["activityId"]
                    except ConnectionClosed:
                        await trio.sleep(0)  # the connection task notices and reconnects
        except trio.TooSlowError:
            raise RequestTimeout(f"could not send {name!r}: not connected to {self.url} for {timeout}s") from None

    async def request(self, name: str, payload: Any = None, *, timeout: float = 10.0,
                      version: str | None = None) -> Message:
        """Send and wait for the first answer on the same activity."""
        async with self._exchange(name, payload, timeout, version) as next_answer:
            return await next_answer()

    async def stream(self, name: str, payload: Any = None, *, final: Callable[[Message], bool],
                     timeout: float = 10.0, version: str | None = None) -> list[Message]:
        """Send and collect every answer on the activity until `final(answer)` is
        true; `timeout` bounds the whole exchange."""
        answers = []
        async with self._exchange(name, payload, timeout, version) as next_answer:
            while not answers or not final(answers[-1]):
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
                return await receive_channel.receive()
            raise RequestTimeout(f"no answer to {name!r} within {timeout}s")

        try:
            await self.send(name, payload, version=version, activity_id=activity_id, timeout=timeout)
            yield next_answer
        finally:
            self._waiting.pop(activity_id, None)

    # ------------------------------------------------------------ receiving

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected until cancelled: connect, register, dispatch, reconnect."""
        backoff = self.min_backoff
        started = False
        async with trio.open_nursery() as handlers:
            while not self._closed:
                try:
                    async with open_websocket_url(self.url, message_queue_size=64) as ws:
                        register = {"name": "exocom.register-service", "sender": self.role, "id": new_id(),
                                    "activityId": new_id(), "payload": {"clientName": self.role}}
                        if self.version:
                            register["payload"]["version"] = self.version
                        await ws.send_message(json.dumps(register))
                        self._ws = ws
                        self.registrations += 1
                        self._online.set()
                        backoff = self.min_backoff
                        self.log.info("relay online", url=self.url, version=self.version)
                        if not started:
                            started = True
                            task_status.started(self)
                        # close() cancels only the dispatch loop, so that this task, which
                        # owns the WebSocket, closes it with a clean close handshake.
                        with self._dispatch_scope:
                            await self._dispatch(ws, handlers)
                except (OSError, HandshakeError, ConnectionClosed, trio.BrokenResourceError) as e:
                    reason = getattr(getattr(e, "reason", None), "reason", None) or str(e) or type(e).__name__
                    if self._online.is_set() and not self._closed:
                        self.log.warning("relay disconnected", reason=reason)
                    code = getattr(getattr(e, "reason", None), "code", None)
                    if code is not None and 4000 <= code < 5000:
                        raise RelayError(f"the broker refused {self.role}: {reason} (close code {code})") from None
                finally:
                    self._ws = None
                    if self._online.is_set():
                        self._online = trio.Event()
                if self._closed:
                    handlers.cancel_scope.cancel()
                    break
                self._dispatch_scope = trio.CancelScope()
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    async def _dispatch(self, ws, handlers: trio.Nursery) -> None:
        while True:
            data = await ws.get_message()
            try:
                raw = json.loads(data)
                message = Message(self, raw["name"], raw.get("payload"), raw.get("id"), raw.get("activityId"), raw)
            except (ValueError, KeyError, TypeError):
                self.log.warning("relay got an unreadable frame", frame=str(data)[:200])
                continue
            waiting = self._waiting.get(message.activity_id)
            if waiting is not None and message.name not in self.handlers:
                waiting.send_nowait(message)
                continue
            handler = self.handlers.get(message.name)
            if handler is None:
                if waiting is not None:
                    waiting.send_nowait(message)
                else:
                    self.log.warning("no handler for message", name=message.name, activity_id=message.activity_id)
                continue
            handlers.start_soon(self._handle, handler, message)

    async def _handle(self, handler: Handler, message: Message) -> None:
        try:
            await handler(message)
        except Exception as e:
            self.log.exception("handler failed", name=message.name, error=str(e))

    def close(self) -> None:
        """Stop: the connection task closes the WebSocket and ends."""
        self._closed = True
        self._dispatch_scope.cancel()


@asynccontextmanager
async def open_relay(url: str, role: str, version: str | None = None, **options) -> AsyncIterator[Relay]:
    """A connected, registered relay for the duration of the block."""
    relay = Relay(url, role, version, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        try:
            yield relay
        finally:
            relay.close()
            nursery.cancel_scope.deadline = trio.current_time() + 5


class DeploymentScript:
    """Write a deployment script as two functions; the answers are sent for you.

        script = DeploymentScript("todo-search", "0.0.1", online=fill_index)
        async with open_relay(url, "todo-search-deployment") as relay:
            script.attach(relay)
            await trio.sleep_forever()

    Each step function gets the relay; returning means done, raising means
    failed with the exception text as the reason.
    """

    def __init__(self, role: str, version: str, *, offline: Callable[[Relay], Awaitable[Any]] | None = None,
                 online: Callable[[Relay], Awaitable[Any]] | None = None):
        self.role = role
        self.version = version
        self.steps = {"offline": offline, "online": online}

    def attach(self, relay: Relay) -> None:
        for step, fn in self.steps.items():
            relay.handler(f"deployment-{self.role}-{self.version}-{step}-start")(self._runner(step, fn))

    def _runner(self, step: str, fn):
        async def run(message: Message) -> None:
            prefix = f"deployment-{self.role}-{self.version}-{step}"
            try:
                if fn is not None:
                    await fn(message.relay)
            except Exception as e:
                message.relay.log.error("deployment step failed", step=step, error=str(e))
                await message.reply(f"{prefix}-failed", {"reason": f"{type(e).__name__}: {e}"})
            else:
                await message.reply(f"{prefix}-done")
        return run
