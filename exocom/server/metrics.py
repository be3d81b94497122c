"""`GET /metrics`: the core's counters in the Prometheus text format.

All formatting happens when somebody scrapes; the core only counts
(`exocom.core.stats`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from ..core.stats import LATENCY_BUCKETS

if TYPE_CHECKING:
    from ..core.broker import Broker


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(broker: Broker, outbox_bytes: int, connections_open: int) -> str:
    stats = broker.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")

    metric("exocom_messages_routed_total", "counter", "Messages accepted and routed.", [("", stats.routed)])
    metric("exocom_messages_refused_total", "counter", "Frames refused, by reason.",
           [(_labels(reason=r), n) for r, n in sorted(stats.refused.items())])
    metric("exocom_messages_undeliverable_total", "counter", "Messages that reached no instance, by message name.",
           [(_labels(name=k), n) for k, n in sorted(stats.undeliverable.items())])
    metric("exocom_deliveries_total", "counter", "Frames delivered, by receiving role and version.",
           [(_labels(role=r, version=v), n) for (r, v), n in sorted(stats.deliveries.items())])
    metric("exocom_registrations_refused_total", "counter", "Registrations refused, by close code.",
           [(_labels(code=str(c)), n) for c, n in sorted(stats.registrations_refused.items())])
    connections: dict[tuple[str, str], int] = defaultdict(int)
    for instance in broker.registry.by_conn.values():
        connections[instance.metric_key] += 1
    metric("exocom_connections", "gauge", "Registered connections, by role and version.",
           [(_labels(role=r, version=v), n) for (r, v), n in sorted(connections.items())])
    metric("exocom_connections_open", "gauge", "Open WebSocket connections, registered or not.", [("", connections_open)])
    metric("exocom_outbox_bytes", "gauge", "Bytes queued for all receivers, not yet written.", [("", outbox_bytes)])
    metric("exocom_outbox_dropped_frames_total", "counter",
           "Frames queued for a receiver that was dropped or closed, which no other instance of its version took.",
           [("", stats.outbox_dropped_frames)])
    metric("exocom_frames_rerouted_total", "counter",
           "Frames queued for a receiver that was dropped or closed, delivered to another instance of its version.",
           [("", stats.frames_rerouted)])
    metric("exocom_slow_consumers_total", "counter", "Connections closed because their outbox was full.",
           [("", stats.slow_consumers)])
    metric("exocom_frames_too_large_total", "counter", "Connections closed for a frame above the size limit.",
           [("", stats.frames_too_large)])
    states = []
    durations = []
    for d in broker.deployments.values():
        for state in ("held", "live", "failed"):
            states.append((_labels(role=d.target.role, version=str(d.target.version), state=state),
                           1 if d.state == state else 0))
        for step in d.steps.values():
            if step.started_at is not None and step.ended_at is not None:
                durations.append((_labels(role=d.target.role, version=str(d.target.version), step=step.name),
                                  float(step.ended_at - step.started_at)))
    metric("exocom_deployment_state", "gauge", "1 for the current state of each declared deployment.", states)
    metric("exocom_deployment_step_duration_seconds", "gauge", "Duration of the last finished run of each step.",
           durations)
    lines.append("# HELP exocom_routing_seconds Time to route one frame, from decoded to queued.")
    lines.append("# TYPE exocom_routing_seconds histogram")
    cumulative = 0
    for bound, count in zip(LATENCY_BUCKETS, stats.latency_counts):
        cumulative += count
        lines.append(f'exocom_routing_seconds_bucket{{le="{bound:g}"}} {cumulative}')
    cumulative += stats.latency_counts[-1]
    lines.append(f'exocom_routing_seconds_bucket{{le="+Inf"}} {cumulative}')
    lines.append(f"exocom_routing_seconds_sum {stats.latency_sum:g}")
    lines.append(f"exocom_routing_seconds_count {cumulative}")
    return "\n".join(lines) + "\n"
