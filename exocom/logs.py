"""Structured logging: every log line is a structlog event with stable field
names. JSON lines when stdout is not a terminal; a readable line on a
terminal, where deliveries show the classic Exocom arrow.

`configure` is for programs (`exocom serve`, the example services). The
client library (`exocom.relay`) never writes anywhere itself: it logs through
stdlib `logging` (logger `exocom.relay`, see `library_logger`), so the host
program decides where its lines go; `configure` renders them like its own."""

from __future__ import annotations

import logging
import os
import reprlib
import sys
import threading
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


class _Output:
    """Where log lines go: the configured stream until its reader goes away.

    `exocom serve | head` closes the broker's stdout early. The broker keeps
    serving (a fleet should not lose its broker with its log reader) and logs
    to stderr from then on, after one line saying so; if stderr is gone too,
    lines are dropped and the broker still serves (metrics and HTTP endpoints
    still tell how it is doing)."""

    def __init__(self, stream):
        self.stream = stream
        self._lock = threading.Lock()  # ledger threads log too: one line at a time

    def write_line(self, line: str) -> None:
        with self._lock:
            lost = self.stream
            try:
                lost.write(line + "\n")
                lost.flush()
                return
            except (BrokenPipeError, ValueError) as e:  # ValueError: the stream was closed in-process
                if lost is sys.__stderr__:
                    return
                self.stream = sys.__stderr__
                silence(lost)
                problem = f"{type(e).__name__}: {e}"
        get_logger().warning("log output closed: logging to stderr", error=problem)
        self.write_line(line)

    # structlog calls the method named for the level; every level is one line.
    msg = debug = info = warning = error = critical = exception = write_line


def silence(stream) -> None:
    """Point a dead stream's file descriptor at /dev/null, so that the
    interpreter's flush at exit (and any later print) does not fail on it."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


class _OutputHandler(logging.Handler):
    """Renders stdlib records (the relay's, a library's) into the same output."""

    def __init__(self, output: _Output, level: int):
        super().__init__(level)
        self.output = output

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.output.write_line(line)


# The attribute of a stdlib record that carries a library event's fields.
FIELDS_ATTRIBUTE = "exocom_fields"


def _library_fields(_logger, _name, event_dict):
    """A library's record rendered as an event of its own, fields included."""
    fields = getattr(event_dict.get("_record"), FIELDS_ATTRIBUTE, None)
    if fields:
        event_dict.update(fields)
    return event_dict


def _to_logging(_logger, _name, event_dict):
    """Final processor of `library_logger`: a readable message for any
    logging setup, and the fields on the record for `configure`'s."""
    fields = {k: v for k, v in event_dict.items() if k not in ("event", "exc_info")}
    message = event_dict["event"] + "".join(f" {k}={v!r}" for k, v in fields.items())
    return (message,), {"exc_info": event_dict.get("exc_info"), "extra": {FIELDS_ATTRIBUTE: {**fields, "event": event_dict["event"]}}}


def library_logger(name: str):
    """A structlog logger that goes through stdlib `logging` whatever structlog's
    global configuration is: for library code, which must not pick where lines go."""
    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=[structlog.stdlib.filter_by_level, _printable_fields, _to_logging],
        wrapper_class=structlog.stdlib.BoundLogger,
    )


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
        renderer = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(serializer=_orjson_dumps)]
    else:
        renderer = [_console_arrow, structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    output = _Output(stream)
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *_: output,
        cache_logger_on_first_use=False,
    )
    # The relay's records, rendered as this program's own events.
    handler = _OutputHandler(output, getattr(logging, level.upper()))
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[_library_fields, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer]))
    exocom_logger = logging.getLogger("exocom")
    for old in [h for h in exocom_logger.handlers if isinstance(h, _OutputHandler)]:
        exocom_logger.removeHandler(old)
    exocom_logger.addHandler(handler)
    exocom_logger.setLevel(getattr(logging, level.upper()))
    exocom_logger.propagate = False  # configured here: a root handler of the host would print it twice


def get_logger():
    return structlog.get_logger("exocom")
