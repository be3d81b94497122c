"""The security adapter of Exocom 0.27: when the configuration has a role
named `security`, it authorizes every message before the message is routed.

The broker sends `security` an `authorize message` with the original as
payload and routes the original on `message authorized` (or tells the sender
`message unauthorized`). `security` may query other services with a
`security request`; their answer comes back to it as a `security response`.

In a cluster the security service may be connected to another broker: the
adapter's messages for it, its verdicts and the answers to its queries are
handed between the brokers (`cluster.Cluster`), and each broker keeps what
it decided itself (the message waiting for a verdict stays with its
sender's broker).
"""

from __future__ import annotations

from typing import Any

from .actions import Log
from .activities import Generations
from .budget import WarningBudget
from .registry import LIVE, Instance, Registry
from .routing import Router, new_id

SECURITY_ROLE = "security"
# The security service may send these without listing them in its sends.
SECURITY_ANSWERS = frozenset(("message authorized", "message unauthorized", "security request"))
# What the adapter sends the security service, whatever its receives say.
SECURITY_RECEIVES = ("authorize message", "security response")


def with_implicit_routes(routes: dict) -> dict:
    """The routes as `/config.json` shows them: the security role receives
    and sends the adapter's messages without listing them, and Exocom 0.27
    showed them in its routes."""
    entry = routes.get(SECURITY_ROLE)
    if entry is not None:
        entry["receives"] = [*entry["receives"], *(n for n in SECURITY_RECEIVES if n not in entry["receives"])]
        entry["sends"] = [*entry["sends"], *(n for n in sorted(SECURITY_ANSWERS) if n not in entry["sends"])]
    return routes


class SecurityAdapter:
    def __init__(self, router: Router, registry: Registry, budget: WarningBudget, *, ttl: float, now: float):
        self.router = router
        self.registry = registry
        self.budget = budget
        self.authorizations = Generations(ttl, now)  # our activity -> (message, sender conn)
        self.security_requests = Generations(ttl, now)  # the queried service's activity -> security's activity

    def rotate_if_due(self, now: float) -> None:
        self.authorizations.rotate_if_due(now)
        self.security_requests.rotate_if_due(now)

    def message(self, instance: Instance, message: dict, name: str, now: float) -> list:
        """An accepted message of `instance`: authorize it, or act on the security service's answer."""
        actions: list = []
        activity_id = message.get("activityId")
        if activity_id.__class__ is not str:
            activity_id = None  # keys of the adapter's memories are strings (a list is not even hashable)
        if instance.role == SECURITY_ROLE:
            if name in ("message authorized", "message unauthorized"):
                self.verdict(instance, name, activity_id, now, actions)
            elif name == "security request":
                self._security_request(instance, message, name, activity_id, now, actions)
            else:
                self.router.route(instance, message, name, now, actions)
            return actions
        if self.security_answer(message, activity_id, now, actions):
            return actions
        cluster = self.router.cluster
        if cluster is not None and cluster.security_answer_to_asker(message, activity_id, actions):
            return actions  # the security service that asked is connected to another broker
        auth_activity = new_id()
        self.authorizations.put(auth_activity, (message, instance.conn))
        self._send_to_security({"name": "authorize message", "id": new_id(), "activityId": auth_activity,
                                "payload": message}, now, actions)
        return actions

    def security_answer(self, message: dict, activity_id: Any, now: float, actions: list) -> bool:
        """Whether `message` answers a query of the security service (then it is wrapped and sent back to it)."""
        security_activity = self.security_requests.get(activity_id)
        if security_activity is None:
            return False
        self.security_requests.pop(activity_id)
        self._send_to_security({"name": "security response", "id": new_id(), "activityId": security_activity,
                                "payload": message, "isSecurity": True}, now, actions)
        return True

    def _send_to_security(self, message: dict, now: float, actions: list) -> None:
        if self.send_to_security_here(message, now, actions):
            return
        cluster = self.router.cluster
        if cluster is not None and cluster.to_security(message, actions):
            return  # connected only to another broker
        actions.append(Log("warning", "message undeliverable", {
            "name": message["name"], "role": SECURITY_ROLE, "reason": f"no instance of {SECURITY_ROLE!r} is live"}))

    def send_to_security_here(self, message: dict, now: float, actions: list) -> bool:
        target, _ = self.router.choice.choose(SECURITY_ROLE, message["name"], None, None)
        if target is None:
            # The security role need not list the adapter's messages in its
            # receives (it did not under Exocom 0.27): any live instance will do,
            # never a held or failed one.
            target = next((p.pick() for p in self.registry.pools.get(SECURITY_ROLE, ())
                           if p.state == LIVE and p.instances), None)
        if target is None:
            return False
        self.router.send_to(target, message, now, actions)
        return True

    def verdict(self, instance: Instance | None, name: str, activity_id: Any, now: float, actions: list) -> None:
        """`instance`: the security service's; None for a verdict handed over by another broker."""
        pending = self.authorizations.get(activity_id)
        if pending is None:
            cluster = self.router.cluster
            if instance is None or (cluster is not None and cluster.verdict_to_asker(name, activity_id, actions)):
                return  # expired here meanwhile, or the message it judges was sent to another broker
            actions.extend(self.budget.refusal(instance, now, "unknown_authorization",
                                               "answer to an unknown or expired authorization", name=name))
            return
        self.authorizations.pop(activity_id)
        original, sender_conn = pending
        sender = self.registry.by_conn.get(sender_conn)
        if sender is None:
            return
        if name == "message authorized":
            self.router.route(sender, original, original["name"], now, actions)
            return
        actions.append(Log("warning", "message unauthorized", {
            "role": sender.role, "name": original["name"], "activity_id": original.get("activityId")}))
        self.router.send_to(sender, {"name": "message unauthorized", "id": new_id(),
                                     "activityId": original.get("activityId"), "payload": original}, now, actions)

    def _security_request(self, instance: Instance, message: dict, name: str, activity_id: Any, now: float,
                          actions: list) -> None:
        request = message.get("payload")
        if not isinstance(request, dict) or not isinstance(request.get("name"), str):
            actions.extend(self.budget.refusal(instance, now, "bad_security_request",
                                               "'security request' needs a message object as payload", name=name))
            return
        for key in ("id", "activityId"):
            if request.get(key).__class__ is not str:
                request[key] = new_id()
        request["isSecurity"] = True
        self.security_requests.put(request["activityId"], activity_id)
        self.router.route(instance, request, request["name"], now, actions, public=request["name"])
