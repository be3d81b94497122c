"""Drive the sans-I/O broker core directly: no sockets, no trio."""

from __future__ import annotations

import itertools
import json
from typing import Any

import orjson

from exocom.core.actions import Close, Deliver, Log, Redeliver, WriteRecord
from exocom.core.broker import Broker
from exocom.core.config import parse_service_data


class Harness:
    def __init__(self, service_data: dict, *, records=(), auto_write: bool = True, **options):
        self.config = parse_service_data(service_data, "test")
        self.now = 1000.0
        self.broker = Broker(self.config, ledger_records=list(records), now=self.now, **options)
        self.inbox: dict[int, list[dict]] = {}
        self.closed: dict[int, tuple[int, str]] = {}
        self.logs: list[Log] = []
        self.ledger: list[dict] = list(records)
        self.unwritten: list[dict] = []
        self.auto_write = auto_write
        self._ids = itertools.count(1)
        self._msg_ids = itertools.count(1)

    def run(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, (Deliver, Redeliver)):
                self.inbox.setdefault(action.conn, []).append(orjson.loads(action.data))
            elif isinstance(action, Close):
                self.closed[action.conn] = (action.code, action.reason)
            elif isinstance(action, Log):
                self.logs.append(action)
            elif isinstance(action, WriteRecord):
                self.unwritten.append(action.record)
        while self.auto_write and self.unwritten:
            self.write_one()

    def write_one(self) -> None:
        record = self.unwritten.pop(0)
        self.ledger.append(record)
        self.run(self.broker.record_written(record, self.now))

    def connect(self, role: str | None = None, version: str | None = None, payload: Any = None) -> int:
        conn = next(self._ids)
        self.run(self.broker.connected(conn, f"peer{conn}", self.now))
        if role is not None:
            self.register(conn, role, version, payload)
        return conn

    def register(self, conn: int, role: str, version: str | None = None, payload: Any = None) -> None:
        if payload is None and version is not None:
            payload = {"version": version}
        frame = {"name": "exocom.register-service", "sender": role, "id": "r"}
        if payload is not None:
            frame["payload"] = payload
        self.frame(conn, frame)

    def frame(self, conn: int, frame: Any) -> None:
        data = frame if isinstance(frame, (str, bytes)) else json.dumps(frame)
        self.run(self.broker.frame_received(conn, data, self.now))

    def send(self, conn: int, name: str, payload: Any = None, activity: str | None = None, **fields) -> dict:
        message = {"name": name, "id": f"m{next(self._msg_ids)}", "activityId": activity or f"a{next(self._msg_ids)}",
                   "payload": payload, **fields}
        self.frame(conn, message)
        return message

    def disconnect(self, conn: int, unsent: list[bytes] = ()) -> None:
        self.run(self.broker.disconnected(conn, self.now, list(unsent)))

    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.run(self.broker.tick(self.now))

    def take(self, conn: int) -> list[dict]:
        return self.inbox.pop(conn, [])

    def names(self, conn: int) -> list[str]:
        return [m["name"] for m in self.take(conn)]

    def events(self, level: str | None = None) -> list[str]:
        return [log.event for log in self.logs if level is None or log.level == level]

    def reload(self, service_data: dict) -> None:
        """The broker runs with this configuration from now on (`Broker.reconfigure`)."""
        self.config = parse_service_data(service_data, "test")
        self.run(self.broker.reconfigure(self.config, self.now))
