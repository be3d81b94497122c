"""Which broker of a cluster holds which role versions: the presence table.

Every broker publishes what it holds -- per role and version, its state and
how many instances are connected -- with an expiry time (its lease), and
renews it well before the lease ends. This table is what one broker knows of
the others: the shell feeds it what it reads from Redis, and `expire` forgets
a broker whose lease passed without a renewal (it died, hangs, or lost
Redis), so that nothing is handed to a broker that cannot take it.

Plain data in, actions out: no clock, no I/O.
"""

from __future__ import annotations

from typing import Any

from .actions import Log
from .registry import Registry

# role -> version -> {"state": ..., "instances": n}
Holding = dict[str, dict[str, dict[str, Any]]]


def holding_of(registry: Registry) -> Holding:
    """What this broker holds now, as it publishes it."""
    return {role: {str(p.version): {"state": p.state, "instances": len(p.instances)} for p in pools}
            for role, pools in registry.pools.items()}


class Presence:
    def __init__(self, me: str) -> None:
        self.me = me
        self.holdings: dict[str, Holding] = {}  # broker id -> what it holds (never this broker)
        self.expires_at: dict[str, float] = {}
        # The roles whose holders changed since `cluster.Cluster` last recomputed their versions' states.
        self.changed: set[str] = set()

    def seen(self, broker: str, holding: Holding, expires_at: float, now: float) -> list:
        """`broker` published `holding`, good until `expires_at`."""
        if broker == self.me or expires_at <= now:
            return []
        actions = []
        if broker not in self.holdings:
            actions.append(Log("info", "cluster broker joined", {"broker": broker, "roles": sorted(holding)}))
        before = self.holdings.get(broker)
        if before != holding:
            before = before or {}
            self.changed.update(role for role in before.keys() | holding.keys() if before.get(role) != holding.get(role))
            self.holdings[broker] = holding
        # A renewal read late (an old pub/sub message) never shortens a lease.
        self.expires_at[broker] = max(expires_at, self.expires_at.get(broker, 0.0))
        return actions

    def left(self, broker: str) -> list:
        """`broker` said it is stopping: forget it now rather than after its lease."""
        holding = self.holdings.pop(broker, None)
        if holding is None:
            return []
        del self.expires_at[broker]
        self.changed.update(holding)
        return [Log("info", "cluster broker left", {"broker": broker})]

    def expire(self, now: float) -> list:
        """Forget every broker whose lease has passed."""
        actions = []
        for broker in [b for b, at in self.expires_at.items() if at <= now]:
            del self.expires_at[broker]
            self.changed.update(self.holdings.pop(broker))
            actions.append(Log("warning", "cluster broker lost", {
                "broker": broker, "reason": "its presence lease passed without a renewal (it stopped, hangs, or "
                                            "cannot reach Redis); nothing is handed to it until it renews"}))
        return actions

    def holders(self, role: str) -> list[tuple[str, str, dict[str, Any]]]:
        """(broker, version, {"state", "instances"}) of every other broker holding `role`."""
        return [(broker, version, entry) for broker, holding in self.holdings.items()
                for version, entry in holding.get(role, {}).items() if entry["instances"] > 0]

    def to_json(self, own: Holding) -> dict[str, Any]:
        """`/config.json` "cluster": every broker and what it holds."""
        brokers = [{"broker": self.me, "self": True, "roles": own}]
        brokers += [{"broker": b, "self": False, "roles": h, "expiresAt": self.expires_at[b]}
                    for b, h in sorted(self.holdings.items())]
        return {"broker": self.me, "brokers": brokers}
