"""Who drives a deployment in a cluster: one lease per deployment, with a
fencing token.

Exactly one broker drives a deployment at a time: the one that holds its
lease in Redis. A broker wants the lease of every unfinished deployment whose
script is connected to it (it sends the script its steps and hears the
answers). The shell asks Redis for the wanted leases (take or renew) every
renewal period and reports each answer here; a lease granted comes with a
fencing token, a number Redis raises on every grant. The ledger script
writes a record only while the lease key still holds the writer's token, so
a broker that was paused past its lease (SIGSTOP, a long GC, a VM migration)
and wakes up cannot record a step another broker has since taken over.

This broker counts a lease as its own only until `sent_at + ttl`, measured
from when it *asked* (Redis started the expiry later), minus a margin: it
stops driving before Redis could hand the lease to another broker. While
Redis is away no lease can be renewed, so every deployment pauses within a
lease and never advances on what may be stale state.

Plain data in, actions out: no clock, no I/O.
"""

from __future__ import annotations

from .actions import Log

# Stop driving this long before the lease could expire in Redis: the time one renewal round may take.
MARGIN = 0.5


class DriverLeases:
    def __init__(self, me: str, ttl: float) -> None:
        self.me = me
        self.ttl = ttl
        self.held: dict[str, tuple[int, float]] = {}  # deployment ("role@version") -> (token, drive until)
        self.holders: dict[str, str] = {}  # deployment -> the other broker that holds its lease, as last seen
        # Tokens of leases that expired here: a record decided under one (a script's answer that comes in
        # late) is still sent with it, and the ledger script in Redis, the one authority, refuses or takes it.
        self.expired: dict[str, int] = {}

    def may_drive(self, name: str, now: float) -> bool:
        held = self.held.get(name)
        return held is not None and now < held[1]

    def token(self, name: str) -> int | None:
        """The token to write `name`'s records with: of the lease held, else of the last one that expired."""
        held = self.held.get(name)
        return held[0] if held is not None else self.expired.get(name)

    def answered(self, name: str, token: int | None, holder: str | None, sent_at: float, now: float) -> list:
        """Redis answered the request for `name`'s lease sent at `sent_at`: granted with
        `token`, or held by `holder`. Whether this broker may drive changed: see `Broker`."""
        was = self.held.get(name)
        if token is not None:
            self.holders.pop(name, None)
            self.expired.pop(name, None)
            self.held[name] = (token, sent_at + self.ttl - MARGIN)
            if was is None or was[0] != token:
                return [Log("info", "deployment driver lease taken", {"deployment": name, "token": token})]
            return []
        self.held.pop(name, None)
        self.holders[name] = holder
        if was is not None:
            self.expired[name] = was[0]  # a record decided under it is refused by Redis, not guessed here
            return [Log("warning", "deployment driver lease lost", {
                "deployment": name, "holder": holder, "token": was[0],
                "reason": "another broker took the lease after this one could not renew it in time; that one "
                          "drives the deployment now"})]
        return []

    def expire(self, now: float) -> list:
        """Leases not renewed in time: this broker stops driving them (Redis away, or renewals late)."""
        actions = []
        for name in [n for n, (_, until) in self.held.items() if now >= until]:
            token, _ = self.held.pop(name)
            self.expired[name] = token
            actions.append(Log("warning", "deployment driver lease expired", {
                "deployment": name, "token": token,
                "reason": "it could not be renewed in time (Redis away or too slow): the deployment pauses here "
                          "until this or another broker takes the lease again"}))
        return actions

    def released(self, name: str) -> None:
        """The ledger refused a record of `name`: its token is stale."""
        self.held.pop(name, None)
        self.expired.pop(name, None)

    def to_json(self) -> dict:
        return {"held": {n: t for n, (t, _) in self.held.items()}, "others": dict(self.holders)}
