"""Several brokers, one fleet: what a broker decides about the others.

A message is routed by the rules of one broker (`routing`, `choice`) over
the cluster's versions: the states (`states`) place a version connected only
to other brokers (`versions_elsewhere`, from the presence table) in the
routing view, and when the rules choose it the message goes to a broker that
holds it (`route_away`). A version connected here is preferred to the same
version elsewhere. The view is recomputed whenever the presence table
changes, so the version rules live in `choice` only. The message is handed over as an entry (`HandOver`) that the shell appends to
that broker's Redis stream. The receiving broker routes the entry to the one
role it names, by its own rules (`received`), exactly once: Redis delivers
at least once, so entries are deduplicated by message id and role.

Three memories keep one-broker behaviour across brokers, all bounded like the
router's (`Generations`):

- `homes`: an activity handed to another broker for a role stays there
  (affinity): the router marks that role's member 0 ("elsewhere") in the
  activity and asks `home` before choosing locally.
- `origins`: message id -> the broker it came from, so that an answer with
  `responseTo` goes back to the broker of the asker (`to_asker`), which
  delivers it to the asker only.
- `seen`: the (message id, role) pairs delivered from other brokers.

Plain data in, actions out: no clock, no I/O.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from .actions import HandOver, Log
from .activities import LAST_SEEN, Generations, new_activity
from .choice import Elsewhere
from .figures import Figures
from .leases import DriverLeases
from .presence import Presence, holding_of
from .registry import FAILED, LIVE, RAMPING, Instance
from .security import SECURITY_ROLE
from .versions import InvalidRequirement, InvalidVersion, Requirement, Version

_dumps = orjson.dumps
_loads = orjson.loads
_OPT = orjson.OPT_UTC_Z
ELSEWHERE = 0  # an activity member on another broker (connection ids start at 1)
# Kinds of entries of the security adapter ("t"): a message for the security service, its verdict for the
# broker of the sender, an answer to its query for its broker.
TO_SECURITY, VERDICT, SECURITY_ANSWER = "to-security", "verdict", "security-answer"


class RemoteSender(NamedTuple):
    """The sender of a handed-over message, as the router's delivery log names it."""

    role: str
    version: str


class Cluster:
    def __init__(self, me: str, router, *, ttl: float, now: float, max_entries: int, lease: float) -> None:
        self.me = me
        self.router = router
        self.presence = Presence(me)
        self.leases = DriverLeases(me, lease)
        self.deployer = None
        # `states.VersionStates.refresh`: recomputes a role's version states when what others hold changed.
        self.refresh = lambda role, now, actions: None
        # broker -> what it saw of each ramp (`ramps.Ramps.seen_here`), as it last published it. Kept after
        # it is gone: the replies it carried happened.
        self.ramp_figures: dict[str, dict[str, Any]] = {}
        self.homes = Generations(ttl, now, max_entries)  # (activity id, role) -> broker
        self.origins = Generations(ttl, now, max_entries)  # message id -> broker of its sender
        self.seen = Generations(ttl, now, max_entries)  # (message id, role) -> True
        # The security adapter (`security`), when the security service and a sender are on different brokers:
        self.security = None  # this broker's adapter (set by the broker)
        self.authorizers = Generations(ttl, now, max_entries)  # authorization activity -> broker that waits
        self.security_askers = Generations(ttl, now, max_entries)  # query activity -> broker of the security service
        self._next = 0  # round robin over the brokers that hold the chosen version
        self.handed_over = 0
        self.received_entries = 0
        self.duplicates = 0

    # --------------------------------------------------------------- presence

    def presence_seen(self, broker: str, holding: dict, expires_at: float, now: float,
                      ramp_figures: dict[str, Any] | None = None) -> list:
        """`broker` published what it holds (`presence.Presence.seen`) and what it saw of the ramps."""
        actions = self.presence.seen(broker, holding, expires_at, now)
        if ramp_figures is not None and broker != self.me and expires_at > now:
            self.ramp_figures[broker] = ramp_figures
        self._refresh_changed(now, actions)
        return actions

    def presence_left(self, broker: str, now: float) -> list:
        actions = self.presence.left(broker)
        self._refresh_changed(now, actions)
        return actions

    def _refresh_changed(self, now: float, actions: list) -> None:
        """The states of a role's versions are the cluster's (`states`): recompute them for every role
        whose holders changed."""
        changed = self.presence.changed
        if changed:
            self.presence.changed = set()
            for role in sorted(changed):
                self.refresh(role, now, actions)

    def versions_elsewhere(self, role: str) -> list[tuple[Version, Any]]:
        """The versions of `role` connected only to other brokers, with their profiles."""
        table = self.router.table.roles.get(role)
        if table is None:
            return []
        here = {pool.version for pool in self.router.registry.pools.get(role, ())}
        out: dict[Version, Any] = {}
        for _, text, _ in self.presence.holders(role):
            try:
                version = Version(text)
            except InvalidVersion:
                continue
            if version not in here and version not in out:
                out[version] = table.profile_for(version)
        return list(out.items())

    def figures_elsewhere(self, d, stable: Version | None) -> tuple[Figures, Figures | None] | None:
        """What the other brokers saw of `d`'s ramp since it began: its version's figures and the
        `stable` version's, added up (`ramps.Ramps._since_ramp`)."""
        name, began = str(d.target), d.ramp_began
        new_label, stable_label = str(d.target.version).partition("+")[0], str(stable).partition("+")[0]
        new = stable_figures = None
        for published in self.ramp_figures.values():
            ramp = published.get(name)
            if ramp is None or ramp.get("began") != began:
                continue  # nothing of this ramp there, or of an earlier ramp of the version
            try:
                versions = ramp["versions"]
                seen = Figures.from_list(versions[new_label]) if new_label in versions else Figures()
                seen_stable = Figures.from_list(versions[stable_label]) if stable_label in versions else Figures()
            except (TypeError, ValueError, KeyError, IndexError):
                continue  # a broker of another release
            new = seen if new is None else new.plus(seen)
            stable_figures = seen_stable if stable_figures is None else stable_figures.plus(seen_stable)
        if new is None:
            return None
        return new, stable_figures if stable is not None else None

    # ------------------------------------------------------------ deployments

    def join_deployments(self, deployer) -> None:
        """Deployments are driven cluster-wide: by the broker that holds a deployment's lease,
        with the version it deploys connected to any broker."""
        self.deployer = deployer
        deployer.may_drive = lambda d, now: self.leases.may_drive(str(d.target), now)
        deployer.connected = self.connected

    def connected(self, role: str, version: Version) -> bool:
        if self.router.registry.pool(role, version) is not None:
            return True
        text = str(version)
        return any(v == text for _, v, _ in self.presence.holders(role))

    def wanted_leases(self) -> list[str]:
        """The deployments this broker should drive: unfinished with their script connected here, or
        ramping with instances of the version here (a ramp goes on after its script is gone; its gates
        judge the driver's own figures)."""
        registry = self.router.registry
        return [str(d.target) for d in self.deployer.deployments.values()
                if (registry.pools.get(d.script_role) and (d.next_step() is not None or d.state == RAMPING))
                or (d.state == RAMPING and registry.pool(d.target.role, d.target.version) is not None)]

    def operator_may_act(self, role: str, version: str, now: float) -> None:
        """ValueError (HTTP 409) when another broker drives role@version: the action goes to that one.
        A deployment nobody drives (no script connected anywhere) may be acted on from any broker."""
        name = f"{role}@{version}"
        holder = self.leases.holders.get(name)
        if holder is not None and not self.leases.may_drive(name, now):
            raise ValueError(f"{name} is driven by broker {holder!r} now: send the action to that broker "
                             "(exocom status on it)")

    def leases_answered(self, answers: list[tuple[str, int | None, str | None]], sent_at: float, now: float) -> list:
        actions: list = []
        asked = {name for name, _, _ in answers}
        for name in [n for n in self.leases.holders if n not in asked]:
            del self.leases.holders[name]  # not asked any more: who holds it is not known here now
        for name, token, holder in answers:
            actions += self.leases.answered(name, token, holder, sent_at, now)
        self.deployer.advance_all(now, actions)  # a lease taken: its due step starts
        return actions

    def leases_released(self, names: list[str]) -> list:
        for name in names:
            self.leases.released(name)
        return [Log("info", "deployment driver lease released", {"deployment": name}) for name in names]

    def records_seen(self, records: list[dict[str, Any]], now: float) -> list:
        actions: list = []
        for record in records:
            actions += self.deployer.record_seen(record, now)
        return actions

    def record_refused(self, record: dict[str, Any], now: float) -> list:
        self.leases.released(f"{record['role']}@{record['version']}")
        return self.deployer.record_refused(record, now)

    # ------------------------------------------------------------ sending side

    def home(self, activity_id: str, role: str) -> str | None:
        """The broker that holds `role`'s member of this activity, if it is still there."""
        broker = self.homes.get((activity_id, role))
        return broker if broker in self.presence.holdings else None

    def holder_of(self, role: str, version: Version, public: str) -> str | None:
        """Another broker with instances of exactly role@version (in any state: a deployment
        script talks to the version it deploys, held or not), round robin over them."""
        table = self.router.table.roles.get(role)
        if table is None or public not in table.profile_for(version).receives:
            return None
        text = str(version)
        brokers = [broker for broker, v, _ in self.presence.holders(role) if v == text]
        if not brokers:
            return None
        self._next = (self._next + 1) % len(brokers)
        return brokers[self._next]

    def hand_over(self, broker: str, sender: Instance, role: str | None, public: str, frame: dict,
                  requirement: Requirement | None, key: str | None, actions: list, exact: Version | None = None,
                  chosen: Version | None = None) -> None:
        """`role` None: an answer for the asker on `broker`; `exact`: to that version of `role` only;
        `chosen`: the version this broker's rules chose (the receiving broker may not know yet what this one
        knows, e.g. that a ramp began)."""
        entry = {"o": self.me, "r": role, "p": public, "v": requirement.text if requirement else None, "k": key,
                 "s": sender.role, "sv": str(sender.version), "f": frame}
        if exact is not None:
            entry["x"] = str(exact)
        elif chosen is not None:
            entry["c"] = str(chosen)
        actions.append(HandOver(broker, _dumps(entry, option=_OPT)))
        self.handed_over += 1

    def route_away(self, sender: Instance, role: str, public: str, activity_id: str | None, activity: dict | None,
                   frame: dict, requirement: Requirement | None, key: str | None, actions: list,
                   broker: str | None = None, chosen: str | Elsewhere = "") -> bool:
        """No instance here takes `public` for `role`: hand it to a broker that has one (`broker`
        when affinity already named it; else one with the version the routing rules `chosen`, or
        with the version a deployment script deploys). False: no broker has one."""
        exact = None
        deploys = self.router.script_targets.get(sender.role)
        if deploys is not None and role == deploys.role and (requirement is None or requirement.matches(deploys.version)):
            exact = deploys.version  # as `Router.route` does for a deployment script
        version = chosen.version if chosen.__class__ is Elsewhere else None
        if broker is None:
            target = exact if exact is not None else version
            broker = self.holder_of(role, target, public) if target is not None else None
            if broker is None:
                return False
        if activity is not None:
            activity[role] = ELSEWHERE
            self.homes.put((activity_id, role), broker)
        self.hand_over(broker, sender, role, public, frame, requirement, key, actions, exact, version)
        return True

    def to_asker(self, sender: Instance, response_to: str, public: str, frame: dict, actions: list) -> bool:
        """An answer to a message that came from another broker goes back there."""
        broker = self.origins.get(response_to)
        if broker is None or broker not in self.presence.holdings:
            return False
        self.hand_over(broker, sender, None, public, frame, None, None, actions)
        return True

    # ------------------------------------------- the security adapter, across brokers

    def to_security(self, message: dict, actions: list) -> bool:
        """A message of the security adapter (`authorize message`, `security response`) for the security
        service, connected only to other brokers. False: to none."""
        brokers = sorted({b for b, _, entry in self.presence.holders(SECURITY_ROLE) if entry["state"] == LIVE})
        if not brokers:
            return False
        self._next = (self._next + 1) % len(brokers)
        self._security_entry(brokers[self._next], TO_SECURITY, {"f": message}, actions)
        return True

    def verdict_to_asker(self, name: str, activity_id: Any, actions: list) -> bool:
        """The security service's verdict on a message that waits on the broker that asked for it."""
        return self._back(self.authorizers, activity_id, VERDICT, {"n": name, "a": activity_id}, actions)

    def security_answer_to_asker(self, message: dict, activity_id: Any, actions: list) -> bool:
        """An answer to a query of a security service connected to another broker."""
        return self._back(self.security_askers, activity_id, SECURITY_ANSWER, {"f": message}, actions)

    def _back(self, memory: Generations, activity_id: Any, kind: str, fields: dict, actions: list) -> bool:
        """To the broker `memory` remembers for `activity_id`, once. False: it remembers none."""
        broker = memory.get(activity_id) if activity_id.__class__ is str else None
        if broker is None:
            return False
        memory.pop(activity_id)
        self._security_entry(broker, kind, fields, actions)
        return True

    def _security_entry(self, broker: str, kind: str, fields: dict, actions: list) -> None:
        actions.append(HandOver(broker, _dumps({"o": self.me, "t": kind, **fields}, option=_OPT)))
        self.handed_over += 1

    def _security_received(self, entry: dict, now: float) -> list:
        actions: list = []
        security = self.security
        kind, origin = entry["t"], entry["o"]
        key = (kind, entry["a"] if kind == VERDICT else entry["f"].get("id"))
        if self.seen.get(key) is not None:
            self.duplicates += 1
            return []
        self.seen.put(key, True)
        if security is None:
            return [Log("error", "cluster entry unreadable", {
                "reason": "an entry of the security adapter, but this broker's configuration has no security role: "
                          "every broker of a cluster needs the same configuration"})]
        if kind == VERDICT:
            security.verdict(None, entry["n"], entry["a"], now, actions)
        elif kind == SECURITY_ANSWER:
            message = entry["f"]
            if not security.security_answer(message, message.get("activityId"), now, actions):
                actions.append(Log("warning", "message undeliverable", {
                    "name": message.get("name"), "from_broker": origin,
                    "reason": "an answer to a query of the security service that is no longer remembered here"}))
        else:
            message = entry["f"]
            if message.get("name") == "authorize message" and message.get("activityId").__class__ is str:
                self.authorizers.put(message["activityId"], origin)
            if not security.send_to_security_here(message, now, actions):
                actions.append(Log("warning", "message undeliverable", {
                    "name": message.get("name"), "role": SECURITY_ROLE, "from_broker": origin,
                    "reason": f"handed over from another broker, but no instance of {SECURITY_ROLE!r} is live here"}))
        return actions

    # ---------------------------------------------------------- receiving side

    def received(self, data: bytes, now: float) -> list:
        """One entry another broker handed to this one."""
        actions: list = []
        try:
            entry = _loads(data)
            if "t" in entry:
                return self._security_received(entry, now)
            frame, role, public, origin = entry["f"], entry["r"], entry["p"], entry["o"]
            message_id = frame["id"]
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return [Log("error", "cluster entry unreadable", {
                "reason": "an entry in this broker's stream is not one a broker wrote; it is dropped (another "
                          "program writes to the stream, or brokers of different versions share the cluster)"})]
        self.received_entries += 1
        seen_key = (message_id, role)
        if self.seen.get(seen_key) is not None:
            self.duplicates += 1
            return []
        self.seen.put(seen_key, True)
        router = self.router
        sender = RemoteSender(entry.get("s", "?"), entry.get("sv", "?"))
        activity_id = frame.get("activityId")
        activity = router.activities.get(activity_id) if activity_id.__class__ is str else None
        if activity is not None:
            activity[LAST_SEEN] = now
        elif activity_id.__class__ is str:
            # Its first message on this broker: from here on, affinity and reply figures as for a local one.
            router.activities.put(activity_id, new_activity(now))
            activity = router.activities.get(activity_id)
        if role is None:
            # An answer: to the asker only, as on one broker.
            asker = router.registry.by_conn.get(router.commands.get(frame.get("responseTo")))
            if asker is not None and public in asker.profile.receives:
                router._deliver(sender, asker, frame, public, activity, frame, {}, actions)
                return actions
            roles = router.table.receivers.get(public, ())
        else:
            self.origins.put(message_id, origin)
            roles = (role,)
            if frame.get("isSecurity") and activity_id.__class__ is str:
                self.security_askers.put(activity_id, origin)  # a query of the security service there
        requirement = None
        if entry.get("v") is not None:
            try:
                requirement = Requirement(entry["v"])
            except InvalidRequirement:
                pass
        missed = {}
        exact, chosen = _version(entry.get("x")), _version(entry.get("c"))
        for role in roles:
            if exact is not None:
                target = router._pick_in_pool(router.registry.pool(role, exact), public)
                reason = "" if target is not None else f"{role}@{exact} has no instance connected here"
            else:
                # The version the sender's broker chose (it may have read a record of the shared ledger that
                # this broker has not read yet, e.g. that a ramp began), unless it is out of production here.
                pool = router.registry.pool(role, chosen) if chosen is not None else None
                target = router._pick_in_pool(pool, public) if pool is not None and pool.state != FAILED else None
                if target is None:
                    target, reason = router.choice.choose(role, public, activity, requirement, entry.get("k"))
            if target is None:
                missed[role] = str(reason)  # a version elsewhere too: the sender's broker chose for this one
                continue
            router._deliver(sender, target, frame, public, activity, frame, {}, actions)
        if missed:
            actions.append(Log("warning", "message undeliverable", {
                "sender": sender.role, "name": public, "activity_id": activity_id, "from_broker": origin,
                "missed": missed, "reason": "handed over from another broker, but no instance here takes it now"}))
        return actions

    # ---------------------------------------------------------------- upkeep

    def tick(self, now: float) -> list:
        self.homes.rotate_if_due(now)
        self.origins.rotate_if_due(now)
        self.seen.rotate_if_due(now)
        self.authorizers.rotate_if_due(now)
        self.security_askers.rotate_if_due(now)
        actions = self.presence.expire(now)
        self._refresh_changed(now, actions)
        return actions + self.leases.expire(now)

    def holding(self) -> dict[str, Any]:
        return holding_of(self.router.registry)

    def to_json(self) -> dict[str, Any]:
        out = self.presence.to_json(self.holding())
        out.update(handedOver=self.handed_over, received=self.received_entries, duplicates=self.duplicates,
                   leases=self.leases.to_json())
        return out


def _version(text: str | None) -> Version | None:
    try:
        return Version(text) if text is not None else None
    except InvalidVersion:
        return None
