"""The deployment driver: it runs the handshake of every declared deployment
(contract sections 4-6) against the connected instances.

When a held version and its deployment script are both connected, it
records the next step as started, and only once the ledger has the record
(`record_written`) sends the script `deployment-R-V-<step>-start`. The
script's `-done` / `-failed` answer, a step's time limit and an operator's
retry are recorded the same way before anything acts on them. The state
machine of one deployment is `deployments.Deployment`; the ramp of a
rollout is driven by `ramps.Ramps`.

Going into production waits for the ledger; going out never does: a failed
step takes its version out of production routing before its record is
written.
"""

from __future__ import annotations

from typing import Any

from . import deployments as dep
from .actions import Log, WriteRecord, shown
from .activities import new_activity
from .budget import WarningBudget
from .config import Config, Deploys
from .registry import FAILED, HELD, LIVE, RAMPING, Instance, Registry
from .routing import Router, new_id
from .versions import Version

_STATE_EVENTS = {HELD: "version held", LIVE: "version live", RAMPING: "version ramping",
                 FAILED: "version taken out of production"}


class Deployer:
    def __init__(self, config: Config, registry: Registry, router: Router, budget: WarningBudget, *,
                 ledger_records: list[dict[str, Any]], step_timeout: float):
        self.registry = registry
        self.router = router
        self.budget = budget
        self.step_timeout = step_timeout  # of a deployment without its own stepTimeout
        # Every record written, in ledger order: the shell writes them to a
        # fresh ledger when the file is deleted or replaced under the broker.
        self.records: list[dict[str, Any]] = list(ledger_records)
        self.deployments: dict[dep.Key, dep.Deployment] = {}
        self.by_script: dict[str, dep.Deployment] = {}
        # Names of the scripts' answers -> (deployment, step, outcome).
        self.answers: dict[str, tuple[dep.Deployment, str, str]] = {}
        # Versions without a deployment that an operator rolled back: key -> why.
        self.rolled_back: dict[dep.Key, str] = {}
        self.orphan_records: list[dict[str, Any]] = []
        self.declare(config)
        # False while the ledger is lost: no step starts until it is written again.
        self.ledger_ok = True
        # Set by the broker: recompute the states of a role's versions (states.VersionStates.refresh).
        self.refresh = lambda role, now, actions: None
        # Set by the broker: the ramps act on the rollout records (ramps.Ramps.record_written).
        self.rollout_written = lambda d, record, now, actions: None
        # In a cluster (`cluster.Cluster.join_deployments`): whether this broker drives `d` now (holds its lease),
        # and whether role@version is connected to any broker. One broker: always, and connected here.
        self.may_drive = lambda d, now: True
        self.connected = lambda role, version: self.registry.pool(role, version) is not None

    def declare(self, config: Config) -> None:
        """Build the deployments `config` declares, each as the ledger's
        records leave it (at startup, and again on a configuration reload:
        `reconfigure` carries over what is not in the ledger yet)."""
        self.deployments, self.by_script, self.answers = {}, {}, {}
        for script_role, target, timeout in config.deployments():
            d = dep.Deployment(target, script_role, timeout or self.step_timeout,
                               rollout=config.roles[script_role].rollout)
            self.deployments[dep.key(target.role, target.version)] = d
            self.by_script[script_role] = d
            for step in dep.STEPS:
                for outcome in ("done", "failed"):
                    self.answers[dep.message_name(target, step, outcome)] = (d, step, outcome)
        self.rolled_back, self.orphan_records = {}, []
        for record in dep.replay(self.deployments, self.records):
            if not self._undeclared_rollback(record):
                self.orphan_records.append(record)

    def _undeclared_rollback(self, record: dict[str, Any]) -> bool:
        """Fold a rollback (or its retry) of a version without a deployment; whether it was one."""
        if record["step"] != dep.ROLLOUT or record["event"] not in (dep.ROLLED_BACK, dep.STEP_REARMED):
            return False
        key = dep.key(record["role"], record["version"])
        if record["event"] == dep.ROLLED_BACK:
            self.rolled_back[key] = record.get("error") or "rolled back"
        else:
            self.rolled_back.pop(key, None)
        return True

    def script_targets(self) -> dict[str, Deploys]:
        """Deployment script role -> the version it deploys."""
        return {role: d.target for role, d in self.by_script.items()}

    def deployment(self, role: str, version: str | Version) -> dep.Deployment | None:
        return self.deployments.get(dep.key(role, version))

    def state_of(self, role: str, version: Version) -> tuple[str, float]:
        """The state of role@version as its deployment has it (held, ramping,
        live or failed) and its share of new activities in percent; a
        version without a deployment is live unless it was rolled back."""
        d = self.deployment(role, version)
        if d is not None:
            return d.state, d.share
        if self.rolled_back and dep.key(role, version) in self.rolled_back:
            return FAILED, 0.0
        return LIVE, 100.0

    # ------------------------------------------------------------------ events

    def registered(self, instance: Instance, now: float, actions: list) -> None:
        """A version or a deployment script connected: a step may be due."""
        d = self.deployment(instance.role, instance.version)
        if d is not None:
            self._advance(d, now, actions)
        script_of = self.by_script.get(instance.role)
        if script_of is not None:
            self._advance(script_of, now, actions)

    def deregistered(self, instance: Instance, now: float, actions: list) -> None:
        script_of = self.by_script.get(instance.role)
        if script_of is not None and script_of.in_flight and script_of.in_flight.script_conn == instance.conn:
            flight = script_of.in_flight
            script_of.in_flight = None
            actions.append(self._log("warning", "step interrupted", script_of, flight.step,
                                     reason="the deployment script disconnected; the step runs again when a "
                                            "script instance is connected"))
            self._advance(script_of, now, actions)

    def answer(self, instance: Instance, message: dict, name: str, now: float) -> list:
        """A deployment script's `-done` or `-failed`."""
        d, step, outcome = self.answers[name]
        if instance.role != d.script_role:
            return self.budget.refusal(instance, now, "not_deployment_script",
                                       f"only {d.script_role!r} may answer the deployment of {d.target}", name=name)
        flight = d.in_flight
        if flight is None or flight.step != step:
            return [self._log("warning", "deployment answer ignored", d, step,
                              reason=f"the {step} step is not running (status {d.steps[step].status})")]
        activity_id = message.get("activityId")
        if activity_id is not None and activity_id != flight.activity_id:
            return [self._log("warning", "deployment answer ignored", d, step,
                              reason="it answers an earlier attempt (another activityId)")]
        d.in_flight = None
        actions: list = []
        if outcome == "done":
            ramp = {"rollout": d.rollout.to_json()} if step == dep.OFFLINE and d.rollout is not None else None
            self.write(d, d.record(dep.STEP_DONE, step, now, detail=ramp), actions)
        else:
            payload = message.get("payload")
            reason = payload.get("reason") if isinstance(payload, dict) else None
            self.fail(d, d.record(dep.STEP_FAILED_EVENT, step, now, error=_reason_text(reason)), now, actions)
        return actions

    def deadlines(self, now: float, actions: list) -> None:
        """Fail every step that outlived its time limit."""
        for d in self.deployments.values():
            flight = d.in_flight
            if flight is not None and now >= flight.deadline:
                d.in_flight = None
                self.fail(d, d.record(dep.STEP_FAILED_EVENT, flight.step, now,
                                      error=f"time limit of {d.step_timeout:g}s exceeded"), now, actions)

    def fail(self, d: dep.Deployment, record: dict[str, Any], now: float, actions: list, *,
             event: str = _STATE_EVENTS[FAILED], level: str = "warning", **fields) -> None:
        """Take `d`'s version out of production now, then record why (a failed
        step, an abort, a rollback: `event` names it in the log)."""
        was = d.state
        d.taken_out = True
        self.refresh(d.target.role, now, actions)
        if was != FAILED:
            actions.append(Log(level, event, {
                "role": d.target.role, "version": str(d.target.version), "state": FAILED, "was": was,
                "reason": record.get("error"), **fields}))
        self.write(d, record, actions)

    def record_written(self, record: dict[str, Any], now: float) -> list:
        """The ledger made `record` durable: now act on it."""
        self.records.append(record)
        d = self.deployment(record["role"], record["version"])
        actions: list = []
        if d is None:
            if self._undeclared_rollback(record):
                if record["event"] == dep.STEP_REARMED:
                    self.refresh(record["role"], now, actions)
                actions.append(Log("info", f"rollback {'undone' if record['event'] == dep.STEP_REARMED else 'recorded'}",
                                   {"role": record["role"], "version": record["version"]}))
            return actions
        d.writing = None
        before = d.state
        d.apply(record)
        step, event = record["step"], record["event"]
        if step == dep.ROLLOUT:
            self.rollout_written(d, record, now, actions)
        elif event == dep.STEP_STARTED:
            self._send_step_start(d, step, record["attempt"], now, actions)
        elif event == dep.STEP_DONE:
            actions.append(self._log("info", f"{step} step done", d, step, duration_s=_duration(d.steps[step])))
            if step == dep.OFFLINE and d.rollout is not None:
                self.rollout_written(d, record, now, actions)
            if step == dep.ONLINE:
                actions.append(self._log("info", "deployment finished", d, step))
        elif event == dep.STEP_FAILED_EVENT:
            actions.append(self._log("error", f"{step} step failed", d, step,
                                     error=record.get("error"), duration_s=_duration(d.steps[step])))
        elif event == dep.STEP_REARMED:
            actions.append(self._log("info", "deployment re-armed", d, step))
            if d.ramped:  # a retried step starts its ramp again, from its first step
                self.rollout_written(d, record, now, actions)
        if d.state != before:
            self._set_state(d, before, now, actions)
        if d.queued and d.writing is None:
            self.write(d, d.queued.pop(0), actions)
        self._advance(d, now, actions)
        return actions

    def record_seen(self, record: dict[str, Any], now: float) -> list:
        """Cluster: a record another broker wrote to the shared ledger (it drives that
        deployment): fold it in so that this broker routes by the same states; drive nothing."""
        self.records.append(record)
        d = self.deployment(record["role"], record["version"])
        actions: list = []
        if d is None:
            if self._undeclared_rollback(record):
                self.refresh(record["role"], now, actions)
            return actions
        before = d.state
        d.apply(record)
        if record["step"] == dep.ROLLOUT or (record["event"] == dep.STEP_DONE and record["step"] == dep.OFFLINE
                                             and d.rollout is not None):
            self.rollout_written(d, record, now, actions)
        if d.state != before:
            self._set_state(d, before, now, actions)
        return actions

    def record_refused(self, record: dict[str, Any], now: float) -> list:
        """Cluster: the shared ledger refused `record`: this broker no longer holds the
        deployment's lease (its fencing token is stale). Whoever holds it now drives the
        deployment from the records in the ledger; nothing here acts on this one."""
        d = self.deployment(record["role"], record["version"])
        actions: list = []
        if d is not None:
            d.writing, d.queued, d.in_flight = None, [], None
            if d.taken_out:
                # Taken out before the record (a failure, an abort) that never made it: the ledger, which
                # the driver writes, says what the version's state is.
                d.taken_out = False
                self.refresh(d.target.role, now, actions)
        return actions + [Log("warning", "deployment record refused", {
            "role": record["role"], "version": record["version"], "step": record["step"],
            "record_event": record["event"], "reason": "this broker does not hold the deployment's driver lease (any "
            "more): the broker that holds it drives the deployment and runs an unfinished step again; an operator "
            "action is taken by the broker that drives the deployment (exocom status shows which)"})]

    def ledger_lost(self) -> None:
        """The ledger file was deleted or replaced: start no step until `ledger_restored`."""
        self.ledger_ok = False

    def ledger_restored(self, now: float) -> list:
        """`self.records` are in a fresh ledger: start what waited meanwhile."""
        self.ledger_ok = True
        actions: list = []
        self.advance_all(now, actions)
        return actions

    def advance_all(self, now: float, actions: list) -> None:
        """Start every step that is due and can run now."""
        for d in self.deployments.values():
            self._advance(d, now, actions)

    def retry(self, role: str, version: str, now: float) -> list:
        """Re-arm the failed steps of a deployment (operator action)."""
        d = self.deployment(role, version)
        if d is None:
            key = dep.key(role, version)
            if key in self.rolled_back:  # a version without a deployment, rolled back: undo that
                return [WriteRecord(dep.rollback_record(role, key[1], dep.STEP_REARMED, now))]
            raise KeyError(f"no deployment of {role}@{version} is configured")
        failed = [s.name for s in d.steps.values() if s.status == dep.STEP_FAILED]
        if not failed and d.stopped:
            failed = [dep.ROLLOUT]  # an aborted or rolled-back ramp starts again from its first step
        if not failed:
            raise ValueError(f"{role}@{version} has no failed step to retry (state {d.state})")
        if d.writing is not None:
            raise ValueError(f"{role}@{version} is busy writing its ledger; try again")
        actions: list = []
        self.write(d, d.record(dep.STEP_REARMED, failed[0], now), actions)
        return actions

    def starting(self) -> list:
        """The state of every declared deployment, logged once at startup."""
        actions = []
        for d in self.deployments.values():
            event = {HELD: "deployment held", LIVE: "deployment live", RAMPING: "deployment ramping",
                     FAILED: "deployment failed"}[d.state]
            actions.append(self._log("info" if d.state != FAILED else "warning", event, d, d.next_step(),
                                     share=d.share))
        return actions

    def to_json(self) -> list[dict[str, Any]]:
        return [d.to_json() for d in self.deployments.values()]

    # ----------------------------------------------------------------- helpers

    def _advance(self, d: dep.Deployment, now: float, actions: list) -> None:
        """Start the next step of `d` if it is due and can run now."""
        if d.writing is not None or d.in_flight is not None or not self.ledger_ok or not self.may_drive(d, now):
            return
        step = d.next_step()
        if step is None:
            return
        if not self.connected(d.target.role, d.target.version) or not self.registry.pools.get(d.script_role):
            return
        self.write(d, d.record(dep.STEP_STARTED, step, now), actions)

    def _send_step_start(self, d: dep.Deployment, step: str, attempt: int, now: float, actions: list) -> None:
        scripts = self.registry.pools.get(d.script_role)
        if not scripts or not self.connected(d.target.role, d.target.version):
            # Lost a party while the record was written; it runs again when both are back.
            actions.append(self._log("warning", "step interrupted", d, step,
                                     reason="the version or its deployment script disconnected before the step began"))
            return
        script = scripts[0].pick()
        activity_id = new_id()
        d.in_flight = dep.InFlight(step, activity_id, script.conn, now, now + d.step_timeout)
        activity = new_activity(now)
        activity[d.script_role] = script.conn
        self.router.activities.put(activity_id, activity)
        self.router.send_to(script, {"name": dep.message_name(d.target, step, "start"), "id": new_id(),
                                     "activityId": activity_id, "payload": {"attempt": attempt}}, now, actions)
        actions.append(self._log("info", f"{step} step started", d, step, attempt=attempt,
                                 script_instance=script.label))

    @staticmethod
    def write(d: dep.Deployment, record: dict[str, Any], actions: list) -> None:
        """Send `record` to the ledger, after the one being written, if any."""
        if d.writing is not None:
            d.queued.append(record)
            return
        d.writing = record
        actions.append(WriteRecord(record))

    def _set_state(self, d: dep.Deployment, before: str, now: float, actions: list) -> None:
        self.refresh(d.target.role, now, actions)
        state = d.state
        if state == FAILED and d.taken_out:
            return  # logged when it was taken out
        actions.append(Log("info" if state != FAILED else "warning", _STATE_EVENTS[state], {
            "role": d.target.role, "version": str(d.target.version), "state": state, "was": before,
            "share": d.share}))

    @staticmethod
    def _log(level: str, event: str, d: dep.Deployment, step: str | None, **fields) -> Log:
        s = d.steps.get(step) if step else None
        return Log(level, event, {"role": d.target.role, "version": str(d.target.version), "step": step,
                                  "attempt": s.attempts if s else None, "script": d.script_role, **fields})


def _reason_text(reason: Any) -> str:
    if reason is None:
        return "the deployment script reported failure"
    if reason.__class__ is str:
        return reason[:2000]
    return f"the deployment script reported failure, with a reason that is {shown(reason)}"


def _duration(step: dep.Step) -> float | None:
    if step.started_at is None or step.ended_at is None:
        return None
    return round(step.ended_at - step.started_at, 3)
