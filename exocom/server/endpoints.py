"""The HTTP endpoints beside `/services`, all on the broker's one port.

`answer` maps a request to a status and a body (JSON, the Prometheus text
format, or the status page's HTML); `respond` sends it and closes the
connection.
"""

from __future__ import annotations

import time
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any

import h11
import orjson
import trio

from ..core.actions import WriteRecord
from ..core.config import parse_deployment
from ..core.ramps import ACTIONS as ROLLOUT_ACTIONS
from ..logs import get_logger
from . import credentials
from .closing import discard_until_eof
from .metrics import render as render_metrics
from .readiness import readiness
from .reloading import reload

if TYPE_CHECKING:
    from .listener import Server


# The read-only status page at `/`: one static file, no build step, no outside
# assets; its script reads /config.json and /deployments. Bytes mark it as the
# one HTML body `respond` sends.
STATUS_PAGE = resources.files(__package__).joinpath("status_page.html").read_bytes()

CLUSTER_RECORD_WAIT = 5.0  # seconds an operator action waits for the shared ledger to take or refuse it
ROLLOUT_DONE = {"pause": "paused", "resume": "resumed", "promote": "promoted", "abort": "aborted"}


async def _operator_action(server: Server, target: str, act, done: str) -> tuple[int, Any]:
    """POST /deployments/ROLE@VERSION/retry and its siblings: 202, or 400 (not
    ROLE@VERSION), 404 (not configured) or 409 (not now), each saying why.

    In a cluster the answer waits for the shared ledger: a record is appended
    only while no other broker holds the deployment's lease, and an action the
    ledger refuses answers 409 naming the broker to send it to, instead of a
    202 for something that never happens."""
    try:
        deployment = parse_deployment(target)
    except ValueError as e:
        return 400, {"error": str(e)}
    try:
        actions = act(deployment.role, str(deployment.version), time.time())
    except KeyError as e:
        return 404, {"error": e.args[0]}
    except ValueError as e:
        return 409, {"error": str(e)}
    cluster = server.cluster
    outcomes = [cluster.watch(a.record) for a in actions if a.__class__ is WriteRecord] if cluster else []
    server.execute(actions)
    if not outcomes:
        return 202, {done: str(deployment)}
    with trio.move_on_after(CLUSTER_RECORD_WAIT):
        for outcome in outcomes:
            await outcome.settled.wait()
    refused = next((o.refused_by for o in outcomes if o.refused_by is not None), None)
    if refused is not None:
        return 409, {"error": f"{deployment} is driven by broker {refused!r} now: the action was not recorded; "
                              "send it to that broker (exocom status on it)"}
    if not all(o.settled.is_set() for o in outcomes):
        return 202, {done: str(deployment), "recorded": False,
                     "note": f"Redis did not answer within {CLUSTER_RECORD_WAIT:g}s: the action is recorded when "
                             "it answers, unless another broker drives the deployment by then (see the log)"}
    return 202, {done: str(deployment), "recorded": True}


# What --protect-reads puts behind the operator token. `/` (the status page) stays open: it is a static file
# with no data, whose script sends the token from the URL fragment (`/#token=...`) with its reads.
PROTECTED_READS = frozenset({"/config.json", "/deployments", "/metrics"})
CHALLENGE = [(b"www-authenticate", b'Bearer realm="exocom"')]


def guard(server: Server, method: str, path: str, bearer: str | None, peer: str) -> tuple | None:
    """The refusal of an operator request without the operator token (--admin-token-file), else None:
    401 without a token, 403 with a wrong one. Every POST changes state; the reads only with --protect-reads."""
    expected = server.admin_token_sha256
    if expected is None or not (method == "POST" or (server.protect_reads and path in PROTECTED_READS)):
        return None
    if bearer is not None and credentials.matches(bearer, expected):
        return None
    status = 401 if bearer is None else 403
    reason = ("send the operator token as 'Authorization: Bearer TOKEN' (exocom: --admin-token, "
              "--admin-token-file or EXOCOM_ADMIN_TOKEN)" if bearer is None else "wrong operator token")
    server.broker.stats.http_unauthorized[status] += 1
    get_logger().warning("operator request refused", method=method, path=path, peer=peer, status=status,
                         reason=reason)
    return status, {"error": reason}, CHALLENGE


async def answer(server: Server, method: str, path: str) -> tuple[int, Any]:
    if method == "GET" and path == "/readyz":
        return await readiness(server)  # async: checks the ledger on a worker thread
    if method == "GET" and path == "/":
        return 200, STATUS_PAGE
    broker = server.broker
    if method == "GET" and path == "/config.json":
        return 200, broker.config_json()
    if method == "GET" and path == "/deployments":
        ledger_path = getattr(server.ledger, "path", None)
        ledger = (f"Redis at {server.cluster.shown_url} (shared by the cluster)" if server.cluster is not None
                  else str(ledger_path) if ledger_path else None)
        # The versions beside the deployments: a replaced version is draining or
        # drained whether or not a deployment brought it.
        versions = {c["role"]: c["versions"] for c in broker.config_json()["clients"]}
        return 200, {"deployments": broker.deployments_json(), "versions": versions, "ledger": ledger}
    if method == "POST" and path.startswith("/deployments/") and path.endswith("/retry"):
        return await _operator_action(server, path[len("/deployments/"):-len("/retry")], broker.retry, "retrying")
    if method == "POST" and path.startswith("/deployments/") and "/rollout/" in path:
        target, _, action = path[len("/deployments/"):].partition("/rollout/")
        if action not in ROLLOUT_ACTIONS:
            return 400, {"error": f"no rollout action {action!r}: one of {', '.join(ROLLOUT_ACTIONS)}"}
        return await _operator_action(server, target,
                                      lambda role, version, now: broker.rollout(role, version, action, now),
                                      ROLLOUT_DONE[action])
    if method == "POST" and path.startswith("/versions/") and path.endswith("/rollback"):
        return await _operator_action(server, path[len("/versions/"):-len("/rollback")], broker.rollback,
                                      "rolledBack")
    if method == "POST" and path == "/reload":
        return await reload(server, "http")
    if method == "GET" and path == "/metrics":
        return 200, render_metrics(broker, sum(p.outbox_bytes for p in server.peers.values()), len(server.peers))
    if method == "GET" and path == "/healthz":
        return 200, {"status": "ok", "uptime_s": round(time.time() - server.started_at, 3)}
    return 400, {"error": f"no endpoint {method} {path}; services connect with a WebSocket to /services"}


async def respond(stream: trio.SocketStream, http: h11.Connection, status: int, body: Any, with_body: bool = True,
                  headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Send the one response of this connection, then close it (lingering: the client may still be sending)."""
    if isinstance(body, bytes):  # the status page; always fresh, so a new broker's page replaces an old one's
        data, content_type = body, "text/html; charset=utf-8"
        headers = [*headers, ("cache-control", "no-store")]
    elif isinstance(body, str):  # the Prometheus text format
        data, content_type = body.encode(), "text/plain; version=0.0.4; charset=utf-8"
    else:
        data, content_type = orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n", "application/json"
    out = http.send(h11.Response(status_code=status, reason=HTTPStatus(status).phrase, headers=[
        ("content-type", content_type), ("content-length", str(len(data))), ("connection", "close"), *headers]))
    if with_body:
        out += http.send(h11.Data(data=data))
    out += http.send(h11.EndOfMessage())
    await stream.send_all(out)
    await stream.send_eof()
    await discard_until_eof(stream)
