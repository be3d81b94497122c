"""The broker core: plain, synchronous Python with no I/O.

The trio shell (`server.py`) feeds it events -- a connection opened, a frame
arrived, a connection closed, the clock ticked, a ledger record was written --
and carries out the actions it returns (`actions.py`). Everything that decides
where a message goes lives here; `Broker._route` is where a message is routed.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import orjson

from . import deployments as dep
from .actions import (
    CLOSE_ALREADY_REGISTERED,
    CLOSE_BAD_REGISTRATION,
    CLOSE_BAD_VERSION,
    CLOSE_NOT_REGISTERED,
    CLOSE_UNKNOWN_ROLE,
    Close,
    Deliver,
    Log,
    WriteRecord,
    shown,
)
from .activities import LAST_SEEN, Generations, new_activity
from .config import Config
from .metrics import Stats
from .registry import FAILED, HELD, LIVE, Instance, Registry, VersionPool
from .routing import RoutingTable
from .versions import UNVERSIONED, InvalidRequirement, InvalidVersion, Requirement, Version

REGISTER = "exocom.register-service"
SECURITY_ROLE = "security"
# A connection whose frames cause warnings (refused, undeliverable) gets this
# many warning events per window; the rest is counted and summed up once.
WARNING_BURST = 10
WARNING_WINDOW = 10.0
# A WebSocket that has not registered by then is closed (4000): an idle
# unregistered connection only holds a file descriptor.
REGISTRATION_TIMEOUT = 10.0
_dumps = orjson.dumps
_loads = orjson.loads
_OPT = orjson.OPT_UTC_Z
_UTC = timezone.utc
_fromtimestamp = datetime.fromtimestamp
# Fields of an incoming message that are passed through to receivers as they are.
_PASS_THROUGH = ("auth", "isSecurity", "responseTo")
_SECURITY_ANSWERS = frozenset(("message authorized", "message unauthorized", "security request"))


def _reason_text(reason: Any) -> str:
    if reason is None:
        return "the deployment script reported failure"
    if reason.__class__ is str:
        return reason[:2000]
    return f"the deployment script reported failure, with a reason that is {shown(reason)}"


def new_id() -> str:
    return str(uuid.uuid4())


class Broker:
    def __init__(
        self,
        config: Config,
        *,
        ledger_records: list[dict[str, Any]] = (),
        step_timeout: float = 300.0,
        activity_ttl: float = 60.0,
        max_activities: int = 100_000,
        log_deliveries: bool = False,
        max_messages_per_second: float = 0.0,
        now: float = 0.0,
    ):
        self.config = config
        self.table = RoutingTable(config)
        self.registry = Registry()
        # Connected, not yet registered: conn -> (peer, connected at), oldest first.
        self.pending: dict[int, tuple[str, float]] = {}
        self.activities = Generations(activity_ttl, now, max_activities)
        self.commands = Generations(activity_ttl, now, max_activities)  # message id -> sender conn
        self.authorizations = Generations(activity_ttl, now)  # security: activity -> (message, sender conn)
        self.security_requests = Generations(activity_ttl, now)  # activity -> security's activity
        self.log_deliveries = log_deliveries
        # Per connection, 0 = unlimited; a bucket holds one second's worth (at least one message).
        self.max_rate = max_messages_per_second
        self.rate_burst = max(1.0, max_messages_per_second)
        self.stats = Stats()
        self._suppressing: set[Instance] = set()  # instances with warnings held back
        self.has_security = config.has_security
        self.deployments: dict[dep.Key, dep.Deployment] = {}
        self.deployment_by_script: dict[str, dep.Deployment] = {}
        self.handshake_answers: dict[str, tuple[dep.Deployment, str, str]] = {}
        for script_role, target, timeout in config.deployments():
            d = dep.Deployment(target, script_role, timeout or step_timeout)
            self.deployments[dep.key(target.role, target.version)] = d
            self.deployment_by_script[script_role] = d
            for step in dep.STEPS:
                for outcome in ("done", "failed"):
                    self.handshake_answers[dep.message_name(target, step, outcome)] = (d, step, outcome)
        # Every record written, in ledger order: the shell writes them to a
        # fresh ledger when the file is deleted or replaced under the broker.
        self.records: list[dict[str, Any]] = list(ledger_records)
        self.orphan_records = dep.replay(self.deployments, self.records)
        # False while the ledger is lost: no step starts until it is written again.
        self.ledger_ok = True

    # ------------------------------------------------------------------ events

    def connected(self, conn: int, peer: str, now: float = 0.0) -> list:
        self.pending[conn] = (peer, now)
        return []

    def disconnected(self, conn: int, now: float) -> list:
        if self.pending.pop(conn, None) is not None:
            return []
        instance = self.registry.remove(conn)
        if instance is None:
            return []
        actions: list = [
            Log("info", "service deregistered", {"role": instance.role, "version": str(instance.version), "instance": instance.label})
        ]
        if instance.warnings_suppressed:
            actions.append(self._suppressed_warnings(instance))
        script_of = self.deployment_by_script.get(instance.role)
        if script_of is not None and script_of.in_flight and script_of.in_flight.script_conn == conn:
            flight = script_of.in_flight
            script_of.in_flight = None
            actions.append(self._deployment_log("warning", "step interrupted", script_of, flight.step, now,
                                                reason="the deployment script disconnected; the step runs again when a script instance is connected"))
            self._advance(script_of, now, actions)
        return actions

    def frame_received(self, conn: int, data: str | bytes, now: float) -> list:
        instance = self.registry.by_conn.get(conn)
        if self.max_rate and instance is not None and not self._take_token(instance, now):
            # Before decoding: a flood costs as little as possible.
            return self._refusal(instance, now, "rate_limited",
                                 f"more than {self.max_rate:g} messages per second from this connection "
                                 "(--max-messages-per-second); the message is dropped")
        try:
            message = _loads(data)
        except orjson.JSONDecodeError:
            message = None
        if instance is None:
            return self._register(conn, message, now)
        if message.__class__ is not dict:
            return self._refusal(instance, now, *(("not_object", "not a JSON object") if message is not None else ("not_json", "not valid JSON")))
        name = message.get("name")
        if name.__class__ is not str:
            return self._refusal(instance, now, "no_name", "the message has no string 'name'")
        if name == REGISTER:
            return [
                *self._refusal(instance, now, "already_registered", "already registered", name=name),
                Close(conn, CLOSE_ALREADY_REGISTERED, f"already registered as {instance.role}"),
            ]
        sender = message.get("sender")
        if sender is not None and sender != instance.role:
            return self._refusal(instance, now, "spoofed_sender", f"sender {shown(sender)} is not the role this connection registered as", name=name)
        if name in self.handshake_answers:
            return self._handshake_answer(instance, message, name, now)
        if self.has_security and instance.role == SECURITY_ROLE and name in _SECURITY_ANSWERS:
            # The security service needs no sends of its own for the adapter's messages.
            return self._security(instance, message, name, now)
        if name not in instance.profile.sends:
            return self._refusal(instance, now, "not_allowed", f"role {instance.role!r} is not allowed to send {shown(name)} (not in its sends)", name=name)
        try:
            if self.has_security:
                return self._security(instance, message, name, now)
            actions: list = []
            self._route(instance, message, name, now, actions)
            return actions
        except orjson.JSONEncodeError as e:
            # orjson reads 1024 levels of nesting but writes only 254: refuse
            # what cannot be forwarded (nothing was delivered yet: every
            # receiver's frame is encoded before the first delivery).
            return self._refusal(instance, now, "not_forwardable", f"the message cannot be forwarded: {e}", name=name)

    def _take_token(self, instance: Instance, now: float) -> bool:
        tokens = min(self.rate_burst, instance.tokens + (now - instance.tokens_at) * self.max_rate)
        instance.tokens_at = now
        if tokens < 1.0:
            instance.tokens = tokens
            return False
        instance.tokens = tokens - 1.0
        return True

    def tick(self, now: float) -> list:
        """Called about once a second: expire memories, enforce step time limits."""
        for generations in (self.activities, self.commands, self.authorizations, self.security_requests):
            generations.rotate_if_due(now)
        actions: list = []
        while self.pending:
            conn, (_, since) = next(iter(self.pending.items()))
            if now - since < REGISTRATION_TIMEOUT:
                break  # the others connected later
            actions += self._refuse_registration(conn, CLOSE_NOT_REGISTERED,
                                                 f"no registration within {REGISTRATION_TIMEOUT:g}s of connecting")
        if self._suppressing:
            for instance in [i for i in self._suppressing if now - i.warning_window_start >= WARNING_WINDOW]:
                actions.append(self._suppressed_warnings(instance))
        for d in self.deployments.values():
            flight = d.in_flight
            if flight is not None and now >= flight.deadline:
                d.in_flight = None
                self._write(d, d.record(dep.STEP_FAILED_EVENT, flight.step, now,
                                        error=f"time limit of {d.step_timeout:g}s exceeded"), actions)
        return actions

    def record_written(self, record: dict[str, Any], now: float) -> list:
        """The ledger made `record` durable: now act on it."""
        self.records.append(record)
        d = self.deployment(record["role"], record["version"])
        if d is None:
            return []
        d.writing = None
        d.apply(record)
        actions: list = []
        step, event = record["step"], record["event"]
        if event == dep.STEP_STARTED:
            self._send_step_start(d, step, record["attempt"], now, actions)
        elif event == dep.STEP_DONE:
            actions.append(self._deployment_log("info", f"{step} step done", d, step, now,
                                                duration_s=_duration(d.steps[step])))
            if step == dep.OFFLINE:
                self._set_state(d, actions)
            else:
                actions.append(self._deployment_log("info", "deployment finished", d, step, now))
        elif event == dep.STEP_FAILED_EVENT:
            actions.append(self._deployment_log("error", f"{step} step failed", d, step, now,
                                                error=record.get("error"), duration_s=_duration(d.steps[step])))
            self._set_state(d, actions)
        elif event == dep.STEP_REARMED:
            actions.append(self._deployment_log("info", "deployment re-armed", d, step, now))
            self._set_state(d, actions)
        self._advance(d, now, actions)
        return actions

    def ledger_lost(self) -> None:
        """The ledger file was deleted or replaced: start no step until `ledger_restored`."""
        self.ledger_ok = False

    def ledger_restored(self, now: float) -> list:
        """`self.records` are in a fresh ledger: start what waited meanwhile."""
        self.ledger_ok = True
        actions: list = []
        for d in self.deployments.values():
            self._advance(d, now, actions)
        return actions

    def deployment(self, role: str, version: str | Version) -> dep.Deployment | None:
        return self.deployments.get(dep.key(role, version))

    def retry(self, role: str, version: str, now: float) -> list:
        """Re-arm the failed steps of a deployment (operator action)."""
        d = self.deployment(role, version)
        if d is None:
            raise KeyError(f"no deployment of {role}@{version} is configured")
        failed = [s.name for s in d.steps.values() if s.status == dep.STEP_FAILED]
        if not failed:
            raise ValueError(f"{role}@{version} has no failed step to retry (state {d.state})")
        if d.writing is not None:
            raise ValueError(f"{role}@{version} is busy writing its ledger; try again")
        actions: list = []
        self._write(d, d.record(dep.STEP_REARMED, failed[0], now), actions)
        return actions

    def starting(self, now: float) -> list:
        """Log the state of every declared deployment once at startup."""
        actions = []
        for d in self.deployments.values():
            event = {HELD: "deployment held", LIVE: "deployment live", FAILED: "deployment failed"}[d.state]
            actions.append(self._deployment_log("info" if d.state != FAILED else "warning", event, d, d.next_step(), now))
        return actions

    # ------------------------------------------------------------ registration

    def _register(self, conn: int, message: Any, now: float) -> list:
        if message.__class__ is not dict or message.get("name") != REGISTER:
            return self._refuse_registration(conn, CLOSE_NOT_REGISTERED, f"register first: the first frame must be a JSON object named {REGISTER!r}")
        role = message.get("sender")
        if role.__class__ is not str or not role:
            return self._refuse_registration(conn, CLOSE_BAD_REGISTRATION, "the registration needs the role as a string 'sender'")
        routes = self.table.roles.get(role)
        if routes is None:
            return self._refuse_registration(conn, CLOSE_UNKNOWN_ROLE, f"role {shown(role)} is not in the routing configuration")
        payload = message.get("payload")
        raw_version = payload.get("version") if isinstance(payload, dict) else None
        if raw_version is None:
            version = UNVERSIONED
        else:
            try:
                version = Version(raw_version)
            except InvalidVersion as e:
                return self._refuse_registration(conn, CLOSE_BAD_VERSION, f"invalid version: {e}")
        peer, _ = self.pending.pop(conn, ("?", now))
        d = self.deployment(role, version)
        state = d.state if d is not None else LIVE
        instance = Instance(conn, role, version, routes.profile_for(version), peer)
        instance.metric_key = (role, self.stats.version_label(role, str(version)))
        self.registry.add(instance, state)
        actions: list = [Log("info", "service registered", {
            "role": role, "version": str(version), "instance": instance.label, "peer": peer, "state": state})]
        if d is not None:
            self._advance(d, now, actions)
        script_of = self.deployment_by_script.get(role)
        if script_of is not None:
            self._advance(script_of, now, actions)
        return actions

    def _refuse_registration(self, conn: int, code: int, reason: str) -> list:
        peer, _ = self.pending.pop(conn, ("?", 0.0))
        self.stats.registrations_refused[code] += 1
        return [Log("warning", "registration refused", {"peer": peer, "conn": conn, "code": code, "reason": reason}),
                Close(conn, code, reason)]

    # ----------------------------------------------------------------- routing

    def _route(self, sender: Instance, message: dict, name: str, now: float, actions: list,
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
                response_time = int((now - activity[LAST_SEEN]) * 1e9)
                activity[LAST_SEEN] = now
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
                actions.extend(self._refusal(sender, now, "bad_version_requirement", str(e), name=name))
                return

        # An answer to a command we routed recently goes back to the asker only.
        response_to = message.get("responseTo")
        if response_to.__class__ is str:
            asker = self.registry.by_conn.get(self.commands.get(response_to))
            if asker is not None and public in asker.profile.receives:
                self._deliver(sender, asker, message, public, activity, self._frame(message, response_time, now),
                              {}, actions)
                return

        roles = self.table.receivers.get(public)
        if not roles:
            self.stats.undeliverable[public] += 1
            actions.extend(self._budgeted_log(sender, now, "warning", "message undeliverable", {
                "sender": sender.role, "name": public, "reason": "no role receives this message"}))
            return
        script_of = self.deployment_by_script.get(sender.role)
        missed = None
        frame = self._frame(message, response_time, now)
        encoded: dict[str, bytes] = {}
        for role in roles:
            if script_of is not None and role == script_of.target.role and (
                requirement is None or requirement.matches(script_of.target.version)
            ):
                # A deployment script talks to the version it deploys, held or not;
                # with a version requirement it may also read an older one.
                target = self._pick_in_pool(self.registry.pool(role, script_of.target.version), public)
                reason = f"{script_of.target} has no instance connected"
            else:
                target, reason = self._choose(role, public, activity, requirement)
            if target is None:
                if missed is None:
                    missed = {}
                missed[role] = reason
                continue
            self._deliver(sender, target, message, public, activity, frame, encoded, actions)
        if missed is not None:
            # Contract 3.2: every role that misses it (e.g. no version satisfies
            # the requirement) is logged with why -- a warning when nobody got it.
            nobody = len(missed) == len(roles)
            if nobody:
                self.stats.undeliverable[public] += 1
            actions.extend(self._budgeted_log(sender, now, "warning" if nobody else "info", "message undeliverable", {
                "sender": sender.role, "name": public, "activity_id": activity_id, "missed": missed}))

    def _choose(self, role: str, public: str, activity: dict | None,
                requirement: Requirement | None) -> tuple[Instance | None, str]:
        if activity is not None:
            member = activity.get(role)
            if member is not None:
                instance = self.registry.by_conn.get(abs(member))
                # Affinity holds whatever the version, but a held or failed
                # version is only reached when it asked on this activity itself.
                if instance is not None and public in instance.profile.receives and (
                    member > 0 or instance.pool.state == LIVE
                ):
                    return instance, ""
        for pool in self.registry.pools.get(role, ()):
            if pool.state == LIVE and public in pool.profile.receives and (
                requirement is None or requirement.matches(pool.version)
            ):
                return pool.pick(), ""
        if requirement is not None:
            return None, f"no live version of {role!r} satisfies version {requirement.text!r}"
        if role in self.registry.pools:
            return None, f"no live version of {role!r} is connected (held or failed versions get no production traffic)"
        return None, f"no instance of {role!r} is connected"

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

    def _refusal(self, instance: Instance, now: float, code: str, reason: str, name: str | None = None) -> list:
        self.stats.refused[code] += 1
        return self._budgeted_log(instance, now, "warning", "message refused", {
            "role": instance.role, "instance": instance.label, "peer": instance.peer, "name": name, "code": code,
            "reason": reason})

    def _budgeted_log(self, instance: Instance, now: float, level: str, event: str, fields: dict[str, Any]) -> list:
        """A log event caused by one connection's frames -- at most
        WARNING_BURST of them per connection and WARNING_WINDOW, so that a
        flood cannot flood the log; the rest is summed up in one `warnings
        suppressed` event when the window ends (see `tick`) or the
        connection closes. The metrics count every one."""
        if now - instance.warning_window_start >= WARNING_WINDOW:
            instance.warning_window_start = now
            instance.warnings_logged = 0
        if instance.warnings_logged >= WARNING_BURST:
            suppressed = instance.warnings_suppressed
            if suppressed is None:
                suppressed = instance.warnings_suppressed = {}
                self._suppressing.add(instance)
            suppressed[event] = suppressed.get(event, 0) + 1
            return []
        instance.warnings_logged += 1
        return [Log(level, event, fields)]

    def _suppressed_warnings(self, instance: Instance) -> Log:
        by_event, instance.warnings_suppressed = instance.warnings_suppressed or {}, None
        self._suppressing.discard(instance)
        return Log("warning", "warnings suppressed", {
            "role": instance.role, "instance": instance.label, "peer": instance.peer,
            "suppressed": sum(by_event.values()), "by_event": by_event,
            "reason": f"more than {WARNING_BURST} warnings about this connection within {WARNING_WINDOW:g}s; "
                      "the metrics count them all -- fix or stop this client"})

    # ---------------------------------------------------------------- security

    def _security(self, instance: Instance, message: dict, name: str, now: float) -> list:
        """The security adapter of Exocom 0.27: a role named `security`
        authorizes every message before it is routed."""
        actions: list = []
        activity_id = message.get("activityId")
        if activity_id.__class__ is not str:
            activity_id = None  # keys of the adapter's memories are strings (a list is not even hashable)
        if instance.role == SECURITY_ROLE:
            if name in ("message authorized", "message unauthorized"):
                pending = self.authorizations.get(activity_id)
                if pending is None:
                    actions.extend(self._refusal(instance, now, "unknown_authorization", "answer to an unknown or expired authorization", name=name))
                    return actions
                self.authorizations.pop(activity_id)
                original, sender_conn = pending
                sender = self.registry.by_conn.get(sender_conn)
                if sender is None:
                    return actions
                if name == "message authorized":
                    self._route(sender, original, original["name"], now, actions)
                else:
                    actions.append(Log("warning", "message unauthorized", {
                        "role": sender.role, "name": original["name"], "activity_id": original.get("activityId")}))
                    self._send_to(sender, {"name": "message unauthorized", "id": new_id(),
                                           "activityId": original.get("activityId"), "payload": original}, now, actions)
                return actions
            if name == "security request":
                request = message.get("payload")
                if not isinstance(request, dict) or not isinstance(request.get("name"), str):
                    actions.extend(self._refusal(instance, now, "bad_security_request", "'security request' needs a message object as payload", name=name))
                    return actions
                for key in ("id", "activityId"):
                    if request.get(key).__class__ is not str:
                        request[key] = new_id()
                request["isSecurity"] = True
                self.security_requests.put(request["activityId"], activity_id)
                self._route(instance, request, request["name"], now, actions, public=request["name"])
                return actions
            self._route(instance, message, name, now, actions)
            return actions
        security_activity = self.security_requests.get(activity_id)
        if security_activity is not None:
            # An answer to the security service's own query: wrapped and sent back to it.
            self.security_requests.pop(activity_id)
            self._send_to_role(SECURITY_ROLE, {"name": "security response", "id": new_id(),
                                               "activityId": security_activity, "payload": message,
                                               "isSecurity": True}, now, actions)
            return actions
        auth_activity = new_id()
        self.authorizations.put(auth_activity, (message, instance.conn))
        self._send_to_role(SECURITY_ROLE, {"name": "authorize message", "id": new_id(),
                                           "activityId": auth_activity, "payload": message}, now, actions)
        return actions

    def _send_to_role(self, role: str, message: dict, now: float, actions: list) -> None:
        target, reason = self._choose(role, message["name"], None, None)
        if target is None:
            # The security role need not list the adapter's messages in its
            # receives (it did not under Exocom 0.27): any live instance will do,
            # never a held or failed one.
            target = next((p.pick() for p in self.registry.pools.get(role, ()) if p.state == LIVE and p.instances),
                          None)
        if target is None:
            actions.append(Log("warning", "message undeliverable", {"name": message["name"], "role": role,
                                                                    "reason": reason or f"no instance of {role!r}"}))
            return
        self._send_to(target, message, now, actions)

    def _send_to(self, target: Instance, message: dict, now: float, actions: list) -> None:
        """A message the broker itself sends to one instance."""
        message["timestamp"] = _fromtimestamp(now, _UTC)
        message.setdefault("sender", "exocom")
        actions.append(Deliver(target.conn, _dumps(message, option=_OPT)))

    # ------------------------------------------------------------- deployments

    def _handshake_answer(self, instance: Instance, message: dict, name: str, now: float) -> list:
        d, step, outcome = self.handshake_answers[name]
        if instance.role != d.script_role:
            return self._refusal(instance, now, "not_deployment_script", f"only {d.script_role!r} may answer the deployment of {d.target}", name=name)
        flight = d.in_flight
        if flight is None or flight.step != step:
            return [self._deployment_log("warning", "deployment answer ignored", d, step, now,
                                         reason=f"the {step} step is not running (status {d.steps[step].status})")]
        activity_id = message.get("activityId")
        if activity_id is not None and activity_id != flight.activity_id:
            return [self._deployment_log("warning", "deployment answer ignored", d, step, now,
                                         reason="it answers an earlier attempt (another activityId)")]
        d.in_flight = None
        actions: list = []
        if outcome == "done":
            self._write(d, d.record(dep.STEP_DONE, step, now), actions)
        else:
            payload = message.get("payload")
            reason = payload.get("reason") if isinstance(payload, dict) else None
            self._write(d, d.record(dep.STEP_FAILED_EVENT, step, now,
                                    error=_reason_text(reason)), actions)
        return actions

    def _advance(self, d: dep.Deployment, now: float, actions: list) -> None:
        """Start the next step of `d` if it is due and can run now."""
        if d.writing is not None or d.in_flight is not None or not self.ledger_ok:
            return
        step = d.next_step()
        if step is None:
            return
        if not self.registry.pool(d.target.role, d.target.version) or not self.registry.pools.get(d.script_role):
            return
        self._write(d, d.record(dep.STEP_STARTED, step, now), actions)

    def _send_step_start(self, d: dep.Deployment, step: str, attempt: int, now: float, actions: list) -> None:
        scripts = self.registry.pools.get(d.script_role)
        if not scripts or not self.registry.pool(d.target.role, d.target.version):
            # Lost a party while the record was written; it runs again when both are back.
            actions.append(self._deployment_log("warning", "step interrupted", d, step, now,
                                                reason="the version or its deployment script disconnected before the step began"))
            return
        script = scripts[0].pick()
        activity_id = new_id()
        d.in_flight = dep.InFlight(step, activity_id, script.conn, now, now + d.step_timeout)
        activity = new_activity(now)
        activity[d.script_role] = script.conn
        self.activities.put(activity_id, activity)
        self._send_to(script, {"name": dep.message_name(d.target, step, "start"), "id": new_id(),
                               "activityId": activity_id, "payload": {"attempt": attempt}}, now, actions)
        actions.append(self._deployment_log("info", f"{step} step started", d, step, now, attempt=attempt,
                                            script_instance=script.label))

    def _write(self, d: dep.Deployment, record: dict[str, Any], actions: list) -> None:
        d.writing = record
        actions.append(WriteRecord(record))

    def _set_state(self, d: dep.Deployment, actions: list) -> None:
        state = d.state
        pool = self.registry.pool(d.target.role, d.target.version)
        if pool is not None and pool.state != state:
            pool.state = state
        event = {HELD: "version held", LIVE: "version live", FAILED: "version taken out of production"}[state]
        actions.append(Log("info" if state != FAILED else "warning", event,
                           {"role": d.target.role, "version": str(d.target.version), "state": state}))

    def _deployment_log(self, level: str, event: str, d: dep.Deployment, step: str | None, now: float, **fields) -> Log:
        s = d.steps.get(step) if step else None
        return Log(level, event, {"role": d.target.role, "version": str(d.target.version), "step": step,
                                  "attempt": s.attempts if s else None, "script": d.script_role, **fields})

    # ----------------------------------------------------------------- queries

    def config_json(self) -> dict[str, Any]:
        return {"clients": self.registry.clients(), "routes": self.config.to_service_data()}

    def deployments_json(self) -> list[dict[str, Any]]:
        return [d.to_json() for d in self.deployments.values()]


def _duration(step: dep.Step) -> float | None:
    if step.started_at is None or step.ended_at is None:
        return None
    return round(step.ended_at - step.started_at, 3)
