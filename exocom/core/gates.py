"""Gates: does a ramping version's own behaviour allow it more traffic?

Each gate compares a figure of the new version since its ramp began with a
limit from the rollout's `gates` (contract 7.3). A gate judges only once the
version has `minSamples` replies, except the disconnect gate, which needs no
replies to fail. The verdict names the gate and the figures that decided it,
for the log event and the ledger record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Gates
from .figures import Figures


@dataclass(frozen=True)
class Verdict:
    gate: str  # "errorRate", "replyTimeRatio", "disconnects"
    reason: str
    figures: dict[str, Any]


def figures_of(new: Figures, stable: Figures | None) -> dict[str, Any]:
    """The figures the gates look at, as operators see them."""
    new_p90 = new.percentile(0.9)
    stable_p90 = stable.percentile(0.9) if stable is not None else None
    return {"replies": new.replies, "errors": new.errors, "errorRate": round(new.error_rate, 4),
            "p90ReplyTimeS": new_p90, "stableP90ReplyTimeS": stable_p90,
            "stableReplies": stable.replies if stable is not None else 0,
            "replyTimeRatio": round(new_p90 / stable_p90, 3) if new_p90 and stable_p90 else None,
            "disconnects": new.disconnects}


def judge(gates: Gates, new: Figures, stable: Figures | None) -> Verdict | None:
    """The first gate the figures fail, or None while they hold."""
    figures = figures_of(new, stable)
    if gates.max_disconnects is not None and new.disconnects > gates.max_disconnects:
        return Verdict("disconnects", f"{new.disconnects} of its instances dropped during the ramp "
                                      f"(maxDisconnects {gates.max_disconnects})", figures)
    if new.replies < gates.min_samples:
        return None
    if gates.max_error_rate is not None and new.error_rate > gates.max_error_rate:
        return Verdict("errorRate", f"error rate {new.error_rate:.3f} ({new.errors} of {new.replies} replies) "
                                    f"above maxErrorRate {gates.max_error_rate:g}", figures)
    ratio = figures["replyTimeRatio"]
    if (gates.max_reply_time_ratio is not None and ratio is not None and stable is not None
            and stable.replies >= gates.min_samples and ratio > gates.max_reply_time_ratio):
        return Verdict("replyTimeRatio", f"p90 reply time {figures['p90ReplyTimeS']}s is {ratio:g}x the stable "
                                         f"version's {figures['stableP90ReplyTimeS']}s (maxReplyTimeRatio "
                                         f"{gates.max_reply_time_ratio:g})", figures)
    return None


def has_evidence(gates: Gates, new: Figures) -> bool:
    """Whether the gates have seen enough to let the ramp step up: a version
    nobody used has shown nothing, so it does not get more traffic for it."""
    return new.replies >= gates.min_samples
