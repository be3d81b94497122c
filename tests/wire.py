"""Test helpers: a real WebSocket client that speaks the Exocom wire protocol,
and a real broker server on 127.0.0.1 (in this process, on a free port)."""

from __future__ import annotations

import json
import uuid
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

import auth_mode
from exocom.core.broker import Broker
from exocom.core.config import parse_service_data
from exocom.server.ledger import SQLiteLedger
from exocom.server.listener import Limits, Server


def new_id() -> str:
    return str(uuid.uuid4())


class Service:
    """One service instance connected to the broker."""

    def __init__(self, ws, role: str):
        self.ws = ws
        self.role = role

    async def register(self, version: str | None = None, payload: Any = None) -> None:
        if payload is None and version is not None:
            payload = {"version": version}
        frame = {"name": "exocom.register-service", "sender": self.role, "id": new_id()}
        if payload is not None:
            frame["payload"] = payload
        await self.ws.send_message(json.dumps(frame))

    async def send(self, name: str, payload: Any = None, **fields) -> dict:
        frame = {"name": name, "sender": self.role, "id": new_id(), "activityId": new_id(), "payload": payload}
        frame.update(fields)
        await self.ws.send_message(json.dumps(frame))
        return frame

    async def send_raw(self, data) -> None:
        await self.ws.send_message(data)

    async def receive(self, timeout: float = 5.0) -> dict:
        with trio.fail_after(timeout):
            return json.loads(await self.ws.get_message())

    async def receive_nothing(self, seconds: float = 0.3) -> None:
        with trio.move_on_after(seconds):
            message = await self.ws.get_message()
            raise AssertionError(f"{self.role} got an unexpected message: {message}")

    async def closed_with(self, timeout: float = 5.0) -> tuple[int, str]:
        """Wait until the broker closes this connection; return code and reason."""
        with trio.fail_after(timeout):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as e:
                return e.reason.code, e.reason.reason


class RunningBroker:
    def __init__(self, server: Server, nursery):
        self.server = server
        self.broker = server.broker
        self.port = server.port
        self.url = f"ws://127.0.0.1:{self.port}/services"
        self.nursery = nursery

    @asynccontextmanager
    async def service(self, role: str, version: str | None = None, register: bool = True, payload: Any = None):
        async with open_websocket_url(self.url, extra_headers=auth_mode.HEADERS) as ws:
            service = Service(ws, role)
            if register:
                await service.register(version, payload)
                await self.wait_registered(role, version)
            yield service

    async def wait_registered(self, role: str, version: str | None = None) -> None:
        """Until the broker's registry lists the role (and version), as /config.json would."""
        with trio.fail_after(5):
            while True:
                for client in self.broker.config_json()["clients"]:
                    if client["role"] == role and (version is None or any(
                            v["version"] == version for v in client["versions"])):
                        return
                await trio.sleep(0.005)


@asynccontextmanager
async def running_broker(service_data: dict, tmp_path=None, limits: Limits | None = None, **broker_options):
    config = parse_service_data(auth_mode.with_tokens(service_data), "test")
    ledger = SQLiteLedger.in_state_dir(tmp_path) if tmp_path is not None else None
    records = ledger.load() if ledger else []
    broker = Broker(config, ledger_records=records, log_deliveries=True, **broker_options)
    server = Server(broker, ledger, limits, handle_signals=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, "127.0.0.1", 0)
        try:
            yield RunningBroker(server, nursery)
        finally:
            nursery.cancel_scope.cancel()
    if ledger:
        ledger.close()
