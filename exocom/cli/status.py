"""`exocom status`: what a running broker serves, from its HTTP endpoints.

It reads `GET /config.json` (configured roles, connected versions with their
state, share of new activities and instance counts) and `GET /deployments`
(the steps and ramp of every deployment) and prints one table of roles and
one of deployments.

Exit codes: 0 when everything is fine, 1 when a connected version is held or
failed or a deployment failed (the lines under "problems" say which), 2 when
no broker answers at the URL. A ramping, draining or drained version is not a
problem: it is where a rollout is meant to be (the lines under "notes" say
what it does), so a script that waits for `exocom status` to pass does not
stop a healthy ramp.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from .settings import resolve_port  # the same port rules as `exocom serve`

OK, PROBLEMS, UNREACHABLE = 0, 1, 2
TIMEOUT = 5.0


class Unreachable(Exception):
    pass


def normalize_url(url: str) -> str:
    """Accept what users have at hand: `host:port`, `http://host:port`, or the
    services' `ws://host:port/services`."""
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if path.endswith("/services"):
        path = path[: -len("/services")]
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def _is_loopback(host: str | None) -> bool:
    if not host or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _opener(url: str) -> urllib.request.OpenerDirector:
    # A proxy from the environment must not stand between us and a local broker.
    handlers = [urllib.request.ProxyHandler({})] if _is_loopback(urllib.parse.urlsplit(url).hostname) else []
    return urllib.request.build_opener(*handlers)


def _unreachable(url: str, e: OSError | ValueError) -> Unreachable:
    if isinstance(e, urllib.error.URLError):
        reason = e.reason.strerror if isinstance(e.reason, OSError) and e.reason.strerror else e.reason
        return Unreachable(f"no broker answers at {url} ({reason})")
    return Unreachable(f"no broker answers at {url} ({e})")  # timeouts, resets, malformed URLs


# The operator token (`exocom serve --admin-token-file`) every request to the broker carries; set once per
# command from --admin-token, --admin-token-file or $EXOCOM_ADMIN_TOKEN (`use_admin_token`).
_admin_token: str | None = None


def add_admin_token_arguments(parser, default=None) -> None:
    parser.add_argument("--admin-token", metavar="TOKEN", default=default,
                        help="the broker's operator token (visible to other users in the process list: prefer "
                             "--admin-token-file or $EXOCOM_ADMIN_TOKEN)")
    parser.add_argument("--admin-token-file", metavar="FILE", default=default,
                        help="a file holding the operator token (default: $EXOCOM_ADMIN_TOKEN)")


def use_admin_token(args, environ) -> str | None:
    """Take the operator token from the command's arguments or the environment; the error, if the file cannot be read."""
    global _admin_token
    token = getattr(args, "admin_token", None)
    path = getattr(args, "admin_token_file", None)
    if not token and path:
        try:
            token = Path(path).expanduser().read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            return f"cannot read --admin-token-file {path!r} ({getattr(e, 'strerror', None) or e.__class__.__name__})"
        if not token:
            return f"--admin-token-file {path!r} is empty"
    _admin_token = token or environ.get("EXOCOM_ADMIN_TOKEN") or None
    return None


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {_admin_token}"} if _admin_token else {}


def _refusal(url: str, path: str, code: int) -> str:
    if _admin_token is None:
        return (f"{url}{path} needs the broker's operator token (HTTP {code}): pass --admin-token-file FILE or set "
                "EXOCOM_ADMIN_TOKEN")
    return f"{url}{path} refused the operator token (HTTP {code}): is it the one in the broker's --admin-token-file?"


def fetch(url: str, path: str) -> Any:
    """GET url+path as JSON; Unreachable with a readable reason otherwise."""
    try:
        with _opener(url).open(urllib.request.Request(url + path, headers=admin_headers()),
                               timeout=TIMEOUT) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise Unreachable(_refusal(url, path, e.code)) from None
        raise Unreachable(f"{url}{path} answered HTTP {e.code}: it does not look like an exocom broker") from None
    except (OSError, ValueError) as e:
        raise _unreachable(url, e) from None
    try:
        return json.loads(body)
    except ValueError:
        raise Unreachable(f"{url}{path} did not answer JSON: it does not look like an exocom broker") from None


def post(url: str, path: str) -> tuple[int, dict[str, Any]]:
    """POST to an operator endpoint: (HTTP status, JSON body), also for the
    broker's 4xx answers, whose `error` says why; Unreachable otherwise."""
    request = urllib.request.Request(url + path, method="POST", data=b"", headers=admin_headers())
    try:
        with _opener(url).open(request, timeout=TIMEOUT) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except (OSError, ValueError) as e:
        raise _unreachable(url, e) from None
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise Unreachable(f"{url}{path} answered HTTP {status} without JSON: it does not look like an exocom broker")
    return status, answer


def collect(url: str) -> dict[str, Any]:
    config = fetch(url, "/config.json")
    deployments = fetch(url, "/deployments")
    if not isinstance(config, dict) or "routes" not in config or not isinstance(deployments, dict):
        raise Unreachable(f"{url} answered, but not like an exocom broker (no routes in /config.json)")
    status = {"url": url, "reachable": True, "clients": config.get("clients", []), "routes": config.get("routes", {}),
              "deployments": deployments.get("deployments", [])}
    if "cluster" in config:
        status["cluster"] = config["cluster"]
    status["problems"] = problems(status)
    status["notes"] = notes(status)
    status["ok"] = not status["problems"]
    return status


def _connected(status: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["role"], v["version"]): v for c in status["clients"] for v in c.get("versions", [])}


def problems(status: dict[str, Any]) -> list[str]:
    """Why the exit code is 1: failed deployments, held or failed connected versions."""
    out = []
    url = status["url"]
    reported = set()
    for d in status["deployments"]:
        if d["state"] != "failed":
            continue
        target = f"{d['role']}@{d['version']}"
        reported.add((d["role"], d["version"]))
        step = next((s for s in d["steps"] if s["status"] == "failed"), None)
        where = f" at the {step['step']} step (attempt {step['attempts']})" if step else ""
        error = f": {step['lastError']}" if step and step.get("lastError") else ""
        if step is None and d.get("stopped"):  # an aborted ramp or a rolled-back version
            error = f": {d['stopped']}"
        out.append(f"deployment {target} failed{where}{error}; the version gets no production traffic. "
                   f"Fix the cause, then run: exocom deployments retry {target} --url {url}")
    for (role, version), v in sorted(_connected(status).items()):
        if (role, version) in reported or v["state"] not in ("held", "failed"):
            continue
        n = v["instances"]
        if v["state"] == "held":
            d = _deployment(status, role, version)
            why = f": {deployment_progress(d, status)}" if d else ""
            out.append(f"{role} {version} is held ({n} instance{'s' * (n != 1)} connected, no production traffic "
                       f"until its deployment's offline step is done){why}")
        else:
            out.append(f"{role} {version} is {v['state']} ({n} instance{'s' * (n != 1)} connected, "
                       "no production traffic)")
    return out


def notes(status: dict[str, Any]) -> list[str]:
    """What a rollout is doing, not a problem: ramping, draining and drained versions."""
    out = []
    for (role, version), v in sorted(_connected(status).items()):
        n = v["instances"]
        instances = f"{n} instance{'s' * (n != 1)}"
        if v["state"] == "ramping":
            d = _deployment(status, role, version)
            ramp = f", {ramp_progress(d, time.time())}" if d and d.get("rollout") else ""
            out.append(f"{role} {version} is ramping: {percent(v.get('share', 0))} of new activities{ramp}; "
                       f"`exocom rollout {role}@{version}` shows its gates")
        elif v["state"] == "draining":
            out.append(f"{role} {version} is draining ({instances}): a newer version is live; it gets only what "
                       "affinity or a version requirement sends to it, and is drained once quiet for the drain period")
        elif v["state"] == "drained":
            out.append(f"{role} {version} is drained: safe to stop its {instances}")
    return out


def percent(share: float) -> str:
    return f"{share:g}%"


def duration(seconds: float) -> str:
    """9m58s, 1h02m, 40s: precise enough to wait for."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def ramp_progress(d: dict[str, Any], now: float) -> str:
    """Where a ramping deployment stands: `step 1 of 3 at 10%, next step (50%) in 9m58s`."""
    text = ramp_step(d)
    return f"{text}, {next_step(d, now)}" if d["state"] == "ramping" else text


def ramp_step(d: dict[str, Any]) -> str:
    steps, index = d["rollout"]["steps"], d["rollout"]["step"]
    return f"step {index + 1} of {len(steps)} at {percent(steps[index])}"


def next_step(d: dict[str, Any], now: float) -> str:
    """When a ramping deployment steps up, and what it waits for (the broker's
    rules: the interval has passed, minSamples replies, and before the last
    step the online step is done; paused: never)."""
    rollout = d["rollout"]
    steps, following = rollout["steps"], rollout["step"] + 1
    if rollout["paused"]:
        return f"paused (exocom rollout {d['role']}@{d['version']} resume)"
    waits = []
    at = rollout.get("nextStepAt")
    if at is not None and at > now:
        waits.append(f"in {duration(at - now)}")
    missing = rollout["gates"]["minSamples"] - (rollout.get("figures") or {}).get("replies", 0)
    if missing > 0:
        waits.append(f"after {missing} more repl{'ies' if missing != 1 else 'y'}")
    if following == len(steps) - 1 and not d["finished"]:
        waits.append("after the online step is done")
    return f"next step ({percent(steps[following])}) {', '.join(waits) or 'now'}"


def _deployment(status: dict[str, Any], role: str, version: str) -> dict[str, Any] | None:
    return next((d for d in status["deployments"] if d["role"] == role and d["version"] == version), None)


def deployment_progress(d: dict[str, Any], status: dict[str, Any]) -> str:
    steps = d["steps"]
    done = sum(s["status"] == "done" for s in steps)
    if d.get("finished") or done == len(steps):
        return f"{done}/{len(steps)} steps done, finished"
    current = next(s for s in steps if s["status"] != "done")
    text = f"{done}/{len(steps)} steps done, {current['step']} {current['status']}"
    if current["attempts"]:
        text += f" (attempt {current['attempts']})"
    if current["status"] == "failed":
        return text
    if d.get("inFlight"):
        return text + ", running"
    connected = _connected(status)
    script_connected = any(c["role"] == d["deployedBy"] and c.get("instances") for c in status["clients"])
    missing = []
    if (d["role"], d["version"]) not in connected:
        missing.append(f"{d['role']}@{d['version']}")
    if not script_connected:
        missing.append(f"{d['deployedBy']} (the deployment script)")
    if missing:
        return text + ", waiting for " + " and ".join(missing) + " to connect"
    return text


def last_error(d: dict[str, Any]) -> str:
    """The LAST ERROR cell: the error of the failed step; an error of a step
    retried since then is history, and says so."""
    errors = [s for s in d["steps"] if s.get("lastError")]
    current = next((s for s in errors if s["status"] == "failed"), None)
    if current is not None:
        return current["lastError"]
    if errors:
        s = errors[-1]
        return f"(before the retry, now {s['status']}) {s['step']}: {s['lastError']}"
    return ""


def render(status: dict[str, Any]) -> str:
    lines = []
    connected_roles = {c["role"] for c in status["clients"]}
    lines.append(f"exocom at {status['url']}: {len(status['routes'])} roles configured, "
                 f"{len(connected_roles)} connected")
    lines.append("")
    rows = [("ROLE", "VERSION", "STATE", "SHARE", "INSTANCES")]
    by_role = {c["role"]: c for c in status["clients"]}
    for role in sorted(set(status["routes"]) | connected_roles):
        client = by_role.get(role)
        if not client or not client.get("versions"):
            rows.append((role, "-", "-", "-", "0 (not connected)"))
            continue
        for v in client["versions"]:
            rows.append((role, v["version"], v["state"], percent(v.get("share", 0)), str(v["instances"])))
    lines.extend(table(rows))
    lines.append("")
    if "cluster" in status:
        lines.extend(cluster_table(status["cluster"]))
        lines.append("")
    if status["deployments"]:
        rows = [("DEPLOYMENT", "BY", "STATE", "PROGRESS", "LAST ERROR")]
        now = time.time()
        for d in status["deployments"]:
            progress = deployment_progress(d, status)
            if d.get("rollout") and d["state"] == "ramping":
                progress += f"; ramp {ramp_progress(d, now)}"
            rows.append((f"{d['role']}@{d['version']}", d["deployedBy"], d["state"], progress, last_error(d)))
        lines.extend(table(rows))
    else:
        lines.append("no deployments are configured")
    lines.append("")
    if status["problems"]:
        lines.append(f"NOT OK: {len(status['problems'])} problem{'s' * (len(status['problems']) != 1)}:")
        lines.extend(f"  - {p}" for p in status["problems"])
    elif status["notes"]:
        lines.append("OK: no connected version is held or failed")
    else:
        lines.append("OK: every connected version is live and no deployment failed")
    if status["notes"]:
        lines.append("notes:")
        lines.extend(f"  - {n}" for n in status["notes"])
    return "\n".join(lines)


def cluster_table(cluster: dict[str, Any]) -> list[str]:
    """Which broker of the cluster holds what (`exocom serve --cluster`)."""
    brokers = cluster.get("brokers", [])
    rows = [("BROKER", "ROLE", "VERSION", "STATE", "INSTANCES")]
    for b in brokers:
        name = b["broker"] + (" (this one)" if b.get("self") else "")
        held = [(role, version, entry) for role, versions in sorted(b["roles"].items())
                for version, entry in versions.items()]
        if not held:
            rows.append((name, "-", "-", "-", "0"))
        for role, version, entry in held:
            rows.append((name, role, version, entry["state"], str(entry["instances"])))
    return [f"cluster: {len(brokers)} broker{'s' * (len(brokers) != 1)}", *table(rows)]


def table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def default_url(environ) -> str:
    return f"http://127.0.0.1:{resolve_port(None, environ)}"


def broker_url(command: str, url: str | None, environ) -> str | None:
    """--url, else the default; None (after saying why) when the port variables are wrong."""
    if url is None:
        try:
            url = default_url(environ)
        except ValueError as e:  # ConfigError: EXOCOM_PORT or PORT is not a port
            print(f"{command}: {e}; pass --url http://HOST:PORT", file=sys.stderr)
            return None
    return normalize_url(url)


def unreachable_advice(error: Unreachable) -> str:
    return (f"{error}. Is the broker running? Start it with `exocom serve`, or name the running one with "
            "--url http://HOST:PORT (default: 127.0.0.1 on $EXOCOM_PORT, else $PORT, else 4100).")


def status_command(url: str | None, as_json: bool, environ) -> int:
    url = broker_url("exocom status", url, environ)
    if url is None:
        return UNREACHABLE
    try:
        status = collect(url)
    except Unreachable as e:
        print(f"exocom status: {unreachable_advice(e)}", file=sys.stderr)
        if as_json:
            print(json.dumps({"url": url, "reachable": False, "error": str(e)}, indent=2))
        return UNREACHABLE
    if as_json:
        print(json.dumps(status, indent=2))
    else:
        print(render(status))
    return OK if status["ok"] else PROBLEMS
