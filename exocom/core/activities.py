"""What the broker remembers about recent activities and commands: which
instance of each role took part (activity affinity), when the activity was
last seen (for `responseTime`), and who sent a command (for `responseTo`).

An activity record is a plain dict: the key `LAST_SEEN` holds the time the
activity was last seen, every other key is a role and its value the
connection id of that role's instance -- positive when that instance sent on
the activity itself (it asked, so a reply may reach it even while its version
is held), negative when it only received. Records hold only strings, floats
and ints, so the garbage collector never has to traverse them: with hundreds
of thousands of live activities that keeps collection pauses short.

Entries live in two generations that rotate every `ttl` seconds, or earlier
when the young generation reaches `max_entries`; an entry is forgotten one to
two periods after its last use, and memory stays bounded under any load.

A generation that filled up starts the next period (at the next tick): the
clock never cuts a young generation short after a rotation by size. Under a
load that fills generations faster than `ttl`, the number of entries held
therefore stays between `max_entries` and twice that, and the broker's RSS
stays flat. If the clock also rotated every `ttl` seconds, it would drop a
partly filled young generation once a minute, and RSS would dip by 10-15 MB
(bench/memory_curve.py, bench/RESULTS.md "Memory over a long run").
"""

from __future__ import annotations

LAST_SEEN = ""  # roles are never empty strings


def new_activity(now: float) -> dict:
    return {LAST_SEEN: now}


class Generations:
    """A dict whose entries expire one to two periods after their last use."""

    __slots__ = ("ttl", "max_entries", "young", "old", "rotated_at", "filled")

    def __init__(self, ttl: float, now: float = 0.0, max_entries: int = 100_000):
        self.ttl = ttl
        self.max_entries = max_entries
        self.young: dict = {}
        self.old: dict = {}
        self.rotated_at = now
        self.filled = False  # the young generation filled up and rotated since the last tick

    def get(self, key):
        value = self.young.get(key)
        if value is None:
            value = self.old.pop(key, None)
            if value is not None:
                self.young[key] = value
        return value

    def put(self, key, value) -> None:
        young = self.young
        young[key] = value
        if len(young) >= self.max_entries:
            self.old = young
            self.young = {}
            self.filled = True

    def pop(self, key):
        value = self.young.pop(key, None)
        return value if value is not None else self.old.pop(key, None)

    def rotate_if_due(self, now: float) -> None:
        """Called about once a second (`Broker.tick`)."""
        if self.filled:
            # Rotated by size since the last tick: the new period starts now.
            self.filled = False
            self.rotated_at = now
        elif now - self.rotated_at >= self.ttl:
            self.old = self.young
            self.young = {}
            self.rotated_at = now

    def values(self):
        yield from self.young.values()
        yield from self.old.values()

    def __len__(self) -> int:
        return len(self.young) + len(self.old)
