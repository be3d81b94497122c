"""The deployment state machine of one role version (contract sections 4-6).

A deployment has two steps, offline then online. Each step goes
pending -> started -> done | failed. The ledger is the truth: the machine only
changes a step when the record of the change is on disk (`apply`), so the
broker never tells anybody a step is done before it is durable. A step that
was started but neither done nor failed (broker crash, lost script) is run
again, as a new attempt, once its deployment script and its version are both
connected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import Deploys, Rollout
from .registry import FAILED, HELD, LIVE, RAMPING
from .versions import InvalidVersion, Version

OFFLINE, ONLINE = "offline", "online"
STEPS = (OFFLINE, ONLINE)
PENDING, STARTED, DONE = "pending", "started", "done"
STEP_FAILED = "failed"

# Ledger record events
STEP_STARTED, STEP_DONE, STEP_FAILED_EVENT, STEP_REARMED = "started", "done", "failed", "rearmed"
STEP_EVENTS = (STEP_STARTED, STEP_DONE, STEP_FAILED_EVENT, STEP_REARMED)
# The ramp of a rollout (contract 7) is recorded as the pseudo-step "rollout":
# "stepped" (attempt = the ramp step now in force), the operators' actions,
# and "aborted" (an operator, a gate, a failed step) with its reason and figures.
ROLLOUT = "rollout"
STEPPED, PAUSED, RESUMED, PROMOTED, ABORTED, ROLLED_BACK = (
    "stepped", "paused", "resumed", "promoted", "aborted", "rolled-back")
ROLLOUT_EVENTS = (STEPPED, PAUSED, RESUMED, PROMOTED, ABORTED, ROLLED_BACK, STEP_REARMED)
RECORD_STEPS = (*STEPS, ROLLOUT)
RECORD_EVENTS = (*STEP_EVENTS, *(e for e in ROLLOUT_EVENTS if e not in STEP_EVENTS))


Key = tuple[str, Version]


def key(role: str, version: str | Version) -> Key | None:
    """Deployments are found by role and version equality, as instances are
    pooled: 0.0.1+build7 is 0.0.1. None for a version that is not one."""
    if not isinstance(version, Version):
        try:
            version = Version(version)
        except InvalidVersion:
            return None
    return role, version


def message_name(target: Deploys, step: str, outcome: str) -> str:
    """`deployment-todo-search-0.0.1-offline-start` and its siblings."""
    return f"deployment-{target.role}-{target.version}-{step}-{outcome}"


@dataclass
class Step:
    name: str
    status: str = PENDING
    attempts: int = 0
    started_at: float | None = None
    ended_at: float | None = None
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "status": self.status,
            "attempts": self.attempts,
            "startedAt": self.started_at,
            "endedAt": self.ended_at,
            "lastError": self.last_error,
        }


@dataclass
class InFlight:
    step: str
    activity_id: str
    script_conn: int
    started_at: float
    deadline: float


@dataclass
class Deployment:
    target: Deploys
    script_role: str
    step_timeout: float
    steps: dict[str, Step] = field(default_factory=lambda: {s: Step(s) for s in STEPS})
    in_flight: InFlight | None = None
    # A record sent to the ledger and not yet confirmed written; nothing else
    # happens to this deployment until it is.
    writing: dict[str, Any] | None = None
    # Records to write after it, in order (an abort does not wait to be decided).
    queued: list[dict[str, Any]] = field(default_factory=list)
    rollout: Rollout | None = None
    ramp_step: int = 0  # index into rollout.steps in force while ramping
    ramped: bool = False  # its offline-done record began a ramp (a rollout was declared then)
    ramp_since: float | None = None  # when that step began
    ramp_began: float | None = None  # when the ramp began at its first step (names one ramp across brokers)
    paused: bool = False
    # Why the version is out of production by an abort or a rollback (None: it is not).
    stopped: str | None = None
    # Failure is never delayed by the ledger: set the moment a step fails, a
    # gate fails or an operator aborts, before the record is written.
    taken_out: bool = False

    @property
    def state(self) -> str:
        if self.taken_out or self.stopped or any(s.status == STEP_FAILED for s in self.steps.values()):
            return FAILED
        if self.steps[OFFLINE].status != DONE:
            return HELD
        if self.rollout is not None and self.ramp_step < len(self.rollout.steps) - 1:
            return RAMPING
        return LIVE

    @property
    def share(self) -> float:
        """Percent of new activities this version takes now (100 once live)."""
        state = self.state
        if state == RAMPING:
            return self.rollout.steps[self.ramp_step]
        return 100.0 if state == LIVE else 0.0

    @property
    def finished(self) -> bool:
        return self.steps[ONLINE].status == DONE

    def next_step(self) -> str | None:
        """The step to run now, if any: the first one not done, unless failed."""
        if self.state == FAILED:
            return None
        for name in STEPS:
            if self.steps[name].status != DONE:
                return name
        return None

    def record(self, event: str, step: str, now: float, error: str | None = None,
               detail: dict[str, Any] | None = None, attempt: int | None = None) -> dict[str, Any]:
        if attempt is None:
            attempt = self.steps[step].attempts + (1 if event == STEP_STARTED else 0) if step in self.steps else 0
        return {
            "role": self.target.role,
            "version": str(self.target.version),
            "step": step,
            "event": event,
            "attempt": attempt,
            "at": now,
            "error": error,
            "detail": detail,
        }

    def apply(self, record: dict[str, Any]) -> None:
        """Fold one ledger record into the steps (also used to replay the ledger)."""
        event = record["event"]
        if record["step"] == ROLLOUT:
            self._apply_rollout(event, record)
            return
        step = self.steps[record["step"]]
        if event == STEP_STARTED:
            step.status = STARTED
            step.attempts = record["attempt"]
            step.started_at = record["at"]
            step.ended_at = None
        elif event == STEP_DONE:
            step.status = DONE
            step.ended_at = record["at"]
            if step.name == OFFLINE:
                # The ramp begins only where the record says a rollout was declared when
                # the version went live (a ledger of an older release, or a rollout
                # declared later, finds the version live already).
                self.ramped = (record.get("detail") or {}).get("rollout") is not None
                last = len(self.rollout.steps) - 1 if self.rollout is not None else 0
                self.ramp_step, self.ramp_since = (0 if self.ramped else last), record["at"]
                self.ramp_began = record["at"]
        elif event == STEP_FAILED_EVENT:
            step.status = STEP_FAILED
            step.ended_at = record["at"]
            step.last_error = record.get("error")
        elif event == STEP_REARMED:
            step.status = PENDING
            step.ended_at = None
            self.taken_out = False
            if self.ramped:  # a failed step aborted the ramp: it begins again from its first step
                self.ramp_step, self.ramp_since, self.paused = 0, record["at"], False
                self.ramp_began = record["at"]

    def _apply_rollout(self, event: str, record: dict[str, Any]) -> None:
        if event == STEPPED:
            self.ramp_step, self.ramp_since = record["attempt"], record["at"]
        elif event == PROMOTED:
            self.ramp_step, self.ramp_since = len(self.rollout.steps) - 1 if self.rollout else 0, record["at"]
        elif event == PAUSED:
            self.paused = True
        elif event == RESUMED:
            self.paused = False
        elif event in (ABORTED, ROLLED_BACK):
            self.stopped = record.get("error") or event
        elif event == STEP_REARMED:  # a retry of an aborted ramp starts it again from its first step
            self.stopped, self.taken_out, self.paused = None, False, False
            self.ramp_step, self.ramp_since, self.ramped = 0, record["at"], self.rollout is not None
            self.ramp_began = record["at"]

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.target.role,
            "version": str(self.target.version),
            "deployedBy": self.script_role,
            "state": self.state,
            "finished": self.finished,
            "stepTimeout": self.step_timeout,
            "steps": [s.to_json() for s in self.steps.values()],
            "inFlight": self.in_flight.step if self.in_flight else None,
            "share": self.share,
            "stopped": self.stopped,
            "rollout": None if self.rollout is None else {
                **self.rollout.to_json(), "step": self.ramp_step, "stepSince": self.ramp_since,
                "paused": self.paused},
        }


def rollback_record(role: str, version: Version, event: str, now: float, error: str | None = None) -> dict[str, Any]:
    """A rollback (or its undoing, `rearmed`) of a version without a declared deployment."""
    return {"role": role, "version": str(version), "step": ROLLOUT, "event": event, "attempt": 0, "at": now,
            "error": error, "detail": None}


def replay(deployments: dict[Key, Deployment], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold ledger records into the deployments; return records of deployments
    no longer configured (kept in the ledger, shown to operators, not acted on)."""
    orphans = []
    for record in records:
        deployment = deployments.get(key(record["role"], record["version"]))
        if deployment is None:
            orphans.append(record)
        else:
            deployment.apply(record)
    return orphans
