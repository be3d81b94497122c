"""Registration: the first frame of a WebSocket names its role and version.

A connection is pending until its registration is accepted; a refusal
closes it with a code in 4000-4004 (4007: a role its TLS client
certificate does not name), and one that does not register within
`REGISTRATION_TIMEOUT` is closed with 4000 (an idle unregistered connection
only holds a file descriptor).
"""

from __future__ import annotations

from typing import Any

from .actions import (
    CLOSE_BAD_REGISTRATION,
    CLOSE_BAD_VERSION,
    CLOSE_NOT_IN_CERTIFICATE,
    CLOSE_NOT_REGISTERED,
    CLOSE_UNKNOWN_ROLE,
    Close,
    Log,
    shown,
)
from .registry import Instance, Registry
from .routes import RoutingTable
from .stats import Stats
from .versions import UNVERSIONED, InvalidVersion, Version

REGISTER = "exocom.register-service"
REGISTRATION_TIMEOUT = 10.0


class Registrations:
    def __init__(self, table: RoutingTable, registry: Registry, stats: Stats) -> None:
        self.table = table
        self.registry = registry
        self.stats = stats
        # Connected, not yet registered: conn -> (peer, connected at), oldest first.
        self.pending: dict[int, tuple[str, float]] = {}
        # TLS client certificates: conn -> the roles its certificate names (only while pending, only with --tls-client-ca).
        self.cert_roles: dict[int, frozenset[str]] = {}

    def connected(self, conn: int, peer: str, now: float, *, cert_roles: frozenset[str] | None = None) -> None:
        self.pending[conn] = (peer, now)
        if cert_roles is not None:
            self.cert_roles[conn] = cert_roles

    def closed(self, conn: int) -> bool:
        """Forget a connection that closed before registering; False if it had registered."""
        self.cert_roles.pop(conn, None)
        return self.pending.pop(conn, None) is not None

    def register(self, conn: int, message: Any, now: float, state_of) -> tuple[Instance | None, list]:
        """The first frame of `conn`: the new instance (joining in the state
        `state_of(role, version)` gives), or None and the refusal."""
        if message.__class__ is not dict or message.get("name") != REGISTER:
            return None, self._refuse(conn, CLOSE_NOT_REGISTERED,
                                      f"register first: the first frame must be a JSON object named {REGISTER!r}")
        role = message.get("sender")
        if role.__class__ is not str or not role:
            return None, self._refuse(conn, CLOSE_BAD_REGISTRATION, "the registration needs the role as a string 'sender'")
        routes = self.table.roles.get(role)
        if routes is None:
            return None, self._refuse(conn, CLOSE_UNKNOWN_ROLE, f"role {shown(role)} is not in the routing configuration")
        # TLS client certificate (--tls-client-ca): the certificate names the roles its holder may register as.
        allowed = self.cert_roles.pop(conn, None)
        if allowed is not None and role not in allowed:
            return None, self._refuse(conn, CLOSE_NOT_IN_CERTIFICATE, (
                f"role {shown(role)} is not allowed by the client certificate (it names "
                f"{', '.join(sorted(allowed)) or 'no role'}): issue a certificate with the URI SAN exocom:role:{role}"))
        payload = message.get("payload")
        raw_version = payload.get("version") if isinstance(payload, dict) else None
        if raw_version is None:
            version = UNVERSIONED
        else:
            try:
                version = Version(raw_version)
            except InvalidVersion as e:
                return None, self._refuse(conn, CLOSE_BAD_VERSION, f"invalid version: {e}")
        peer, _ = self.pending.pop(conn, ("?", now))
        instance = Instance(conn, role, version, routes.profile_for(version), peer)
        instance.metric_key = (role, self.stats.version_label(role, str(version)))
        self.registry.add(instance, state_of(role, version)[0])
        return instance, []

    def overdue(self, now: float) -> list:
        """Close every connection that did not register in time."""
        actions: list = []
        while self.pending:
            conn, (_, since) = next(iter(self.pending.items()))
            if now - since < REGISTRATION_TIMEOUT:
                break  # the others connected later
            actions += self._refuse(conn, CLOSE_NOT_REGISTERED,
                                    f"no registration within {REGISTRATION_TIMEOUT:g}s of connecting")
        return actions

    def _refuse(self, conn: int, code: int, reason: str) -> list:
        peer, _ = self.pending.pop(conn, ("?", 0.0))
        self.cert_roles.pop(conn, None)
        self.stats.registrations_refused[code] += 1
        return [Log("warning", "registration refused", {"peer": peer, "conn": conn, "code": code, "reason": reason}),
                Close(conn, code, reason)]
