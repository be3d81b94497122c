"""`exocom reload`: make a running broker read its `--config` file again
(`POST /reload`; the same as sending it SIGHUP, but with the answer).

Exit codes: 0 reloaded (or nothing to reload), 1 refused (the file has
errors, or the broker runs on SERVICE_DATA): nothing changed, 2 no broker
answers at the URL.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request

from ..core.config import ConfigError
from .status import TIMEOUT, _is_loopback, _refusal, add_admin_token_arguments, admin_headers, default_url, normalize_url

RELOADED, REFUSED, UNREACHABLE = 0, 1, 2


def add_arguments(parser) -> None:
    parser.add_argument("--url", default=None, help="the running broker (default http://127.0.0.1:$EXOCOM_PORT, "
                                                    "else $PORT, else 4100)")
    parser.add_argument("--json", action="store_true", help="print the broker's answer as JSON")
    add_admin_token_arguments(parser)


def reload_command(url: str | None, as_json: bool, environ) -> int:
    try:
        url = normalize_url(url or default_url(environ))
    except ConfigError as e:
        print(f"exocom reload: {e}; or pass --url", file=sys.stderr)
        return UNREACHABLE
    handlers = [urllib.request.ProxyHandler({})] if _is_loopback(urllib.parse.urlsplit(url).hostname) else []
    request = urllib.request.Request(f"{url}/reload", method="POST", data=b"", headers=admin_headers())
    try:
        # Reading and checking the file takes a worker thread on the broker; allow for a slow disk.
        with urllib.request.build_opener(*handlers).open(request, timeout=TIMEOUT * 4) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        print(f"exocom reload: no broker answers at {url} ({reason}); nothing reloaded", file=sys.stderr)
        return UNREACHABLE
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if status in (401, 403):
        print(f"exocom reload: {_refusal(url, '/reload', status)}; nothing reloaded", file=sys.stderr)
        return REFUSED
    if not isinstance(answer, dict) or "reloaded" not in answer:
        print(f"exocom reload: {url}/reload answered HTTP {status}, not like an exocom broker", file=sys.stderr)
        return UNREACHABLE
    if as_json:
        print(json.dumps(answer, indent=2))
    if status != 200:
        if not as_json:
            print(f"exocom reload: refused: {answer.get('error')}", file=sys.stderr)
            for problem in answer.get("problems") or ():
                print(f"  {problem}", file=sys.stderr)
        return REFUSED
    if not as_json:
        if not answer["reloaded"]:
            print(answer.get("reason"))
        else:
            changes = answer["changes"]
            done = [f"{label}: {', '.join(changes[key])}" for key, label in (
                ("rolesAdded", "roles added"), ("rolesRemoved", "roles removed (connections closed with 4005)"),
                ("rolesChanged", "roles changed"), ("deploymentsAdded", "deployments added (their versions held)"),
                ("deploymentsRemoved", "deployments removed")) if changes[key]]
            print(f"reloaded {answer['source']} on the broker at {url}: " + ("; ".join(done) or "nothing changed"))
            for warning in answer.get("warnings") or ():
                print(f"  {warning}")
    return RELOADED
