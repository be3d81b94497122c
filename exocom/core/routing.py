"""Where a message goes: `Router.route`.

An accepted message reaches one instance of every role that receives it
(`routes.RoutingTable`), under that role's internal name: the asker of a
`responseTo` answer, or the instance `choice.Choice` picks (affinity,
version requirement, ramp share, stable version). A deployment script
reaches the version it deploys, held or not. On the way the router counts
the replies of every version (`figures`), which the gates of a ramp judge.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import orjson

from .actions import Deliver, Log, Redeliver
from .activities import LAST_SEEN, Generations
from .budget import WarningBudget
from .choice import Choice
from .config import Deploys
from .registry import FAILED, HELD, RAMPING, Instance, Registry, VersionPool
from .routes import RoutingTable
from .stats import Stats
from .versions import InvalidRequirement, Requirement

_dumps = orjson.dumps
_loads = orjson.loads
_OPT = orjson.OPT_UTC_Z
_UTC = timezone.utc
_fromtimestamp = datetime.fromtimestamp
# Fields of an incoming message that are passed through to receivers as they are.
_PASS_THROUGH = ("auth", "isSecurity", "responseTo")


def new_id() -> str:
    return str(uuid.uuid4())


class Router:
    def __init__(self, table: RoutingTable, registry: Registry, stats: Stats, budget: WarningBudget, *,
                 activities: Generations, commands: Generations, script_targets: dict[str, Deploys],
                 log_deliveries: bool = False):
        self.table = table
        self.registry = registry
        self.stats = stats
        self.budget = budget
        self.activities = activities  # activity id -> activity record (see activities.py)
        self.commands = commands  # message id -> sender conn, for `responseTo`
        self.script_targets = script_targets  # deployment script role -> the version it deploys
        self.log_deliveries = log_deliveries
        self.choice = Choice(registry)
        # Reply names that count as errors, per role; set by the broker (ramps.Ramps.error_names).
        self.error_names: dict[str, frozenset[str]] = {}
        # Called with (instance, now, actions) when an instance of a ramping version replies.
        self.ramping_replied = lambda instance, now, actions: None
        # `cluster.Cluster` when this broker is one of several (`exocom serve --cluster`): consulted only for a
        # role no local instance takes, an activity member on another broker, or an asker that is not here.
        self.cluster = None

    def route(self, sender: Instance, message: dict, name: str, now: float, actions: list,
              public: str | None = None) -> None:
        """Deliver `message` (sent by `sender` under its internal `name`) to one
        instance of every role that receives it."""
        if public is None:
            public = sender.profile.public_name(name)
        self.stats.routed += 1
        activity_id = message.get("activityId")
        activity = None
        response_time = None
        if activity_id.__class__ is str:
            activity = self.activities.get(activity_id)
            if activity is None:
                activity = {LAST_SEEN: now}
                self.activities.put(activity_id, activity)
            else:
                seconds = now - activity[LAST_SEEN]
                response_time = int(seconds * 1e9)
                activity[LAST_SEEN] = now
                if activity.get(sender.role) == -sender.conn:
                    # It was sent a message on this activity: this is its reply.
                    self._replied(sender, name, public, seconds, now, actions)
            activity[sender.role] = sender.conn
        message_id = message.get("id")
        if message_id.__class__ is str:
            self.commands.put(message_id, sender.conn)

        requirement = None
        raw_requirement = message.get("version")
        if raw_requirement is not None:
            try:
                requirement = Requirement(raw_requirement)
            except InvalidRequirement as e:
                actions.extend(self.budget.refusal(sender, now, "bad_version_requirement", str(e), name=name))
                return

        # An answer to a command we routed recently goes back to the asker only.
        response_to = message.get("responseTo")
        if response_to.__class__ is str:
            asker = self.registry.by_conn.get(self.commands.get(response_to))
            if asker is not None and public in asker.profile.receives:
                self._deliver(sender, asker, message, public, activity, self._frame(message, response_time, now),
                              {}, actions)
                return
            if self.cluster is not None and asker is None and self.cluster.to_asker(
                    sender, response_to, public, self._frame(message, response_time, now), actions):
                return

        roles = self.table.receivers.get(public)
        if not roles:
            self.stats.undeliverable[public] += 1
            actions.extend(self.budget.log(sender, now, "warning", "message undeliverable", {
                "sender": sender.role, "name": public, "reason": "no role receives this message"}))
            return
        deploys = self.script_targets.get(sender.role)
        missed = None
        frame = self._frame(message, response_time, now)
        encoded: dict[str, bytes] = {}
        # What places a new activity on a ramping version: the activity, else the message.
        key = activity_id if activity is not None else message_id if message_id.__class__ is str else None
        cluster = self.cluster
        for role in roles:
            if cluster is not None and activity is not None and activity.get(role) == 0:
                # Affinity to an instance on another broker (`cluster.ELSEWHERE`).
                home = cluster.home(activity_id, role)
                if home is not None:
                    cluster.route_away(sender, role, public, activity_id, activity, frame, requirement, key,
                                       actions, home)
                    continue
            if deploys is not None and role == deploys.role and (
                requirement is None or requirement.matches(deploys.version)
            ):
                # A deployment script talks to the version it deploys, held or not;
                # with a version requirement it may also read an older one.
                target = self._pick_in_pool(self.registry.pool(role, deploys.version), public)
                reason = "" if target is not None else f"{deploys} has no instance connected"
            else:
                target, reason = self.choice.choose(role, public, activity, requirement, key)
            if target is None:
                if cluster is not None and cluster.route_away(sender, role, public, activity_id, activity, frame,
                                                              requirement, key, actions, chosen=reason):
                    continue
                if missed is None:
                    missed = {}
                missed[role] = str(reason)
                continue
            self._deliver(sender, target, message, public, activity, frame, encoded, actions)
        if missed is not None:
            # Contract 3.2: every role that misses it (e.g. no version satisfies
            # the requirement) is logged with why -- a warning when nobody got it.
            nobody = len(missed) == len(roles)
            if nobody:
                self.stats.undeliverable[public] += 1
            actions.extend(self.budget.log(sender, now, "warning" if nobody else "info", "message undeliverable", {
                "sender": sender.role, "name": public, "activity_id": activity_id, "missed": missed}))

    def _replied(self, sender: Instance, name: str, public: str, seconds: float, now: float, actions: list) -> None:
        errors = self.error_names.get(sender.role)
        self.stats.figures(sender.metric_key).reply(
            seconds, errors is not None and (public in errors or name in errors))
        if sender.pool.state == RAMPING:
            self.ramping_replied(sender, now, actions)

    @staticmethod
    def _pick_in_pool(pool: VersionPool | None, public: str) -> Instance | None:
        if pool is None or not pool.instances or public not in pool.profile.receives:
            return None
        return pool.pick()

    @staticmethod
    def _frame(message: dict, response_time: int | None, now: float) -> dict:
        """What every receiver of `message` gets, but for the name; built once per message."""
        # Old Exorelay clients end their process on a message without `id`:
        # a sender that leaves it out must not crash its receivers.
        out = {
            "name": None,
            "sender": "",
            "id": message.get("id") or new_id(),
            "activityId": message.get("activityId"),
            "payload": message.get("payload"),
            "timestamp": _fromtimestamp(now, _UTC),
        }
        if response_time:
            out["responseTime"] = response_time
        for key in _PASS_THROUGH:
            if key in message:
                out[key] = message[key]
        return out

    def _deliver(self, sender: Instance, target: Instance, message: dict, public: str, activity: dict | None,
                 frame: dict, encoded: dict, actions: list) -> None:
        internal = target.profile.internal_name(public)
        # Receivers that know the message by the same name share one encoding.
        data = encoded.get(internal)
        if data is None:
            frame["name"] = internal
            data = encoded[internal] = _dumps(frame, option=_OPT)
        actions.append(Deliver(target.conn, data))
        self.stats.delivered(target)
        if activity is not None:
            member = activity.get(target.role)
            if member is None or abs(member) != target.conn:
                # First delivery, or failover from an instance that is gone: remember the new one.
                activity[target.role] = -target.conn
        if self.log_deliveries:
            response_time = frame.get("responseTime")
            actions.append(Log("debug", "message delivered", {
                "sender": sender.role, "sender_version": str(sender.version), "receiver": target.role,
                "receiver_version": str(target.version), "instance": target.label, "name": public,
                "internal_name": internal, "sender_name": message.get("name"),
                "activity_id": message.get("activityId"), "message_id": message.get("id"),
                "response_time_ms": response_time / 1e6 if response_time else None,
            }))

    # ------------------------------------------------ the broker's own messages

    def send_to(self, target: Instance, message: dict, now: float, actions: list) -> None:
        """A message the broker itself sends to one instance."""
        message["timestamp"] = _fromtimestamp(now, _UTC)
        message.setdefault("sender", "exocom")
        actions.append(Deliver(target.conn, _dumps(message, option=_OPT)))

    def reroute(self, gone: Instance, frames: list[bytes], now: float, actions: list) -> None:
        """Frames that were queued for `gone` and never handed to its socket go
        to another instance of the same role and version: they were routed by
        the usual rules to that version (its version requirement is not in the
        frame, so no other version is safe). The broker's own messages are
        not re-sent: a deployment step or an authorization starts again by
        itself."""
        pool = self.registry.pool(gone.role, gone.version)
        if pool is not None and pool.state in (FAILED, HELD):
            pool = None  # out of production: nothing more reaches it, re-routed or not
        rerouted = own = 0
        for data in frames:
            message = _loads(data)
            if message.get("sender") == "exocom":
                own += 1
                continue
            if pool is None or not pool.instances:
                continue
            target = pool.pick()
            actions.append(Redeliver(target.conn, data))  # same version, same profile: the same frame
            self.stats.delivered(target)
            rerouted += 1
            activity_id = message.get("activityId")
            activity = self.activities.get(activity_id) if activity_id.__class__ is str else None
            if activity is not None and abs(activity.get(gone.role, 0)) == gone.conn:
                activity[gone.role] = -target.conn
        lost = len(frames) - rerouted - own
        self.stats.frames_rerouted += rerouted
        self.stats.outbox_dropped_frames += lost + own
        fields = {"role": gone.role, "version": str(gone.version), "instance": gone.label,
                  "queued_frames": len(frames), "rerouted": rerouted, "lost": lost, "not_resent": own}
        if lost:
            actions.append(Log("warning", "queued frames lost", {
                **fields, "reason": f"no other instance of {gone.role}@{gone.version} is connected and in production"}))
        else:
            actions.append(Log("info", "queued frames re-routed", fields))
