"""The ramp of a gradual rollout (contract 7): step up, judge, abort, and
what operators do to a ramp or to a live version.

A version whose deployment declares a `rollout` is `ramping` from the
moment its offline step is done, at `steps[0]` percent of new activities.
Once a step has lasted `interval`, the gates hold, the version has shown
enough replies to be judged and -- before the last step -- the online step
is done, the next step is recorded; the share grows only once the record
is on disk. A gate that fails aborts the ramp at once: the version's share
drops to 0 before the abort is recorded. Gates are judged on every reply
of a ramping version, on every disconnect of one of its instances, and on
every tick.

In a cluster the figures are the cluster's: every broker publishes what it
saw of each ramp since the ramp began (`seen_here`, with the presence), and
the gates judge this broker's figures plus the others' (`elsewhere`, from
`cluster.Cluster.figures_elsewhere`), against the cluster's stable version.
"""

from __future__ import annotations

from typing import Any

from . import deployments as dep
from .actions import Log, WriteRecord
from .deployer import Deployer
from .figures import Figures
from .gates import figures_of, has_evidence, judge
from .registry import DRAINED, DRAINING, FAILED, LIVE, RAMPING, Instance, Registry
from .stats import Stats
from .versions import Version

ACTIONS = ("pause", "resume", "promote", "abort")
_NOTHING = Figures()


class Ramps:
    def __init__(self, deployer: Deployer, registry: Registry, stats: Stats, views: dict) -> None:
        self.deployer = deployer
        self.registry = registry
        self.stats = stats
        self.views = views  # choice.Choice.views: which version of a role is the stable one
        # In a cluster: (new, stable) figures of a ramp the other brokers saw, added up (None: none).
        self.elsewhere = lambda d, stable: None
        self.refresh = lambda role, now, actions: None  # set by the broker (states.VersionStates.refresh)
        # Per ramping deployment: the figures of the new and of the stable
        # version when the ramp began, so that gates judge only the ramp.
        # Per ramp: its version's figures and every version's of the role when the
        # ramp began. The stable version is looked up at every judgement (it may
        # connect only after a restart, or change).
        self._baselines: dict[dep.Key, tuple[Figures, dict[tuple[str, str], Figures]]] = {}
        # Reply names that count as errors, per role (its rollouts' `errorMessages`).
        self.error_names: dict[str, frozenset[str]] = {}
        self.declared()

    def declared(self) -> None:
        """The deployer's deployments are (re)declared: follow their rollouts.
        The error names are updated in place: the router holds the same dict."""
        error_names: dict[str, frozenset[str]] = {}
        for d in self.deployer.deployments.values():
            if d.rollout is not None:
                role = d.target.role
                error_names[role] = error_names.get(role, frozenset()) | set(d.rollout.gates.error_messages)
        self.error_names.clear()
        self.error_names.update(error_names)
        for key in [k for k in self._baselines if k not in self.deployer.deployments]:
            del self._baselines[key]

    # ----------------------------------------------------------------- figures

    def figures(self, d: dep.Deployment) -> dict[str, Any]:
        """The figures of `d`'s ramp, as the gates see them."""
        new, stable = self._since_ramp(d)
        return figures_of(new, stable)

    def _key(self, role: str, version: Version) -> tuple[str, str]:
        return role, self.stats.version_label(role, str(version))

    def _since_ramp(self, d: dep.Deployment) -> tuple[Figures, Figures | None]:
        """The figures of `d`'s version and of the stable version since the ramp began, in the
        whole cluster."""
        role = d.target.role
        new_base, bases = self._baseline_of(d)
        new = self.stats.figures(self._key(role, d.target.version)).since(new_base)
        view = self.views.get(role)
        stable_pool = None if view is None else view.stable if view.stable is not None else view.stable_elsewhere
        stable = None
        if stable_pool is not None:
            key = self._key(role, stable_pool.version)
            # A version without figures when the ramp began has had all of them since.
            stable = self.stats.by_version.get(key, _NOTHING).since(bases.get(key) or _NOTHING)
        elsewhere = self.elsewhere(d, stable_pool.version if stable_pool is not None else None)
        if elsewhere is not None:
            new = new.plus(elsewhere[0])
            if stable is not None and elsewhere[1] is not None:
                stable = stable.plus(elsewhere[1])
        return new, stable

    def seen_here(self) -> dict[str, Any]:
        """Cluster: what this broker saw of each ramp since it began, by version (`Figures.to_list`),
        for the broker that drives it to add up."""
        out = {}
        for d in self.deployer.deployments.values():
            if d.state != RAMPING or d.ramp_began is None:
                continue
            role = d.target.role
            new_base, bases = self._baseline_of(d)
            versions = {label: figures.since(bases.get((r, label)) or _NOTHING).to_list()
                        for (r, label), figures in self.stats.by_version.items() if r == role}
            versions[self._key(role, d.target.version)[1]] = self.stats.figures(
                self._key(role, d.target.version)).since(new_base).to_list()
            out[str(d.target)] = {"began": d.ramp_began, "versions": versions}
        return out

    def _baseline_of(self, d: dep.Deployment) -> tuple[Figures, dict[tuple[str, str], Figures]]:
        key = dep.key(d.target.role, d.target.version)
        baseline = self._baselines.get(key)
        if baseline is None:
            baseline = self._baselines[key] = self._baseline(d)
        return baseline

    def _baseline(self, d: dep.Deployment) -> tuple[Figures, dict[tuple[str, str], Figures]]:
        role = d.target.role
        stable_bases = {key: figures.copy() for key, figures in self.stats.by_version.items() if key[0] == role}
        return self.stats.figures(self._key(role, d.target.version)).copy(), stable_bases

    # ------------------------------------------------------------------ events

    def replied(self, instance: Instance, now: float, actions: list) -> None:
        """An instance of a ramping version replied: judge it now."""
        d = self.deployer.deployment(instance.role, instance.version)
        # In a cluster only the broker that drives `d` judges it (on its tick, on every broker's figures).
        if d is not None and d.state == RAMPING and self.deployer.may_drive(d, now):
            self._judge(d, now, actions)

    def disconnected(self, instance: Instance, now: float, actions: list) -> None:
        self.stats.figures(instance.metric_key).disconnects += 1
        self.replied(instance, now, actions)

    def tick(self, now: float, actions: list) -> None:
        for d in self.deployer.deployments.values():
            # In a cluster only the broker that drives `d` judges and steps its ramp.
            if d.state != RAMPING or not self.deployer.may_drive(d, now) or self._judge(d, now, actions):
                continue
            if d.paused or d.writing is not None or not self.deployer.ledger_ok or d.ramp_since is None:
                continue
            if now - d.ramp_since < d.rollout.interval:
                continue
            following = d.ramp_step + 1
            if following == len(d.rollout.steps) - 1 and not d.finished:
                continue  # the last step waits for the online step
            new, stable = self._since_ramp(d)
            if not has_evidence(d.rollout.gates, new):
                continue  # nobody used it yet: no evidence, no more traffic
            self.deployer.write(d, d.record(dep.STEPPED, dep.ROLLOUT, now, attempt=following,
                                            detail=figures_of(new, stable)), actions)

    def _judge(self, d: dep.Deployment, now: float, actions: list) -> bool:
        """Abort `d` if a gate fails; whether it did."""
        new, stable = self._since_ramp(d)
        verdict = judge(d.rollout.gates, new, stable)
        if verdict is None:
            return False
        self._stop(d, dep.ABORTED, f"gate {verdict.gate} failed: {verdict.reason}", verdict.figures, now, actions,
                   gate=verdict.gate)
        return True

    def record_written(self, d: dep.Deployment, record: dict[str, Any], now: float, actions: list) -> None:
        """A rollout record of `d` is on disk (`d` has applied it)."""
        event = record["event"]
        fields = {"role": d.target.role, "version": str(d.target.version), "share": d.share,
                  "step": d.ramp_step}
        if event in (dep.STEPPED, dep.PROMOTED):
            if d.state == FAILED:
                return  # aborted while this record was written: the abort was logged, this step never took effect
            self.refresh(d.target.role, now, actions)
            name = "rollout stepped up" if event == dep.STEPPED else "rollout promoted"
            actions.append(Log("info", name, {**fields, "figures": record.get("detail")}))
            if d.state == LIVE:
                actions.append(Log("info", "rollout finished", {**fields, "figures": record.get("detail")}))
        elif event in (dep.PAUSED, dep.RESUMED):
            actions.append(Log("info", f"rollout {event}", fields))
        elif event == dep.STEP_DONE:  # the offline step: the ramp begins at its first step
            self._baselines[dep.key(d.target.role, d.target.version)] = self._baseline(d)
            actions.append(Log("info", "rollout started", {**fields, "steps": list(d.rollout.steps),
                                                           "interval_s": d.rollout.interval}))
        elif event == dep.STEP_REARMED:
            self._baselines.pop(dep.key(d.target.role, d.target.version), None)
            self.refresh(d.target.role, now, actions)
            actions.append(Log("info", "rollout re-armed", fields))
        # aborted / rolled-back: taken out and logged when decided

    # ---------------------------------------------------------------- operators

    def act(self, role: str, version: str, action: str, now: float) -> list:
        """pause, resume, promote or abort the ramp of role@version."""
        d = self.deployer.deployment(role, version)
        if d is None or d.rollout is None:
            raise KeyError(f"no rollout of {role}@{version} is configured")
        if d.state != RAMPING:
            raise ValueError(f"{role}@{version} is not ramping (state {d.state})")
        actions: list = []
        if action == "abort":
            self._stop(d, dep.ABORTED, "aborted by an operator", self.figures(d), now, actions)
        elif action == "pause":
            if d.paused:
                raise ValueError(f"the ramp of {role}@{version} is paused already")
            self.deployer.write(d, d.record(dep.PAUSED, dep.ROLLOUT, now), actions)
        elif action == "resume":
            if not d.paused:
                raise ValueError(f"the ramp of {role}@{version} is not paused")
            self.deployer.write(d, d.record(dep.RESUMED, dep.ROLLOUT, now), actions)
        elif action == "promote":
            self.deployer.write(d, d.record(dep.PROMOTED, dep.ROLLOUT, now, detail=self.figures(d)), actions)
        else:
            raise ValueError(f"unknown rollout action {action!r}: one of {', '.join(ACTIONS)}")
        return actions

    def rollback(self, role: str, version: str, now: float) -> list:
        """Take a live version out of production: the previous live version is stable again."""
        pool = next((p for p in self.registry.pools.get(role, ()) if str(p.version) == str(version)), None)
        d = self.deployer.deployment(role, version)
        view = self.views.get(role)
        elsewhere = next((e for e in (view.elsewhere if view is not None else ()) if str(e.version) == str(version)),
                         None)  # connected only to other brokers of a cluster
        state = d.state if d is not None else (pool.state if pool is not None else
                                               elsewhere.state if elsewhere is not None else None)
        if pool is not None and pool.state in (DRAINING, DRAINED):
            state = pool.state
        if state not in (LIVE, DRAINING, DRAINED):
            raise ValueError(f"{role}@{version} is not a live version (state {state or 'not connected'}); "
                             "a ramping one is aborted instead")
        others = [p.version for p in self.registry.pools.get(role, ()) if p is not pool]
        others += [e.version for e in (view.elsewhere if view is not None else ())]  # in a cluster: other brokers'
        if not any(str(v) != str(version) and self.deployer.state_of(role, v)[0] == LIVE for v in others):
            raise ValueError(f"no other live version of {role!r} is connected to take over its traffic: connect "
                             "the version to fall back to first (a rollback never leaves a role without one)")
        actions: list = []
        reason = "rolled back by an operator"
        if d is not None:
            self._stop(d, dep.ROLLED_BACK, reason, None, now, actions)
            return actions
        key = dep.key(role, version)
        self.deployer.rolled_back[key] = reason
        self.refresh(role, now, actions)
        actions.append(Log("warning", "version rolled back", {"role": role, "version": str(key[1]), "reason": reason}))
        actions.append(WriteRecord(dep.rollback_record(role, key[1], dep.ROLLED_BACK, now, reason)))
        return actions

    def _stop(self, d: dep.Deployment, event: str, reason: str, figures: dict[str, Any] | None, now: float,
              actions: list, **fields) -> None:
        """Out of production now (share 0 before anything is written), then recorded."""
        aborted = event == dep.ABORTED
        self.deployer.fail(d, d.record(event, dep.ROLLOUT, now, error=reason, detail=figures), now, actions,
                           event="rollout aborted" if aborted else "version rolled back",
                           level="error" if aborted else "warning", step=d.ramp_step, figures=figures, **fields)

