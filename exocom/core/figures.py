"""The figures the broker sees of each version of a role: its replies, how
many were errors, how long they took, and how many of its instances dropped.

A reply is a message an instance sends on an activity on which it was sent a
message (contract 7.3); its reply time is the `responseTime` the broker
stamps on it. Reply times go into a fixed histogram, so memory stays bounded
and a percentile is a walk over a dozen counters. Gates (`gates.py`) judge
these figures; `/metrics` and `exocom status` show them.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

# Upper bounds of the reply-time buckets, in seconds; the last bucket is open.
REPLY_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Figures:
    __slots__ = ("replies", "errors", "buckets", "reply_time_sum", "disconnects")

    def __init__(self) -> None:
        self.replies = 0
        self.errors = 0
        self.buckets = [0] * (len(REPLY_TIME_BUCKETS) + 1)
        self.reply_time_sum = 0.0
        self.disconnects = 0

    def reply(self, seconds: float, error: bool) -> None:
        self.replies += 1
        if error:
            self.errors += 1
        self.buckets[bisect_left(REPLY_TIME_BUCKETS, seconds)] += 1
        self.reply_time_sum += seconds

    @property
    def error_rate(self) -> float:
        return self.errors / self.replies if self.replies else 0.0

    def percentile(self, q: float) -> float | None:
        """The upper bound of the bucket that holds the q-th reply time (the
        open last bucket counts as its lower bound); None without replies."""
        if not self.replies:
            return None
        rank = q * self.replies
        seen = 0
        for i, count in enumerate(self.buckets):
            seen += count
            if seen >= rank and count:
                return REPLY_TIME_BUCKETS[min(i, len(REPLY_TIME_BUCKETS) - 1)]
        return REPLY_TIME_BUCKETS[-1]

    def since(self, earlier: Figures) -> Figures:
        """What happened after `earlier` was copied from this one."""
        return self._combined(earlier, -1)

    def copy(self) -> Figures:
        return self._combined(Figures(), 1)

    def plus(self, other: Figures) -> Figures:
        """These and `other` together (another broker's figures of the same version)."""
        return self._combined(other, 1)

    def _combined(self, other: Figures, sign: int) -> Figures:
        out = Figures()
        out.replies = self.replies + sign * other.replies
        out.errors = self.errors + sign * other.errors
        out.buckets = [a + sign * b for a, b in zip(self.buckets, other.buckets)]
        out.reply_time_sum = self.reply_time_sum + sign * other.reply_time_sum
        out.disconnects = self.disconnects + sign * other.disconnects
        return out

    def to_list(self) -> list:
        """Compact, for the presence a broker publishes in a cluster; `from_list` reads it back."""
        return [self.replies, self.errors, self.reply_time_sum, self.disconnects, *self.buckets]

    @classmethod
    def from_list(cls, values: list) -> Figures:
        """ValueError or TypeError if `values` is not what `to_list` wrote."""
        out = cls()
        out.replies, out.errors, out.reply_time_sum, out.disconnects = (int(values[0]), int(values[1]),
                                                                        float(values[2]), int(values[3]))
        buckets = [int(v) for v in values[4:]]
        if len(buckets) != len(out.buckets):
            raise ValueError("another set of reply-time buckets")
        out.buckets = buckets
        return out

    def to_json(self) -> dict[str, Any]:
        return {"replies": self.replies, "errors": self.errors, "errorRate": round(self.error_rate, 4),
                "p90ReplyTimeS": self.percentile(0.9), "disconnects": self.disconnects}
