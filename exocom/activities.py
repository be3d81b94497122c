"""What the broker remembers about recent activities and commands: which
instance of each role took part (activity affinity), when the activity was
last seen (for `responseTime`), and who sent a command (for `responseTo`).

Entries live in two generations that rotate every `ttl` seconds, so an entry
expires between one and two `ttl` after it was last touched, memory stays
bounded by traffic over two periods, and no per-entry timer is needed.
"""

from __future__ import annotations


class Activity:
    __slots__ = ("last_seen", "members")

    def __init__(self, now: float):
        self.last_seen = now
        # role -> (conn, asked): asked is True when that instance itself sent
        # on this activity, which lets a reply reach it even while its version
        # is held (it is the asker).
        self.members: dict[str, tuple[int, bool]] = {}


class Generations:
    """A dict whose entries expire one to two `ttl` after their last use."""

    __slots__ = ("ttl", "young", "old", "rotated_at")

    def __init__(self, ttl: float, now: float = 0.0):
        self.ttl = ttl
        self.young: dict = {}
        self.old: dict = {}
        self.rotated_at = now

    def get(self, key):
        value = self.young.get(key)
        if value is None:
            value = self.old.pop(key, None)
            if value is not None:
                self.young[key] = value
        return value

    def put(self, key, value) -> None:
        self.young[key] = value

    def rotate_if_due(self, now: float) -> None:
        if now - self.rotated_at >= self.ttl:
            self.old = self.young
            self.young = {}
            self.rotated_at = now

    def __len__(self) -> int:
        return len(self.young) + len(self.old)
