"""The instance registry: which connection is which instance of which role
and version, grouped into version pools ordered newest first."""

from __future__ import annotations

from typing import Callable

from .routes import CompiledProfile
from .versions import Version

# Contract section 8. Production traffic: live all new activities (when it is
# the stable version), ramping its share of them, draining and drained only
# what affinity or a version requirement sends, held and failed none.
LIVE, HELD, FAILED = "live", "held", "failed"
RAMPING, DRAINING, DRAINED = "ramping", "draining", "drained"
# States a `version` requirement may reach (a ramping version only when no other satisfies it).
SERVING = frozenset((LIVE, DRAINING, DRAINED))


class Instance:
    __slots__ = ("conn", "role", "version", "profile", "peer", "pool", "metric_key",
                 "warning_window_start", "warnings_logged", "warnings_suppressed", "tokens", "tokens_at",
                 "congested")

    def __init__(self, conn: int, role: str, version: Version, profile: CompiledProfile, peer: str):
        self.conn = conn
        self.role = role
        self.version = version
        self.profile = profile
        self.peer = peer
        self.pool: VersionPool | None = None
        self.metric_key = (role, str(version))  # replaced by the broker with a capped label
        self.warning_window_start = float("-inf")
        self.warnings_logged = 0
        self.warnings_suppressed: dict[str, int] | None = None  # event -> count, while held back
        self.tokens = 0.0  # rate limit bucket; full at the first message
        self.tokens_at = float("-inf")
        self.congested = False  # its outbox is above the high-water mark: others of its pool go first

    @property
    def label(self) -> str:
        return f"{self.role}@{self.version}#{self.conn}"


class VersionPool:
    """The connected instances of one version of one role."""

    __slots__ = ("role", "version", "state", "instances", "profile", "_next", "quiet_since", "quiet_deliveries",
                 "next_scan_at")

    def __init__(self, role: str, version: Version, state: str, profile: CompiledProfile):
        self.role = role
        self.version = version
        self.state = state
        self.profile = profile
        self.instances: list[Instance] = []
        self._next = 0
        # While draining: since when nothing reached it, and the delivery count then.
        self.quiet_since = 0.0
        self.quiet_deliveries = 0
        self.next_scan_at = 0.0  # when it may be checked again for activities that point to it

    def pick(self) -> Instance:
        """Round robin (even load, reproducible in tests), passing over
        congested instances while another one has room: a stuck instance
        must not get every other message until it is dropped."""
        instances = self.instances
        n = len(instances)
        i = self._next = (self._next + 1) % n
        instance = instances[i]
        if instance.congested:
            for k in range(1, n):
                other = instances[(i + k) % n]
                if not other.congested:
                    self._next = (i + k) % n
                    return other
        return instance


class Registry:
    def __init__(self) -> None:
        self.by_conn: dict[int, Instance] = {}
        # role -> pools sorted newest version first
        self.pools: dict[str, list[VersionPool]] = {}
        # Called when an instance comes or goes or a version's state changes: in a cluster the shell
        # publishes what this broker holds at once, not at its next renewal (it sets an event; no I/O here).
        self.changed: Callable[[], None] = lambda: None

    def pool(self, role: str, version: Version) -> VersionPool | None:
        for p in self.pools.get(role, ()):
            if p.version == version:
                return p
        return None

    def add(self, instance: Instance, state: str) -> VersionPool:
        pool = self.pool(instance.role, instance.version)
        if pool is None:
            pool = VersionPool(instance.role, instance.version, state, instance.profile)
            pools = self.pools.setdefault(instance.role, [])
            pools.append(pool)
            pools.sort(key=lambda p: p.version, reverse=True)
        pool.instances.append(instance)
        instance.pool = pool
        self.by_conn[instance.conn] = instance
        self.changed()
        return pool

    def remove(self, conn: int) -> Instance | None:
        instance = self.by_conn.pop(conn, None)
        if instance is not None and instance.pool is not None:
            self.changed()
            pool = instance.pool
            pool.instances.remove(instance)
            if not pool.instances:
                self.pools[instance.role].remove(pool)
                if not self.pools[instance.role]:
                    del self.pools[instance.role]
        return instance

    def instances_of(self, role: str) -> list[Instance]:
        return [i for p in self.pools.get(role, ()) for i in p.instances]

    def clients(self) -> list[dict]:
        """`/config.json` "clients": roles with at least one connected instance."""
        out = []
        for role, pools in self.pools.items():
            out.append(
                {
                    "role": role,
                    "instances": sum(len(p.instances) for p in pools),
                    "versions": [
                        {"version": str(p.version), "state": p.state, "instances": len(p.instances)} for p in pools
                    ],
                }
            )
        return out
