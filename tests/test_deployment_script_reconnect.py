"""A deployment script whose connection drops while a step runs: the run that
ends while the script is disconnected must not answer on the next connection
(the broker would only log `deployment answer ignored`); the broker starts the
step again as a new attempt instead.

`exocom serve` runs as a subprocess; the script reaches it through a TCP
proxy in this process that the test cuts and reopens, the other services
connect directly."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager

import trio

from fleet import (NEW, OLD, ScriptLog, deployment, deployment_script, routes, steps, todos, wait_deployment,
                   relay_events, wait_until)
from processes import BrokerProcess


class CuttableProxy:
    """Forwards TCP connections to `port`; `cut()` drops the open ones and
    refuses new ones (they are closed at once) until `reopen()`."""

    def __init__(self, port: int):
        self.target = port
        self.port = 0
        self.open = True
        self._links: set[trio.CancelScope] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/services"

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._link, listeners)

    async def _link(self, client: trio.SocketStream) -> None:
        async with client:
            if not self.open:
                return
            async with await trio.open_tcp_stream("127.0.0.1", self.target) as server:
                with trio.CancelScope() as scope:
                    self._links.add(scope)
                    try:
                        async with trio.open_nursery() as pumps:
                            pumps.start_soon(self._pump, client, server)
                            pumps.start_soon(self._pump, server, client)
                    finally:
                        self._links.discard(scope)

    @staticmethod
    async def _pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            async for data in source:
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def cut(self) -> None:
        self.open = False
        for scope in list(self._links):
            scope.cancel()

    def reopen(self) -> None:
        self.open = True


@asynccontextmanager
async def broker_and_proxy(tmp_path):
    config = tmp_path / "routes.json"
    config.write_text(json.dumps(routes()))
    broker = BrokerProcess(tmp_path, "--config", str(config))
    await trio.to_thread.run_sync(broker.start)
    try:
        async with trio.open_nursery() as nursery:
            proxy = CuttableProxy(broker.port)
            await nursery.start(proxy.serve)
            yield broker, proxy
            nursery.cancel_scope.cancel()
    finally:
        broker.stop()


async def test_a_step_that_ends_while_disconnected_is_not_answered_on_the_next_connection(tmp_path):
    running, release, returned = trio.Event(), trio.Event(), trio.Event()
    runs = []

    async def offline(relay):
        runs.append(relay.session)
        if len(runs) == 1:
            running.set()
            await release.wait()
            returned.set()

    log = ScriptLog()
    async with broker_and_proxy(tmp_path) as (broker, proxy), todos(broker.url, OLD, []):
        with relay_events() as script_events:
            async with deployment_script(proxy.url, log, offline=offline) as script:
                async with todos(broker.url, NEW, []):
                    with trio.fail_after(5):
                        await running.wait()
                    proxy.cut()
                    await wait_until(lambda: not script.online, "the script to notice the lost connection")
                # todos 2.0.0 is away too: the broker starts nothing when the
                # script returns, so anything it gets about the step now comes
                # from the run of attempt 1.
                release.set()
                with trio.fail_after(5):
                    await returned.wait()
                proxy.reopen()
                await wait_until(lambda: script.registrations == 2, "the script to register again")
                # Frames of one connection are handled in order: once this is
                # answered, the broker has read whatever the script sent before.
                assert (await script.request("todos.list", version="1", timeout=5)).payload == {"version": OLD}
                assert steps(await deployment(broker.port)) == {"offline": ("started", 1), "online": ("pending", 0)}

                async with todos(broker.url, NEW, []):
                    d = await wait_deployment(broker.port, lambda d: d["finished"], "the deployment to finish")
                assert steps(d) == {"offline": ("done", 2), "online": ("done", 1)}
                assert log.starts == [("offline", 1), ("offline", 2), ("online", 1)]
                assert runs == [1, 2]

    ignored = [e for e in broker.events() if e["event"] == "deployment answer ignored"]
    assert ignored == [], "the script answered attempt 1 on its new connection"
    not_answered = [e for e in script_events if e["event"].startswith("deployment step not answered")]
    assert [(e["step"], e["attempt"], e["outcome"]) for e in not_answered] == [("offline", 1, "done")]
