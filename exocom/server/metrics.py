"""`GET /metrics`: the core's counters in the Prometheus text format.

All formatting happens when somebody scrapes; the core only counts
(`exocom.core.stats`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from ..core.figures import REPLY_TIME_BUCKETS
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
    metric("exocom_http_unauthorized_total", "counter", "Operator requests refused for lack of the operator token, "
           "by HTTP status (401: none, 403: wrong).",
           [(_labels(status=str(c)), n) for c, n in sorted(stats.http_unauthorized.items())])
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
    versions = [(client["role"], v) for client in broker.config_json()["clients"] for v in client["versions"]]
    metric("exocom_version_share_percent", "gauge", "Percent of the role's new activities its version gets now.",
           [(_labels(role=r, version=v["version"]), float(v["share"])) for r, v in versions])
    metric("exocom_version_state", "gauge",
           "1 for the state of each connected version (held, ramping, live, draining, drained, failed).",
           [(_labels(role=r, version=v["version"], state=v["state"]), 1) for r, v in versions])
    ramps = [(d, d.rollout) for d in broker.deployments.values() if d.rollout is not None]
    metric("exocom_rollout_step", "gauge", "The ramp step in force (0-based) of each declared rollout.",
           [(_labels(role=d.target.role, version=str(d.target.version)), d.ramp_step) for d, _ in ramps])
    metric("exocom_rollout_paused", "gauge", "1 while an operator paused the ramp.",
           [(_labels(role=d.target.role, version=str(d.target.version)), int(d.paused)) for d, _ in ramps])
    figures = sorted(stats.by_version.items())
    metric("exocom_replies_total", "counter",
           "Replies of each version (messages it sent on an activity it was sent a message on), by outcome "
           "(error: a name in its rollout's errorMessages).",
           [(_labels(role=r, version=v, outcome=outcome), n) for (r, v), f in figures
            for outcome, n in (("ok", f.replies - f.errors), ("error", f.errors))])
    metric("exocom_instance_disconnects_total", "counter", "Instances of each version that disconnected.",
           [(_labels(role=r, version=v), f.disconnects) for (r, v), f in figures])
    lines.append("# HELP exocom_reply_seconds Reply time of each version (the responseTime of its replies).")
    lines.append("# TYPE exocom_reply_seconds histogram")
    for (role, version), f in figures:
        _histogram(lines, "exocom_reply_seconds", REPLY_TIME_BUCKETS, f.buckets, f.reply_time_sum,
                   role=role, version=version)
    metric("exocom_deployment_step_duration_seconds", "gauge", "Duration of the last finished run of each step.",
           durations)
    lines.append("# HELP exocom_routing_seconds Time to route one frame, from decoded to queued.")
    lines.append("# TYPE exocom_routing_seconds histogram")
    _histogram(lines, "exocom_routing_seconds", LATENCY_BUCKETS, stats.latency_counts, stats.latency_sum)
    return "\n".join(lines) + "\n"


def _histogram(lines: list[str], name: str, bounds: tuple[float, ...], counts: list[int], total: float,
               **labels: str) -> None:
    """The samples of one Prometheus histogram; `counts` has one more entry than `bounds` (the open bucket)."""
    cumulative = 0
    for bound, count in zip(bounds, counts):
        cumulative += count
        lines.append(f"{name}_bucket{_labels(**labels, le=f'{bound:g}')} {cumulative}")
    cumulative += counts[-1]
    lines.append(f"{name}_bucket{_labels(**labels, le='+Inf')} {cumulative}")
    suffix = _labels(**labels) if labels else ""
    lines.append(f"{name}_sum{suffix} {total:g}")
    lines.append(f"{name}_count{suffix} {cumulative}")
