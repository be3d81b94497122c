"""A new routing configuration while the broker runs (`Broker.reconfigure`):
what a restart with the new file would give, without dropping a connection.

What derives from the configuration is rebuilt: the routing table, the
compiled profile of every connected instance, the deployments (each one
replayed from the ledger, as at startup), the scripts' targets, the gates'
error names, the security adapter. What is live is kept: connections,
activities, figures, and of a deployment that stays (same `role@version`)
its step in flight, the record being written and those queued behind it,
and the ramp's baseline. So:

- a new deployment holds its version at once (a connected instance of it
  stops getting new activities) and runs as soon as its script and its
  version are connected;
- a deployment whose `rollout` changed keeps its recorded step (the index
  into `steps`); the new steps, interval and gates apply from now on. A step
  index past the new last ramping step means the version is live, as it
  would be after a restart;
- a removed deployment is forgotten as a restart would forget it: its
  version is then treated like any version without a deployment (live,
  unless rolled back), its step in flight is abandoned (the script's late
  answer is refused as any message it may not send) and its queued ledger
  records are still written. Abort a ramp before removing its deployment if
  the version must not take all new activities;
- the connections of a removed role are closed with 4005; a kept role's
  connections stay, with the role's new sends, receives and translations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import deployments as dep
from .actions import CLOSE_ROLE_REMOVED, Close, Log, WriteRecord
from .config import Config, Profile
from .deployer import Deployer
from .registry import DRAINED, DRAINING, FAILED, HELD, LIVE, RAMPING
from .routes import CompiledProfile, RoutingTable
from .security import SecurityAdapter

if TYPE_CHECKING:
    from .broker import Broker

_STATE_EVENTS = {HELD: "version held", LIVE: "version live", RAMPING: "version ramping",
                 FAILED: "version taken out of production"}
# What an instance of a removed role may send or receive until its connection is gone: nothing.
_NOTHING = CompiledProfile(Profile())


def config_changes(old: Config, new: Config) -> dict[str, list[str]]:
    """What a reload from `old` to `new` adds and removes, as operators name it."""
    def deployments(config: Config) -> set[str]:
        return {str(target) for _, target, _ in config.deployments()}

    return {
        "rolesAdded": sorted(new.roles.keys() - old.roles.keys()),
        "rolesRemoved": sorted(old.roles.keys() - new.roles.keys()),
        "rolesChanged": sorted(r for r in old.roles.keys() & new.roles.keys() if old.roles[r] != new.roles[r]),
        "deploymentsAdded": sorted(deployments(new) - deployments(old)),
        "deploymentsRemoved": sorted(deployments(old) - deployments(new)),
    }


def reconfigure(broker: Broker, config: Config, now: float) -> list:
    actions: list = []
    states = {(p.role, p.version): p.state for pools in broker.registry.pools.values() for p in pools}

    broker.config = config
    broker.table = broker.router.table = table = RoutingTable(config)
    broker.registrations.reconfigured(table)
    removed_roles: dict[str, list[str]] = {}
    for instance in list(broker.registry.by_conn.values()):
        routes = table.roles.get(instance.role)
        if routes is None:
            instance.profile = instance.pool.profile = _NOTHING
            removed_roles.setdefault(instance.role, []).append(instance.label)
            actions.append(Close(instance.conn, CLOSE_ROLE_REMOVED,
                                 f"role {instance.role!r} was removed from the routing configuration"))
        else:
            instance.profile = instance.pool.profile = routes.profile_for(instance.version)
    for role, labels in removed_roles.items():
        actions.append(Log("warning", "role removed", {
            "role": role, "instances": labels, "code": CLOSE_ROLE_REMOVED,
            "reason": "the reloaded configuration has no such role: its connections are closed (reconnecting "
                      "is refused with 4001 until the role is configured again)"}))

    _redeclare(broker.deployer, config, now, actions)
    broker.router.script_targets = broker.deployer.script_targets()
    broker.ramps.declared()
    if not config.has_security:
        broker.security = None
    elif broker.security is None:
        broker.security = SecurityAdapter(broker.router, broker.registry, broker.budget,
                                          ttl=broker.activities.ttl, now=now)

    broker.states.refresh_all(now, actions)
    for pools in broker.registry.pools.values():
        for pool in pools:
            was = states.get((pool.role, pool.version))
            # Draining, drained and live again are logged by the refresh itself.
            if pool.state != was and pool.state in _STATE_EVENTS and not (
                    pool.state == LIVE and was in (DRAINING, DRAINED)):
                actions.append(Log("info" if pool.state != FAILED else "warning", _STATE_EVENTS[pool.state], {
                    "role": pool.role, "version": str(pool.version), "state": pool.state, "was": was,
                    "reason": "the configuration was reloaded"}))
    broker.deployer.advance_all(now, actions)
    return actions


def _redeclare(deployer: Deployer, config: Config, now: float, actions: list) -> None:
    old, old_rolled_back = deployer.deployments, deployer.rolled_back
    deployer.declare(config)
    new = deployer.deployments
    for key, why in old_rolled_back.items():
        if key not in new:
            deployer.rolled_back.setdefault(key, why)  # its record may not be written yet
    for key, d in new.items():
        before = old.get(key)
        if before is None:
            actions.append(_log("info", "deployment declared", d, state=d.state))
            continue
        d.writing, d.queued, d.taken_out = before.writing, before.queued, before.taken_out
        flight = before.in_flight
        if flight is None:
            continue
        if before.script_role == d.script_role:
            flight.deadline = flight.started_at + d.step_timeout
            d.in_flight = flight
        else:
            actions.append(_log("warning", "step interrupted", d, step=flight.step,
                                reason=f"its deployment script is now {d.script_role!r} (was {before.script_role!r}); "
                                       "the step runs again when that script is connected"))
    for key, d in old.items():
        if key in new:
            continue
        pending = [r for r in (d.writing, *d.queued) if r is not None]
        for record in pending:
            if record["step"] == dep.ROLLOUT and record["event"] == dep.ROLLED_BACK:
                deployer.rolled_back[key] = record.get("error") or "rolled back"
        # The one being written comes back by itself; the queued ones were decided too.
        actions.extend(WriteRecord(r) for r in d.queued)
        was = d.state
        in_flight = d.in_flight.step if d.in_flight else None
        now_state = deployer.state_of(d.target.role, d.target.version)[0]
        quiet = was in (LIVE, FAILED) and in_flight is None
        actions.append(_log("info" if quiet else "warning", "deployment removed", d, was=was, state=now_state,
                            abandoned_step=in_flight,
                            reason=f"no longer declared: {d.target} is treated as a version without a deployment "
                                   f"({now_state} when connected)"))


def _log(level: str, event: str, d: dep.Deployment, **fields: Any) -> Log:
    return Log(level, event, {"role": d.target.role, "version": str(d.target.version), "script": d.script_role,
                              **fields})
