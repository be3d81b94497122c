"""What the sans-I/O core asks the I/O shell to do. The core returns lists of
these; the shell carries them out in order."""

from __future__ import annotations

from typing import Any, NamedTuple


def shown(value: Any) -> str:
    """A client's value inside a log reason or an error: strings quoted and
    cut short, anything else by its type (a list nested 1000 deep has no
    printable repr, a 1 MB name no place in a log line)."""
    if isinstance(value, str):
        return repr(value if len(value) <= 100 else value[:100] + "...")
    return f"a value of type {type(value).__name__}"


class Deliver(NamedTuple):
    """Send one encoded JSON text frame to a connection."""

    conn: int
    data: bytes


class Redeliver(NamedTuple):
    """Send a frame queued for an instance that is gone to another one, if
    its outbox has room: a receiver is never dropped as a slow consumer for
    taking over somebody else's backlog (the frame is counted as lost)."""

    conn: int
    data: bytes


class Close(NamedTuple):
    """Close a connection with a WebSocket close code and a readable reason."""

    conn: int
    code: int
    reason: str


class Log(NamedTuple):
    level: str
    event: str
    fields: dict[str, Any]


class WriteRecord(NamedTuple):
    """Append a record to the durable ledger, then report it back with
    `Broker.record_written` (and only then act on it)."""

    record: dict[str, Any]


# Close codes for refusals (4000-4999 is the application range of RFC 6455).
CLOSE_NOT_REGISTERED = 4000
CLOSE_UNKNOWN_ROLE = 4001
CLOSE_BAD_VERSION = 4002
CLOSE_ALREADY_REGISTERED = 4003
CLOSE_BAD_REGISTRATION = 4004
# The role was removed from the configuration by a reload: reconnecting would be refused with 4001.
CLOSE_ROLE_REMOVED = 4005
# The role needs a token (tokenFile/tokenEnv/tokenSha256) and none or a wrong one came.
CLOSE_UNAUTHORIZED = 4006
# The role is not among those the connection's TLS client certificate names (URI SAN exocom:role:NAME).
CLOSE_NOT_IN_CERTIFICATE = 4007
# Too many unauthorized registrations from this host lately: refused without looking (registration.Throttle).
CLOSE_THROTTLED = 4008
CLOSE_TOO_LARGE = 1009
CLOSE_GOING_AWAY = 1001


class HandOver(NamedTuple):
    """Cluster: hand one encoded entry to another broker through Redis (`cluster.Cluster`)."""

    broker: str
    data: bytes
