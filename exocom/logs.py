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


# Client strings (message names, unknown roles, ids) end up in log fields: a
# 1 MB name must not make a 1 MB log line.
MAX_FIELD_CHARS = 500


def _bounded_strings(_logger, _name, event_dict):
    for key, value in event_dict.items():
        if value.__class__ is str and len(value) > MAX_FIELD_CHARS:
            event_dict[key] = f"{value[:MAX_FIELD_CHARS]}...(+{len(value) - MAX_FIELD_CHARS} chars)"
    return event_dict


def _printable(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        try:
            orjson.dumps(value, default=str)
        except (TypeError, ValueError):
            return reprlib.repr(value)
    return value


def _never_fails(renderer):
    """A client's id or activityId may be any JSON value, nested deeper than a
    renderer can go: such values are shown shortened instead of losing the line."""
    def render(logger, name, event_dict):
        original = dict(event_dict)  # renderers pop fields as they go
        try:
            return renderer(logger, name, event_dict)
        except (TypeError, ValueError, RecursionError):
            return renderer(logger, name, {k: _printable(v) for k, v in original.items()})
    return render


def _orjson_dumps(obj: Any, **_kw) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure(fmt: str | None = None, level: str = "info", stream=None) -> None:
    stream = stream or sys.stdout
    if fmt is None:
        fmt = "console" if stream.isatty() else "json"
    shared = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _bounded_strings,
    ]
    if fmt == "json":
        processors = [*shared, structlog.processors.format_exc_info,
                      _never_fails(structlog.processors.JSONRenderer(serializer=_orjson_dumps))]
    else:
        processors = [*shared, _console_arrow, _never_fails(structlog.dev.ConsoleRenderer(colors=stream.isatty()))]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get_logger():
    return structlog.get_logger("exocom")
