"""Counters kept by the core as it routes: a dictionary increment on the
message path. `exocom.server.metrics` formats them for `GET /metrics`.

Label values come from the configuration (roles, message names a role may
send) or are validated semantic versions, capped per role, so a client
cannot blow up the number of series.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from typing import TYPE_CHECKING

from .figures import Figures

if TYPE_CHECKING:
    from .registry import Instance

MAX_VERSIONS_PER_ROLE = 20
LATENCY_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1)


class Stats:
    def __init__(self) -> None:
        self.routed = 0
        self.refused: dict[str, int] = defaultdict(int)
        self.undeliverable: dict[str, int] = defaultdict(int)
        self.deliveries: dict[tuple[str, str], int] = defaultdict(int)
        self.registrations_refused: dict[int, int] = defaultdict(int)
        self.http_unauthorized: dict[int, int] = defaultdict(int)  # operator requests refused, by HTTP status
        self.slow_consumers = 0
        self.outbox_dropped_frames = 0
        self.frames_rerouted = 0
        self.frames_too_large = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self._versions: dict[str, set[str]] = defaultdict(set)
        # (role, version label) -> the figures gates judge and /metrics shows.
        self.by_version: dict[tuple[str, str], Figures] = {}

    def figures(self, key: tuple[str, str]) -> Figures:
        figures = self.by_version.get(key)
        if figures is None:
            figures = self.by_version[key] = Figures()
        return figures

    def version_label(self, role: str, version: str) -> str:
        # Versions that differ only in build metadata are one version (one
        # pool, one deployment): one label, one set of figures.
        version = version.partition("+")[0]
        seen = self._versions[role]
        if version in seen:
            return version
        if len(seen) < MAX_VERSIONS_PER_ROLE:
            seen.add(version)
            return version
        return "other"

    def delivered(self, target: Instance) -> None:
        self.deliveries[target.metric_key] += 1

    def observe_latency(self, seconds: float) -> None:
        self.latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
