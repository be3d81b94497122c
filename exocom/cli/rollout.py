"""`exocom rollout ROLE@VERSION [ACTION]` and `exocom rollback ROLE@VERSION`:
operators look at and steer a gradual rollout (contract 7.4) on a running
broker, through the same HTTP endpoints a program would use:
`GET /deployments`, `POST /deployments/ROLE@VERSION/rollout/ACTION` and
`POST /versions/ROLE@VERSION/rollback`.

Exit codes: 0 shown, or accepted by the broker (which records the action in
its ledger); 1 the broker refused (nothing of that name is configured, or
not now: its reason is printed); 2 no broker answers, or the target is not
ROLE@VERSION.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from .status import (UNREACHABLE, add_admin_token_arguments, Unreachable, broker_url, duration, fetch, next_step, percent, post, ramp_progress,
                     table, unreachable_advice)

ACTIONS = ("status", "pause", "resume", "promote", "abort")
# What the broker does once it has recorded the action.
EFFECT = {
    "pause": "its share stays where it is until `resume`",
    "resume": "it steps up again as its gates allow",
    "promote": "it takes every new activity (100%) once the broker has recorded the promotion",
    "abort": "it gets no new activities now; the stable version takes them",
    "rollback": "it gets no new activities now; the previous live version is stable again",
}
REFUSED, BAD_REQUEST = 1, 2


def add_arguments(sub, target_type) -> None:
    """Register `rollout` and `rollback`; `target_type` parses ROLE@VERSION (a bad one: usage, exit 2)."""
    rollout = sub.add_parser(
        "rollout", help="a ramping version's share, gates and next step; pause, resume, promote or abort its ramp",
        description="Without an action (or with `status`): the state and share of ROLE@VERSION, its step, whether "
                    "it is paused, when it steps up next and the gate figures against their limits. pause and "
                    "resume stop and restart the stepping up, promote goes to the last step (100%) now, abort "
                    "takes the version out of production (its deployment is failed; `exocom deployments retry` "
                    "starts the ramp again from its first step).")
    rollout.add_argument("target", metavar="ROLE@VERSION", type=target_type,
                         help="the version being rolled out, as in its script's `deploys`, e.g. todos@2.0.0")
    rollout.add_argument("action", nargs="?", default="status", choices=ACTIONS, help="default: status")
    rollback = sub.add_parser(
        "rollback", help="take a live version out of production: the previous live version is stable again",
        description="Take ROLE@VERSION, a live (or draining) version, out of production now: it is failed, new "
                    "activities go to the previous live version. A ramping version is aborted instead "
                    "(`exocom rollout ROLE@VERSION abort`).")
    rollback.add_argument("target", metavar="ROLE@VERSION", type=target_type, help="the version, e.g. todos@2.0.0")
    for parser, command in ((rollout, rollout_command), (rollback, rollback_command)):
        parser.add_argument("--url", default=None, help="the running broker (default http://127.0.0.1:$EXOCOM_PORT, "
                                                        "else $PORT, else 4100)")
        parser.add_argument("--json", action="store_true", help="print JSON")
        add_admin_token_arguments(parser)
        parser.set_defaults(operate=command)


# ----------------------------------------------------------------------- view

def gates(d: dict[str, Any]) -> list[dict[str, Any]]:
    """The gate figures of a ramping deployment against their limits, with a
    verdict each: ok, waiting (not enough replies to judge) or failing (the
    broker aborts the ramp at its next look). Only gates the rollout declares."""
    rollout = d.get("rollout")
    figures = (rollout or {}).get("figures")
    if not figures or d["state"] != "ramping":
        return []
    limits = rollout["gates"]
    judged = figures["replies"] >= limits["minSamples"]

    def gate(name: str, value, limit_name: str, limit, can_judge: bool, **detail) -> dict[str, Any]:
        verdict = "waiting" if not can_judge else ("failing" if value > limit else "ok")
        return {"gate": name, "value": value, "limitName": limit_name, "limit": limit, "verdict": verdict, **detail}

    out = [gate("replies", figures["replies"], "minSamples", limits["minSamples"], True)]
    out[0]["verdict"] = "ok" if judged else "waiting"
    if limits["maxErrorRate"] is not None:
        out.append(gate("errorRate", figures["errorRate"], "maxErrorRate", limits["maxErrorRate"], judged,
                        errors=figures["errors"], replies=figures["replies"]))
    if limits["maxReplyTimeRatio"] is not None:
        ratio = figures["replyTimeRatio"]
        out.append(gate("replyTimeRatio", ratio, "maxReplyTimeRatio", limits["maxReplyTimeRatio"],
                        judged and ratio is not None, p90ReplyTimeS=figures["p90ReplyTimeS"],
                        stableP90ReplyTimeS=figures["stableP90ReplyTimeS"]))
    if limits["maxDisconnects"] is not None:  # judged from the first drop, replies or not
        out.append(gate("disconnects", figures["disconnects"], "maxDisconnects", limits["maxDisconnects"], True))
    return out


def _gate_row(g: dict[str, Any]) -> tuple[str, ...]:
    value = "-" if g["value"] is None else f"{g['value']:g}"
    if g["gate"] == "errorRate":
        value += f" ({g['errors']} of {g['replies']})"
    elif g["gate"] == "replyTimeRatio" and g["p90ReplyTimeS"] is not None:
        value += f" (p90 {g['p90ReplyTimeS']:g}s, stable {g['stableP90ReplyTimeS'] or '-'}s)"
    limit_name = "minSamples" if g["gate"] == "replies" else "max"
    return f"  {g['gate']}", value, "/", f"{limit_name} {g['limit']:g}", g["verdict"]


def describe(d: dict[str, Any], now: float) -> list[str]:
    """A deployment with a rollout, as operators want to see it."""
    rollout, target = d["rollout"], f"{d['role']}@{d['version']}"
    steps = " -> ".join(percent(s) for s in rollout["steps"])
    state = d["state"]
    lines = [f"{target}: {state}, {percent(d['share'])} of new activities (steps {steps}, "
             f"at least {duration(rollout['interval'])} each)"]
    if state == "ramping":
        lines.append(f"  {ramp_progress(d, now)}")
        rows = [_gate_row(g) for g in gates(d)]
        if rows:
            lines.append("  gates (its own replies since the ramp began):")
            lines.extend("  " + row for row in table(rows))
    elif state == "held":
        lines.append(f"  waits for its offline step; the ramp then starts at {percent(rollout['steps'][0])}")
    elif state == "failed":
        why = d.get("stopped") or next((s["lastError"] for s in d["steps"] if s.get("lastError")), None)
        lines.append(f"  out of production{': ' + why if why else ''}. `exocom deployments retry {target}` "
                     "starts the ramp again from its first step")
    else:
        lines.append("  the rollout is over: it is the stable version")
    return lines


def _find(url: str, target: str) -> dict[str, Any] | str:
    """The deployment of target with a rollout, or why there is none."""
    deployments = fetch(url, "/deployments").get("deployments", [])
    d = next((d for d in deployments if f"{d['role']}@{d['version']}" == target), None)
    with_rollout = [f"{d['role']}@{d['version']}" for d in deployments if d.get("rollout")]
    if d is None or not d.get("rollout"):
        known = ", ".join(with_rollout) or "none"
        if d is not None:
            return (f"{target} has no rollout: it goes live at once ({d['state']}); rollouts configured: {known}. "
                    "Declare `rollout: {steps, interval, gates}` next to its `deploys` for a gradual one")
        return f"no rollout of {target} is configured; rollouts configured: {known}"
    return d


# ------------------------------------------------------------------- commands

def rollout_command(args, environ) -> int:
    url = broker_url("exocom rollout", args.url, environ)
    if url is None:
        return UNREACHABLE
    if args.action != "status":
        return _act(url, f"/deployments/{args.target}/rollout/{args.action}", args.target, args.action, args.json)
    try:
        d = _find(url, args.target)
    except Unreachable as e:
        print(f"exocom rollout: {unreachable_advice(e)}", file=sys.stderr)
        return UNREACHABLE
    if isinstance(d, str):
        print(f"exocom rollout: {d}", file=sys.stderr)
        return REFUSED
    now = time.time()
    if args.json:
        print(json.dumps({"url": url, "target": args.target, "deployment": d, "gates": gates(d),
                          "nextStep": next_step(d, now) if d["state"] == "ramping" else None}, indent=2))
    else:
        print("\n".join(describe(d, now)))
    return 0


def rollback_command(args, environ) -> int:
    url = broker_url("exocom rollback", args.url, environ)
    if url is None:
        return UNREACHABLE
    return _act(url, f"/versions/{args.target}/rollback", args.target, "rollback", args.json)


def _act(url: str, path: str, target: str, action: str, as_json: bool) -> int:
    command = "exocom rollback" if action == "rollback" else "exocom rollout"
    try:
        status, answer = post(url, path)
    except Unreachable as e:
        print(f"{command}: {unreachable_advice(e)}", file=sys.stderr)
        return UNREACHABLE
    accepted = status == 202
    if as_json:
        print(json.dumps({"url": url, "target": target, "action": action, "accepted": accepted, "status": status,
                          **answer}, indent=2))
    if not accepted:
        print(f"{command}: {answer.get('error') or f'{url} answered HTTP {status}'}", file=sys.stderr)
        return BAD_REQUEST if status == 400 else REFUSED
    if not as_json:
        print(f"{target}: {action} accepted by the broker at {url}: {EFFECT[action]}")
    return 0
