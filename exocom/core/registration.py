"""Registration: the first frame of a WebSocket names its role and version.

A connection is pending until its registration is accepted; a refusal
closes it with a code in 4000-4004 (4007: a role its TLS client
certificate does not name), and one that does not register within
`REGISTRATION_TIMEOUT` is closed with 4000 (an idle unregistered connection
only holds a file descriptor).

A role with a credential (`tokenFile`/`tokenEnv`/`tokenSha256`) needs its
token, from `payload.token` or else the upgrade request's `Authorization:
Bearer`; a missing or wrong one closes with 4006. Its SHA-256 is compared
with the configured digest in constant time; the token is not kept, logged
or forwarded. Repeated 4006 from one host are slowed down (`Throttle`).
A role without a credential is open, as before: a token sent to it is ignored
(so that clients can send theirs before the role asks for it).
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from typing import Any

from .actions import (
    CLOSE_BAD_REGISTRATION,
    CLOSE_BAD_VERSION,
    CLOSE_NOT_IN_CERTIFICATE,
    CLOSE_NOT_REGISTERED,
    CLOSE_THROTTLED,
    CLOSE_UNAUTHORIZED,
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
MAX_TOKEN_LENGTH = 4096  # what a client may present; the broker reads only 16 KiB of headers anyway


def _digests(table: RoutingTable) -> dict[str, bytes | None]:
    """The roles that need a token, with the SHA-256 of it (None: not resolved, refuse every token)."""
    return {name: role.credential.sha256 for name, role in table.config.roles.items() if role.credential is not None}


class Throttle:
    """Slows down guessing: after `failures` unauthorized registrations within
    `window` seconds from one host, that host's registrations are refused at
    once with 4008 for `block` seconds (the first refusal of a block is
    logged, the rest only counted). Keyed by host, not host:port; remembers at
    most `max_hosts` hosts (the least recently failing is forgotten first)."""

    def __init__(self, failures: int = 5, window: float = 60.0, block: float = 30.0, max_hosts: int = 10_000):
        self.failures, self.window, self.block, self.max_hosts = failures, window, block, max_hosts
        self.recent: OrderedDict[str, list[float]] = OrderedDict()  # host -> failure times within the window
        self.blocked: dict[str, float] = {}  # host -> until

    def blocked_for(self, host: str, now: float) -> float:
        until = self.blocked.get(host)
        if until is None:
            return 0.0
        if now >= until:
            del self.blocked[host]
            return 0.0
        return until - now

    def failed(self, host: str, now: float) -> bool:
        """Count a failure; True when it starts a block."""
        times = [t for t in self.recent.pop(host, ()) if now - t < self.window]
        times.append(now)
        if len(times) >= self.failures:
            self.blocked[host] = now + self.block
            if len(self.blocked) > self.max_hosts:
                self.blocked.pop(min(self.blocked, key=self.blocked.__getitem__))
            return True
        self.recent[host] = times
        while len(self.recent) > self.max_hosts:
            self.recent.popitem(last=False)
        return False


def host_of(peer: str) -> str:
    return peer.rsplit(":", 1)[0]


class Registrations:
    def __init__(self, table: RoutingTable, registry: Registry, stats: Stats) -> None:
        self.table = table
        self.registry = registry
        self.stats = stats
        # Connected, not yet registered: conn -> (peer, connected at), oldest first.
        self.pending: dict[int, tuple[str, float]] = {}
        # The upgrade request's bearer token of a pending connection that sent one.
        self.bearers: dict[int, str] = {}
        self.digests = _digests(table)
        self.throttle = Throttle()
        # TLS client certificates: conn -> the roles its certificate names (only while pending, only with --tls-client-ca).
        self.cert_roles: dict[int, frozenset[str]] = {}

    def reconfigured(self, table: RoutingTable) -> None:
        self.table = table
        self.digests = _digests(table)

    def connected(self, conn: int, peer: str, now: float, *, bearer: str | None = None,
                  cert_roles: frozenset[str] | None = None) -> None:
        self.pending[conn] = (peer, now)
        if bearer is not None:
            self.bearers[conn] = bearer
        if cert_roles is not None:
            self.cert_roles[conn] = cert_roles

    def closed(self, conn: int) -> bool:
        """Forget a connection that closed before registering; False if it had registered."""
        self.bearers.pop(conn, None)
        self.cert_roles.pop(conn, None)
        return self.pending.pop(conn, None) is not None

    def _unauthorized(self, conn: int, role: str, payload: Any, now: float) -> list | None:
        """The refusal of a registration as `role` that lacks its token, else None."""
        bearer = self.bearers.pop(conn, None)
        if role not in self.digests:
            return None
        peer = self.pending.get(conn, ("?", now))[0]
        host = host_of(peer)
        wait = self.throttle.blocked_for(host, now)
        if wait:
            return self._refuse(conn, CLOSE_THROTTLED, f"too many unauthorized registrations from {host}: "
                                f"try again in {wait:.0f}s", role=role, log=False)
        token = payload.get("token") if isinstance(payload, dict) and "token" in payload else bearer
        expected = self.digests[role]
        if token is None:
            reason = f"role {shown(role)} needs a token: 'Authorization: Bearer TOKEN' or payload.token"
        elif token.__class__ is not str or not token or len(token) > MAX_TOKEN_LENGTH:
            reason = f"role {shown(role)}: the token must be a non-empty string of at most {MAX_TOKEN_LENGTH} characters"
        elif expected is None or not hmac.compare_digest(
                hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest(), expected):
            reason = f"role {shown(role)}: wrong token"
        else:
            return None
        actions = self._refuse(conn, CLOSE_UNAUTHORIZED, reason, role=role)
        if self.throttle.failed(host, now):
            actions.append(Log("warning", "registrations throttled", {
                "host": host, "seconds": self.throttle.block, "failures": self.throttle.failures,
                "window_s": self.throttle.window,
                "reason": "too many unauthorized registrations: every registration from this host is refused "
                          "with 4008 until then"}))
        return actions

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
        if self.digests or self.bearers:
            refusal = self._unauthorized(conn, role, payload, now)
            if refusal is not None:
                return None, refusal
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

    def _refuse(self, conn: int, code: int, reason: str, log: bool = True, **fields) -> list:
        peer, _ = self.pending.pop(conn, ("?", 0.0))
        self.bearers.pop(conn, None)
        self.cert_roles.pop(conn, None)
        self.stats.registrations_refused[code] += 1
        close = Close(conn, code, reason)
        if not log:
            return [close]
        return [Log("warning", "registration refused", {**fields, "peer": peer, "conn": conn, "code": code,
                                                        "reason": reason}), close]
