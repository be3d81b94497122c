"""The broker's work per message and per tick does not grow with the number
of connected instances or configured roles (issue 11, item 3; bench/growth.py
measures it on a real broker, bench/RESULTS.md "Growth").

Deterministic and without timing: instances and version pools are replaced
by subclasses that note every object whose attributes are read, so a change
that makes a message or a tick walk every instance or every role fails here.
"""

from __future__ import annotations

import pytest

from core import Harness
from exocom.core import registration, registry

OLD, NEW = "1.0.0", "2.0.0"
IDLE_ROLES = 200


class Touched:
    """Which instances and pools had an attribute read since `clear()`."""

    def __init__(self) -> None:
        self.instances: set[int] = set()  # conns
        self.pools: set[tuple[str, str]] = set()  # (role, version)

    def clear(self) -> None:
        self.instances.clear()
        self.pools.clear()


@pytest.fixture
def touched(monkeypatch) -> Touched:
    seen = Touched()
    get = object.__getattribute__

    class WatchedInstance(registration.Instance):
        __slots__ = ()

        def __getattribute__(self, name):
            seen.instances.add(get(self, "conn"))
            return get(self, name)

    class WatchedPool(registry.VersionPool):
        __slots__ = ()

        def __getattribute__(self, name):
            seen.pools.add((get(self, "role"), str(get(self, "version"))))
            return get(self, name)

    monkeypatch.setattr(registration, "Instance", WatchedInstance)
    monkeypatch.setattr(registry, "VersionPool", WatchedPool)
    return seen


def fleet(idle_instances: int, **options) -> tuple[Harness, int, list[int]]:
    """web asks, two users instances answer; IDLE_ROLES idle roles share `idle_instances` idle instances."""
    routes = {"web": {"sends": ["ping"], "receives": ["pong"]}, "users": {"receives": ["ping"], "sends": ["pong"]}}
    for k in range(IDLE_ROLES):
        routes[f"i{k}"] = {"sends": [f"m{k}"], "receives": [f"m{(k + 1) % IDLE_ROLES}"]}
    h = Harness(routes, **options)
    for k in range(idle_instances):
        h.connect(f"i{k % IDLE_ROLES}")
    web = h.connect("web")
    users = [h.connect("users"), h.connect("users")]
    return h, web, users


def test_a_request_and_its_reply_touch_no_idle_instance_or_pool(touched):
    h, web, users = fleet(1000)
    touched.clear()
    for n in range(20):
        activity = f"a{n}"
        h.send(web, "ping", activity=activity)
        [asked] = [conn for conn in users if h.take(conn)]
        h.send(asked, "pong", activity=activity)
        assert [m["name"] for m in h.take(web)] == ["pong"]
    assert touched.instances <= {web, *users}, "a message read idle instances"
    assert touched.pools <= {("web", "0.0.0"), ("users", "0.0.0")}, "a message read pools of idle roles"


def test_a_tick_touches_no_live_pool(touched):
    # Every idle role has a live pool; only todos' replaced version is draining.
    h, web, users = fleet(IDLE_ROLES, drain_period=30, activity_ttl=10)
    h.connect("users", NEW)  # users@0.0.0 is draining from now on
    touched.clear()
    h.tick(1)
    assert touched.pools <= {("users", "0.0.0")}, "the tick walked the live pools of every role"
    assert not touched.instances - set(users)
    for _ in range(6):
        h.tick(10)  # quiet for the drain period, and its activities forgotten
    assert "version drained" in h.events("info")
    for conn in users:
        h.disconnect(conn)
    touched.clear()
    h.tick(1)
    h.tick(1)
    assert not touched.pools - {("users", "0.0.0")}
    assert h.broker.states.quiet == {}, "a pool whose instances are all gone is forgotten"
