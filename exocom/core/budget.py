"""The warning budget: a client that keeps sending bad frames must not be able
to flood the log.

Each connection gets at most `WARNING_BURST` warning events (refusals,
undeliverable messages) per `WARNING_WINDOW`; the rest is counted and summed
up in one `warnings suppressed` event when the window ends or the connection
closes. The metrics count every one.
"""

from __future__ import annotations

from typing import Any

from .actions import Log
from .registry import Instance
from .stats import Stats

WARNING_BURST = 10
WARNING_WINDOW = 10.0


class WarningBudget:
    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self._suppressing: set[Instance] = set()  # instances with warnings held back

    def refusal(self, instance: Instance, now: float, code: str, reason: str, name: str | None = None) -> list:
        """A frame of `instance` is refused; the connection stays."""
        self.stats.refused[code] += 1
        return self.log(instance, now, "warning", "message refused", {
            "role": instance.role, "instance": instance.label, "peer": instance.peer, "name": name, "code": code,
            "reason": reason})

    def log(self, instance: Instance, now: float, level: str, event: str, fields: dict[str, Any]) -> list:
        """A log event caused by `instance`'s frames, if its budget allows."""
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

    def windows_ended(self, now: float) -> list[Log]:
        """The summaries of every window that is over."""
        if not self._suppressing:
            return []
        return [self.summary(i) for i in [i for i in self._suppressing if now - i.warning_window_start >= WARNING_WINDOW]]

    def closed(self, instance: Instance) -> list[Log]:
        """The summary of a connection that closed with warnings held back."""
        return [self.summary(instance)] if instance.warnings_suppressed else []

    def summary(self, instance: Instance) -> Log:
        by_event, instance.warnings_suppressed = instance.warnings_suppressed or {}, None
        self._suppressing.discard(instance)
        return Log("warning", "warnings suppressed", {
            "role": instance.role, "instance": instance.label, "peer": instance.peer,
            "suppressed": sum(by_event.values()), "by_event": by_event,
            "reason": f"more than {WARNING_BURST} warnings about this connection within {WARNING_WINDOW:g}s; "
                      "the metrics count them all -- fix or stop this client"})
