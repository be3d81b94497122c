"""The broker core: plain, synchronous Python with no I/O.

The trio shell (`exocom.server.listener`) feeds it events -- a connection
opened, a frame arrived, a connection closed, the clock ticked, a ledger
record was written -- and carries out the actions it returns (`actions`).
This module only takes a frame apart and hands it on; each concern has its
own module:

| concern | module |
|---|---|
| where a message goes | `routing.Router.route`, `choice.Choice.choose` |
| who may register as what | `registration` |
| deployments: the handshake and the ledger records | `deployer`, `deployments` |
| gradual rollouts: ramp, gates, abort, rollback | `ramps`, `gates`, `figures` |
| held, ramping, live, draining, drained, failed | `states` |
| the security adapter of Exocom 0.27 | `security` |
| a new configuration while running | `reconfigure` |
| the warning budget per connection | `budget` |
| several brokers, one fleet: presence, hand-over, answers across brokers | `cluster`, `presence` |
"""

from __future__ import annotations

from typing import Any

import orjson

from .actions import CLOSE_ALREADY_REGISTERED, Close, Log, shown
from .activities import Generations
from .budget import WarningBudget
from .cluster import Cluster
from .config import Config
from .deployer import Deployer
from .deployments import Deployment
from .ramps import Ramps
from .reconfigure import reconfigure
from .registration import REGISTER, Registrations
from .registry import LIVE, RAMPING, Instance, Registry
from .routes import RoutingTable
from .routing import Router
from .security import SECURITY_ANSWERS, SECURITY_ROLE, SecurityAdapter, with_implicit_routes
from .states import VersionStates
from .stats import Stats
from .versions import Version

_loads = orjson.loads


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
        drain_period: float = 30.0,
        now: float = 0.0,
        cluster_id: str | None = None,
        lease: float = 5.0,
    ):
        self.config = config
        self.table = RoutingTable(config)
        self.registry = Registry()
        self.stats = Stats()
        self.budget = WarningBudget(self.stats)
        self.registrations = Registrations(self.table, self.registry, self.stats)
        self.activities = Generations(activity_ttl, now, max_activities)
        self.commands = Generations(activity_ttl, now, max_activities)  # message id -> sender conn
        self.router = Router(self.table, self.registry, self.stats, self.budget,
                             activities=self.activities, commands=self.commands,
                             script_targets={}, log_deliveries=log_deliveries)
        self.deployer = Deployer(config, self.registry, self.router, self.budget,
                                 ledger_records=ledger_records, step_timeout=step_timeout)
        self.router.script_targets = self.deployer.script_targets()
        self.ramps = Ramps(self.deployer, self.registry, self.stats, self.router.choice.views)
        self.states = VersionStates(self.registry, self.router.choice, self.stats, self.activities,
                                    state_of=self.deployer.state_of, drain_period=drain_period)
        self.deployer.refresh = self.ramps.refresh = self.states.refresh
        self.deployer.rollout_written = self.ramps.record_written
        self.router.error_names = self.ramps.error_names
        self.router.ramping_replied = self.ramps.replied
        self.security = (SecurityAdapter(self.router, self.registry, self.budget, ttl=activity_ttl, now=now)
                         if config.has_security else None)
        # Per connection, 0 = unlimited; a bucket holds one second's worth (at least one message).
        self.max_rate = max_messages_per_second
        self.rate_burst = max(1.0, max_messages_per_second)
        # One of several brokers (`exocom serve --cluster`): `cluster_id` names this one.
        self.cluster = None
        if cluster_id is not None:
            self.cluster = self.router.cluster = Cluster(cluster_id, self.router, ttl=activity_ttl, now=now,
                                                         max_entries=max_activities, lease=lease)
            self.cluster.join_deployments(self.deployer)
            self.cluster.refresh = self.states.refresh
            self.states.elsewhere = self.cluster.versions_elsewhere
            self.ramps.elsewhere = self.cluster.figures_elsewhere
            self.cluster.security = self.security

    # ------------------------------------------------------------------ events

    def connected(self, conn: int, peer: str, now: float = 0.0, *, bearer: str | None = None,
                  cert_roles: frozenset[str] | None = None) -> list:
        """`bearer`: the token of the upgrade request's `Authorization: Bearer`, if any; `cert_roles`: the
        roles the connection's client certificate names (None: no client certificates)."""
        self.registrations.connected(conn, peer, now, bearer=bearer, cert_roles=cert_roles)
        return []

    def disconnected(self, conn: int, now: float, unsent: list[bytes] = ()) -> list:
        """`conn` closed; `unsent` are the frames delivered to it that never
        reached its socket, to be re-routed."""
        if self.registrations.closed(conn):
            return []
        instance = self.registry.remove(conn)
        if instance is None:
            return []
        actions: list = [
            Log("info", "service deregistered", {"role": instance.role, "version": str(instance.version), "instance": instance.label})
        ]
        actions += self.budget.closed(instance)
        self.states.refresh(instance.role, now, actions)
        if unsent:
            self.router.reroute(instance, unsent, now, actions)
        self.ramps.disconnected(instance, now, actions)
        self.deployer.deregistered(instance, now, actions)
        return actions

    def outbox_congested(self, conn: int, congested: bool) -> list:
        """The shell saw `conn`'s outbox pass its high-water mark (or drain
        below the low-water mark again)."""
        instance = self.registry.by_conn.get(conn)
        if instance is None or instance.congested == congested:
            return []
        instance.congested = congested
        fields = {"role": instance.role, "version": str(instance.version), "instance": instance.label}
        if congested:
            return [Log("warning", "instance congested", {**fields, "reason": (
                "it reads slower than it is sent to; new messages go to other instances of its version while "
                "they have room (activities it is part of and answers to it still reach it)")})]
        return [Log("info", "instance drained", fields)]

    def frame_received(self, conn: int, data: str | bytes, now: float) -> list:
        instance = self.registry.by_conn.get(conn)
        if self.max_rate and instance is not None and not self._take_token(instance, now):
            # Before decoding: a flood costs as little as possible.
            return self.budget.refusal(instance, now, "rate_limited",
                                       f"more than {self.max_rate:g} messages per second from this connection "
                                       "(--max-messages-per-second); the message is dropped")
        try:
            message = _loads(data)
        except orjson.JSONDecodeError:
            message = None
        if instance is None:
            instance, actions = self.registrations.register(conn, message, now, self.deployer.state_of)
            if instance is not None:
                self.states.refresh(instance.role, now, actions)
                actions.append(Log("info", "service registered", {
                    "role": instance.role, "version": str(instance.version), "instance": instance.label,
                    "peer": instance.peer, "state": instance.pool.state}))
                self.deployer.registered(instance, now, actions)
            return actions
        if message.__class__ is not dict:
            return self.budget.refusal(instance, now, *(("not_object", "not a JSON object") if message is not None else ("not_json", "not valid JSON")))
        name = message.get("name")
        if name.__class__ is not str:
            return self.budget.refusal(instance, now, "no_name", "the message has no string 'name'")
        if name == REGISTER:
            return [
                *self.budget.refusal(instance, now, "already_registered", "already registered", name=name),
                Close(conn, CLOSE_ALREADY_REGISTERED, f"already registered as {instance.role}"),
            ]
        sender = message.get("sender")
        if sender is not None and sender != instance.role:
            return self.budget.refusal(instance, now, "spoofed_sender", f"sender {shown(sender)} is not the role this connection registered as", name=name)
        if name in self.deployer.answers:
            return self.deployer.answer(instance, message, name, now)
        security = self.security
        if security is not None and instance.role == SECURITY_ROLE and name in SECURITY_ANSWERS:
            # The security service needs no sends of its own for the adapter's messages.
            return security.message(instance, message, name, now)
        if name not in instance.profile.sends:
            return self.budget.refusal(instance, now, "not_allowed", f"role {instance.role!r} is not allowed to send {shown(name)} (not in its sends)", name=name)
        try:
            if security is not None:
                return security.message(instance, message, name, now)
            actions: list = []
            self.router.route(instance, message, name, now, actions)
            return actions
        except orjson.JSONEncodeError as e:
            # orjson reads 1024 levels of nesting but writes only 254: refuse
            # what cannot be forwarded (nothing was delivered yet: every
            # receiver's frame is encoded before the first delivery).
            return self.budget.refusal(instance, now, "not_forwardable", f"the message cannot be forwarded: {e}", name=name)

    def _take_token(self, instance: Instance, now: float) -> bool:
        tokens = min(self.rate_burst, instance.tokens + (now - instance.tokens_at) * self.max_rate)
        instance.tokens_at = now
        if tokens < 1.0:
            instance.tokens = tokens
            return False
        instance.tokens = tokens - 1.0
        return True

    def tick(self, now: float) -> list:
        """Called about once a second: expire memories, enforce time limits."""
        self.activities.rotate_if_due(now)
        self.commands.rotate_if_due(now)
        if self.security is not None:
            self.security.rotate_if_due(now)
        actions = self.registrations.overdue(now)
        actions += self.budget.windows_ended(now)
        self.deployer.deadlines(now, actions)
        self.ramps.tick(now, actions)
        self.states.tick(now, actions)
        if self.cluster is not None:
            actions += self.cluster.tick(now)
        return actions

    def handed_over(self, data: bytes, now: float) -> list:
        """Cluster: an entry another broker handed to this one (`cluster.Cluster.received`)."""
        return self.cluster.received(data, now)

    def record_written(self, record: dict[str, Any], now: float) -> list:
        """The ledger made `record` durable: now act on it."""
        return self.deployer.record_written(record, now)

    def ledger_lost(self) -> None:
        """The ledger file was deleted or replaced: start no step until `ledger_restored`."""
        self.deployer.ledger_lost()

    def ledger_restored(self, now: float) -> list:
        """Every record is in a fresh ledger again: start what waited meanwhile."""
        return self.deployer.ledger_restored(now)

    def reconfigure(self, config: Config, now: float) -> list:
        """Run with `config` from now on, keeping every connection of a role
        it still has (`reconfigure` says what is rebuilt and what is kept)."""
        return reconfigure(self, config, now)

    def rollout(self, role: str, version: str, action: str, now: float) -> list:
        """An operator's pause, resume, promote or abort of a ramp (KeyError: no
        such rollout; ValueError: not possible now, the message says why)."""
        self._operator(role, version, now)
        return self.ramps.act(role, version, action, now)

    def rollback(self, role: str, version: str, now: float) -> list:
        """An operator takes a live version out of production."""
        self._operator(role, version, now)
        return self.ramps.rollback(role, version, now)

    def retry(self, role: str, version: str, now: float) -> list:
        """Re-arm the failed steps of a deployment (operator action)."""
        self._operator(role, version, now)
        return self.deployer.retry(role, version, now)

    def _operator(self, role: str, version: str, now: float) -> None:
        if self.cluster is not None:
            self.cluster.operator_may_act(role, version, now)

    def starting(self, now: float) -> list:
        """Log the state of every declared deployment once at startup."""
        return self.deployer.starting()

    # ----------------------------------------------------------------- queries

    @property
    def pending(self) -> dict[int, tuple[str, float]]:
        return self.registrations.pending

    @property
    def deployments(self) -> dict:
        return self.deployer.deployments

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every ledger record, in ledger order."""
        return self.deployer.records

    @property
    def orphan_records(self) -> list[dict[str, Any]]:
        return self.deployer.orphan_records

    def deployment(self, role: str, version: str | Version) -> Deployment | None:
        return self.deployer.deployment(role, version)

    def config_json(self) -> dict[str, Any]:
        clients = self.registry.clients()
        for client in clients:
            for version in client["versions"]:
                version["share"] = self.share_of(client["role"], version["version"], version["state"])
        out = {"clients": clients, "routes": with_implicit_routes(self.config.to_service_data())}
        if self.cluster is not None:
            out["cluster"] = self.cluster.to_json()
        return out

    def share_of(self, role: str, version: str, state: str) -> float:
        """Percent of the role's new activities that go to this version now."""
        if state == LIVE:
            ramping = sum(self.deployer.state_of(role, p.version)[1] for p in self.registry.pools.get(role, ())
                          if p.state == RAMPING)
            return max(0.0, 100.0 - ramping)
        if state == RAMPING:
            d = self.deployer.deployment(role, version)
            return d.share if d is not None else 0.0
        return 0.0

    def deployments_json(self) -> list[dict[str, Any]]:
        out = self.deployer.to_json()
        for row in out:
            d = self.deployer.deployment(row["role"], row["version"])
            if row["rollout"] is not None and d.state == RAMPING:
                row["rollout"]["figures"] = self.ramps.figures(d)
                row["rollout"]["nextStepAt"] = (d.ramp_since + d.rollout.interval) if d.ramp_since else None
        return out
