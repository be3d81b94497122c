"""Structured logging: every log line is a structlog event with stable field
names. JSON lines when stdout is not a terminal; a readable line on a
terminal, where deliveries show the classic Exocom arrow."""

from __future__ import annotations

import logging
import reprlib
import sys
from typing import Any

import orjson
import structlog

LEVELS = ("debug", "info", "warning", "error")


def arrow(event_dict: dict[str, Any]) -> str:
    """`web  --[ users create ]-[ mongo create ]->  users`, as Exocom 0.27 printed it."""
    sender_name, name, internal = event_dict.get("sender_name"), event_dict.get("name"), event_dict.get("internal_name")
    names = [n for n in dict.fromkeys((sender_name, name, internal)) if n]
    middle = "]-[ ".join(names)
    return f"{event_dict.get('sender')}  --[ {middle} ]->  {event_dict.get('receiver')}"


def _console_arrow(_logger, _name, event_dict):
    if event_dict.get("event") == "message delivered":
        line = arrow(event_dict)
        if event_dict.get("response_time_ms") is not None:
            line += f"  ( {event_dict['response_time_ms']:.3f} ms )"
        for key in ("sender", "receiver", "name", "internal_name", "sender_name", "response_time_ms"):
            event_dict.pop(key, None)
        event_dict["event"] = line
    return event_dict


# Client values end up in log fields: a 1 MB message name must not make a
# 1 MB log line, and an id nested 1000 lists deep (orjson writes 254, repr
# recurses) must not cost the line.
MAX_FIELD_CHARS = 500


def _printable_fields(_logger, _name, event_dict):
    for key, value in event_dict.items():
        cls = value.__class__
        if cls is str:
            if len(value) > MAX_FIELD_CHARS:
                event_dict[key] = f"{value[:MAX_FIELD_CHARS]}...(+{len(value) - MAX_FIELD_CHARS} chars)"
        elif cls is dict or cls is list:
            try:
                orjson.dumps(value, default=str)
            except (TypeError, ValueError):
                event_dict[key] = reprlib.repr(value)
    return event_dict


def _orjson_dumps(obj: Any, **_kw) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure(fmt: str | None = None, level: str = "info", stream=None) -> None:
    stream = stream or sys.stdout
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    shared = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _printable_fields,
    ]
    if fmt == "json":
        processors = [*shared, structlog.processors.format_exc_info,
                      structlog.processors.JSONRenderer(serializer=_orjson_dumps)]
    else:
        processors = [*shared, _console_arrow, structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get_logger():
    return structlog.get_logger("exocom")
