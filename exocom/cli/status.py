"""`exocom status`: what a running broker serves, from its HTTP endpoints.

It reads `GET /config.json` (configured roles, connected versions with their
state and instance counts) and `GET /deployments` (the steps of every
deployment) and prints one table of roles and one of deployments.

Exit codes: 0 when everything is fine, 1 when a connected version is held or
failed or a deployment failed (the lines under "problems" say which), 2 when
no broker answers at the URL.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
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


def fetch(url: str, path: str) -> Any:
    """GET url+path as JSON; Unreachable with a readable reason otherwise."""
    # A proxy from the environment must not stand between us and a local broker.
    handlers = [urllib.request.ProxyHandler({})] if _is_loopback(urllib.parse.urlsplit(url).hostname) else []
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url + path, timeout=TIMEOUT) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        raise Unreachable(f"{url}{path} answered HTTP {e.code}: it does not look like an exocom broker") from None
    except urllib.error.URLError as e:
        reason = e.reason.strerror if isinstance(e.reason, OSError) and e.reason.strerror else e.reason
        raise Unreachable(f"no broker answers at {url} ({reason})") from None
    except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
        raise Unreachable(f"no broker answers at {url} ({e})") from None
    try:
        return json.loads(body)
    except ValueError:
        raise Unreachable(f"{url}{path} did not answer JSON: it does not look like an exocom broker") from None


def collect(url: str) -> dict[str, Any]:
    config = fetch(url, "/config.json")
    deployments = fetch(url, "/deployments")
    if not isinstance(config, dict) or "routes" not in config or not isinstance(deployments, dict):
        raise Unreachable(f"{url} answered, but not like an exocom broker (no routes in /config.json)")
    status = {"url": url, "reachable": True, "clients": config.get("clients", []), "routes": config.get("routes", {}),
              "deployments": deployments.get("deployments", [])}
    status["problems"] = problems(status)
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
        out.append(f"deployment {target} failed{where}{error}; the version gets no production traffic. "
                   f"Fix the cause, then run: exocom deployments retry {target} --url {url}")
    for (role, version), v in sorted(_connected(status).items()):
        if (role, version) in reported or v["state"] == "live":
            continue
        n = v["instances"]
        if v["state"] == "held":
            d = _deployment(status, role, version)
            why = f": {_progress(d, status)}" if d else ""
            out.append(f"{role} {version} is held ({n} instance{'s' * (n != 1)} connected, no production traffic "
                       f"until its deployment's offline step is done){why}")
        else:
            out.append(f"{role} {version} is {v['state']} ({n} instance{'s' * (n != 1)} connected, "
                       "no production traffic)")
    return out


def _deployment(status: dict[str, Any], role: str, version: str) -> dict[str, Any] | None:
    return next((d for d in status["deployments"] if d["role"] == role and d["version"] == version), None)


def _progress(d: dict[str, Any], status: dict[str, Any]) -> str:
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
    rows = [("ROLE", "VERSION", "STATE", "INSTANCES")]
    by_role = {c["role"]: c for c in status["clients"]}
    for role in sorted(set(status["routes"]) | connected_roles):
        client = by_role.get(role)
        if not client or not client.get("versions"):
            rows.append((role, "-", "-", "0 (not connected)"))
            continue
        for v in client["versions"]:
            rows.append((role, v["version"], v["state"], str(v["instances"])))
    lines.extend(_table(rows))
    lines.append("")
    if status["deployments"]:
        rows = [("DEPLOYMENT", "BY", "STATE", "PROGRESS", "LAST ERROR")]
        for d in status["deployments"]:
            rows.append((f"{d['role']}@{d['version']}", d["deployedBy"], d["state"], _progress(d, status), last_error(d)))
        lines.extend(_table(rows))
    else:
        lines.append("no deployments are configured")
    lines.append("")
    if status["problems"]:
        lines.append(f"NOT OK: {len(status['problems'])} problem{'s' * (len(status['problems']) != 1)}:")
        lines.extend(f"  - {p}" for p in status["problems"])
    else:
        lines.append("OK: every connected version is live and no deployment failed")
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def default_url(environ) -> str:
    return f"http://127.0.0.1:{resolve_port(None, environ)}"


def status_command(url: str | None, as_json: bool, environ) -> int:
    if url is None:
        try:
            url = default_url(environ)
        except ValueError as e:  # ConfigError: EXOCOM_PORT or PORT is not a port
            print(f"exocom status: {e}; pass --url http://HOST:PORT", file=sys.stderr)
            return UNREACHABLE
    url = normalize_url(url)
    try:
        status = collect(url)
    except Unreachable as e:
        print(f"exocom status: {e}. Is the broker running? Start it with `exocom serve`, or name the running "
              "one with --url http://HOST:PORT (default: 127.0.0.1 on $EXOCOM_PORT, else $PORT, else 4100).",
              file=sys.stderr)
        if as_json:
            print(json.dumps({"url": url, "reachable": False, "error": str(e)}, indent=2))
        return UNREACHABLE
    if as_json:
        print(json.dumps(status, indent=2))
    else:
        print(render(status))
    return OK if status["ok"] else PROBLEMS
