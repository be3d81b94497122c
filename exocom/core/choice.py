"""Which instance of a role gets a message: the routing policy (contract 3, 7, 8).

In this order:

1. Affinity: the instance already on the activity, whatever its version --
   but a held version only when it asked on this activity itself (its
   deployment may query others), and a failed one never.
2. A `version` requirement: the newest live, draining or drained version
   that satisfies it; a ramping version only when no other one does.
3. Otherwise a new activity: a ramping version takes it when the activity's
   bucket falls within its share, else the stable version (the newest live
   one) does -- or, while no stable version is connected, the ramping one. The bucket is a hash of the activity id, so the choice is the
   same every time it is made for one activity, reproducible in tests, and
   an activity that started on the new version stays there as its share
   grows.

Within a version, round robin (`VersionPool.pick`). Each step is a few
dictionary lookups: `RoleView` is recomputed when states change, not per
message.

In a cluster the versions are the cluster's: a version connected only to
other brokers (`Elsewhere`) takes part in every choice above like a local
one, and when it is chosen `choose` answers None with that version as the
reason, for the router to hand the message over (`cluster.Cluster`). A
version connected here is always preferred to the same version elsewhere.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from zlib import crc32

from .registry import HELD, RAMPING, SERVING, Instance, Registry, VersionPool
from .versions import Requirement, Version

BUCKETS = 10_000  # shares are chosen in hundredths of a percent
# Affinity reaches these whoever started the activity.
_AFFINITY = SERVING | {RAMPING}


class Elsewhere(NamedTuple):
    """A version of a role that has instances only on other brokers of the cluster, with
    its state there (the cluster's: live, draining or ramping)."""

    role: str
    version: Version
    profile: Any  # routes.CompiledProfile
    state: str

    def pick(self) -> None:
        return None  # no instance here: the message is handed over

    def __str__(self) -> str:
        return f"{self.role}@{self.version} is connected only to another broker, which is gone now"


class RoleView(NamedTuple):
    stable: VersionPool | None  # the stable version when it is connected here
    # (pool, first bucket, end bucket): a ramping version takes the activities
    # whose bucket is in [first, end); several ramps of one role share the range.
    # The ranges are the cluster's, so that an activity lands on one version whichever broker places it.
    ramping: tuple[tuple[VersionPool | Elsewhere, int, int], ...]
    stable_elsewhere: Elsewhere | None = None  # the stable version when it is connected only to other brokers
    elsewhere: tuple[Elsewhere, ...] = ()  # every serving or ramping version connected only to other brokers


def bucket_of(key: str) -> int:
    return crc32(key.encode()) % BUCKETS


class Choice:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.views: dict[str, RoleView] = {}
        self._unkeyed = 0  # messages with neither activity nor id spread round robin over the buckets

    def choose(self, role: str, public: str, activity: dict | None, requirement: Requirement | None,
               key: str | None = None) -> tuple[Instance | None, str | Elsewhere]:
        """The instance of `role` that gets `public`, or None and why not (in a cluster: or the
        version elsewhere that gets it). `key` (the activity id, else the message id) places a new activity."""
        if activity is not None:
            member = activity.get(role)
            if member is not None:
                instance = self.registry.by_conn.get(abs(member))
                if instance is not None and public in instance.profile.receives and (
                    instance.pool.state in _AFFINITY or (member > 0 and instance.pool.state == HELD)
                ):
                    return instance, ""
        if requirement is not None:
            return self._required(role, public, requirement)
        view = self.views.get(role)
        if view is None:
            return None, f"no instance of {role!r} is connected"
        if view.ramping:
            if key is None:
                self._unkeyed = bucket = (self._unkeyed + 1) % BUCKETS
            else:
                bucket = bucket_of(key)
            for pool, first, end in view.ramping:
                if first <= bucket < end and public in pool.profile.receives:
                    if pool.__class__ is Elsewhere:
                        return None, pool
                    return pool.pick(), ""
        stable = view.stable
        if stable is not None and public in stable.profile.receives:
            return stable.pick(), ""
        if stable is None:
            elsewhere = view.stable_elsewhere
            if elsewhere is not None:
                if public in elsewhere.profile.receives:
                    return None, elsewhere
                return None, f"the stable version {role}@{elsewhere.version} does not receive {public!r}"
            # No stable version left (its instances are gone): a ramping version,
            # in production and judged by its gates, beats losing the message.
            for pool, _, _ in view.ramping:
                if public in pool.profile.receives:
                    return _picked(pool)
            return None, f"no live version of {role!r} is connected (held, failed, draining or drained versions " \
                         "get no new activities)"
        return None, f"the stable version {role}@{stable.version} does not receive {public!r}"

    def _required(self, role: str, public: str, requirement: Requirement) -> tuple[Instance | None, str | Elsewhere]:
        best: tuple[int, Version, VersionPool | Elsewhere] | None = None  # (serving, version, pool)
        for pool in self.registry.pools.get(role, ()):  # newest first
            if public in pool.profile.receives and requirement.matches(pool.version):
                if pool.state in SERVING:
                    best = (1, pool.version, pool)
                    break
                if pool.state == RAMPING and best is None:
                    best = (0, pool.version, pool)
        view = self.views.get(role)
        for other in view.elsewhere if view is not None else ():
            if public in other.profile.receives and requirement.matches(other.version):
                rank = (1 if other.state in SERVING else 0, other.version)
                if best is None or rank > best[:2]:
                    best = (*rank, other)
        if best is not None:
            return _picked(best[2])
        return None, f"no live version of {role!r} satisfies version {requirement.text!r}"


def _picked(pool: VersionPool | Elsewhere) -> tuple[Instance | None, str | Elsewhere]:
    """A pool's next instance, or, for a version elsewhere, None and that version."""
    if pool.__class__ is Elsewhere:
        return None, pool
    return pool.pick(), ""

