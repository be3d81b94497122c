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
"""

from __future__ import annotations

from typing import NamedTuple
from zlib import crc32

from .registry import HELD, RAMPING, SERVING, Instance, Registry, VersionPool
from .versions import Requirement

BUCKETS = 10_000  # shares are chosen in hundredths of a percent
# Affinity reaches these whoever started the activity.
_AFFINITY = SERVING | {RAMPING}


class RoleView(NamedTuple):
    stable: VersionPool | None
    # (pool, first bucket, end bucket): a ramping version takes the activities
    # whose bucket is in [first, end); several ramps of one role share the range.
    ramping: tuple[tuple[VersionPool, int, int], ...]


def bucket_of(key: str) -> int:
    return crc32(key.encode()) % BUCKETS


class Choice:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.views: dict[str, RoleView] = {}
        self._unkeyed = 0  # messages with neither activity nor id spread round robin over the buckets

    def choose(self, role: str, public: str, activity: dict | None, requirement: Requirement | None,
               key: str | None = None) -> tuple[Instance | None, str]:
        """The instance of `role` that gets `public`, or None and why not.
        `key` (the activity id, else the message id) places a new activity."""
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
                    return pool.pick(), ""
        stable = view.stable
        if stable is not None and public in stable.profile.receives:
            return stable.pick(), ""
        if stable is None:
            # No stable version left (its instances are gone): a ramping version,
            # in production and judged by its gates, beats losing the message.
            for pool, _, _ in view.ramping:
                if public in pool.profile.receives:
                    return pool.pick(), ""
            return None, f"no live version of {role!r} is connected (held, failed, draining or drained versions " \
                         "get no new activities)"
        return None, f"the stable version {role}@{stable.version} does not receive {public!r}"

    def _required(self, role: str, public: str, requirement: Requirement) -> tuple[Instance | None, str]:
        ramping = None
        for pool in self.registry.pools.get(role, ()):
            if public in pool.profile.receives and requirement.matches(pool.version):
                if pool.state in SERVING:
                    return pool.pick(), ""
                if pool.state == RAMPING and ramping is None:
                    ramping = pool
        if ramping is not None:
            return ramping.pick(), ""
        return None, f"no live version of {role!r} satisfies version {requirement.text!r}"

