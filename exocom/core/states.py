"""The state of each connected version of a role (contract 8), and the
routing view that follows from it.

A version's deployment decides whether it is held, ramping or failed
(`Deployer.state_of`); among the versions free to serve, the newest one with
an instance connected is `live` -- the stable version -- and every older one
is `draining`: it gets only what affinity or a `version` requirement sends.
Once nothing has reached a draining version for the drain period and no
remembered activity points to its instances, it is `drained`: safe to stop.
A pinned message that reaches it later makes it draining again.

In a cluster the versions compared are the cluster's: a version connected
only to other brokers (`elsewhere`, from the presence table) can be the
stable one, which drains an older version connected here, and the ramps'
bucket ranges are laid out over every broker's versions alike.
"""

from __future__ import annotations

from typing import Any, Callable

from .actions import Log
from .activities import Generations
from .choice import BUCKETS, Choice, Elsewhere, RoleView
from .registry import DRAINED, DRAINING, LIVE, RAMPING, Registry, VersionPool
from .stats import Stats
from .versions import Version


class VersionStates:
    def __init__(self, registry: Registry, choice: Choice, stats: Stats, activities: Generations, *,
                 state_of: Callable[[str, Version], tuple[str, float]], drain_period: float):
        self.registry = registry
        self.choice = choice
        self.stats = stats
        self.activities = activities
        # (state, share in percent) of role@version as its deployment has it.
        self.state_of = state_of
        self.drain_period = drain_period
        # The draining and drained pools, in the order they became so: all that
        # `tick` looks at, so that a tick costs nothing per live pool (role).
        self.quiet: dict[VersionPool, None] = {}
        # In a cluster (`cluster.Cluster.versions_elsewhere`): the versions of a role connected only to
        # other brokers, with their profiles.
        self.elsewhere: Callable[[str], list[tuple[Version, Any]]] = lambda role: []

    def refresh(self, role: str, now: float, actions: list) -> None:
        """Recompute the states of `role`'s versions and its routing view."""
        stable = stable_elsewhere = None
        ramping = []
        elsewhere: list[Elsewhere] = []
        first = 0
        versions: list[tuple[Version, VersionPool | None, Any]] = [
            (pool.version, pool, None) for pool in self.registry.pools.get(role, ())]  # newest first
        others = self.elsewhere(role)
        if others:
            versions += [(version, None, profile) for version, profile in others]
            versions.sort(key=lambda v: v[0], reverse=True)
        for version, pool, profile in versions:
            state, share = self.state_of(role, version)
            if state == RAMPING:
                end = min(BUCKETS, first + round(share * BUCKETS / 100))
                ramping.append((pool if pool is not None else Elsewhere(role, version, profile, RAMPING), first, end))
                first = end
            if pool is None:
                # Connected only to other brokers: a place in the view, no state of its own here.
                if state == LIVE:
                    other = Elsewhere(role, version, profile, LIVE if stable is None and stable_elsewhere is None
                                      else DRAINING)
                    if other.state == LIVE:
                        stable_elsewhere = other
                    elsewhere.append(other)
                elif state == RAMPING:
                    elsewhere.append(ramping[-1][0])
                continue
            if state == LIVE:
                if stable is None and stable_elsewhere is None:
                    stable = pool
                elif pool.state not in (DRAINING, DRAINED):
                    state = DRAINING
                else:
                    state = pool.state
            if state != pool.state:
                self._enter(pool, state, now, actions)
        if stable is None and stable_elsewhere is None and not ramping and role not in self.registry.pools:
            self.choice.views.pop(role, None)
        else:
            self.choice.views[role] = RoleView(stable, tuple(ramping), stable_elsewhere, tuple(elsewhere))

    def refresh_all(self, now: float, actions: list) -> None:
        for role in [*self.registry.pools, *(r for r in self.choice.views if r not in self.registry.pools)]:
            self.refresh(role, now, actions)

    def tick(self, now: float, actions: list) -> None:
        """Draining versions that have been quiet long enough are drained;
        drained ones that got something again are draining."""
        for pool in list(self.quiet):
            if not pool.instances:
                del self.quiet[pool]  # its last instance is gone: the registry has dropped it
            elif pool.state == DRAINING:
                delivered = self._deliveries(pool)
                if delivered != pool.quiet_deliveries:
                    pool.quiet_since, pool.quiet_deliveries = now, delivered
                elif now - pool.quiet_since >= self.drain_period and now >= pool.next_scan_at:
                    # The scan walks every remembered activity: at most once per drain period.
                    pool.next_scan_at = now + self.drain_period
                    if not self._remembered(pool):
                        self._enter(pool, DRAINED, now, actions)
            elif pool.state == DRAINED and self._deliveries(pool) != pool.quiet_deliveries:
                self._enter(pool, DRAINING, now, actions)

    def _enter(self, pool: VersionPool, state: str, now: float, actions: list) -> None:
        before, pool.state = pool.state, state
        self.registry.changed()
        if state == DRAINING or state == DRAINED:
            self.quiet[pool] = None
        else:
            self.quiet.pop(pool, None)
        if state == DRAINING:
            pool.quiet_since, pool.quiet_deliveries = now, self._deliveries(pool)
        fields = {"role": pool.role, "version": str(pool.version), "state": state, "was": before}
        if state == DRAINING:
            actions.append(Log("info", "version draining", {
                **fields, "reason": "a newer version is live: this one gets only what affinity or a version "
                                    f"requirement sends; drained after {self.drain_period:g}s without traffic"}))
        elif state == DRAINED:
            actions.append(Log("info", "version drained", {
                **fields, "quiet_s": round(now - pool.quiet_since, 3),
                "reason": "nothing reached it for the drain period and no activity points to it: safe to stop"}))
        elif before in (DRAINING, DRAINED) and state == LIVE:
            actions.append(Log("info", "version live again", {
                **fields, "reason": "no newer live version has an instance connected"}))

    def _deliveries(self, pool: VersionPool) -> int:
        key = pool.instances[0].metric_key if pool.instances else None
        return self.stats.deliveries.get(key, 0)

    def _remembered(self, pool: VersionPool) -> bool:
        """Whether a remembered activity points to one of its instances."""
        conns = {i.conn for i in pool.instances}
        role = pool.role
        for activity in self.activities.values():
            member = activity.get(role)
            if member is not None and abs(member) in conns:
                return True
        return False
