"""`GET /readyz`: whether this broker can take traffic now.

Ready means: it listens (and is not shutting down), its configuration is
loaded, and its ledger is open and writable -- a deployment step is only
reported done once its record is durable, so a broker that cannot write its
ledger would hold every deployment. `GET /healthz` only says the process is
alive; orchestrators restart on /healthz and route traffic on /readyz.
"""

from __future__ import annotations

from typing import Any

import trio

from .ledger import LedgerError

# The ledger check runs on a worker thread; SQLite may wait up to 10 s for a
# write lock held by another process. Answer "not ready" long before that.
LEDGER_CHECK_TIMEOUT = 2.0

HINTS = {
    "listening": "the broker stops accepting connections on SIGTERM; a new one is needed",
    "ledger": "check the state directory ($EXOCOM_STATE_DIR or --state-dir): it must exist, be writable "
              "by the broker's user, not be full or read-only, and not have been moved or replaced; "
              "once fixed the broker is ready again; a ledger file deleted or replaced is written again from "
              "the records the broker holds (log event `ledger rewritten`)",
    "cluster": "start Redis, or make it reachable from this broker (--cluster URL, --cluster-password-file); "
               "meanwhile services on this broker still talk to each other, messages for other brokers wait in "
               "memory up to the bound `buffered`/`dropped` show, and the broker is ready again once Redis answers",
}


async def readiness(server) -> tuple[int, dict[str, Any]]:
    """The status code and body of `GET /readyz` for a `server.Server`."""
    checks: dict[str, dict[str, Any]] = {}

    if server.stopping:
        checks["listening"] = {"ok": False, "error": "the broker is shutting down"}
    elif not server.listeners:
        checks["listening"] = {"ok": False, "error": "not listening yet"}
    else:
        checks["listening"] = {"ok": True, "addresses": [
            "%s:%s" % listener.socket.getsockname()[:2] for listener in server.listeners]}

    config = server.broker.config
    checks["config"] = {"ok": True, "source": config.source, "roles": len(config.roles),
                        "deployments": len(config.deployments())}

    if server.cluster is not None:
        # The ledger is in Redis: writable exactly while Redis answers.
        checks["cluster"] = server.cluster.check()
    else:
        checks["ledger"] = await _ledger_check(server)

    failing = [name for name, check in checks.items() if not check["ok"]]
    if not failing:
        return 200, {"ready": True, "checks": checks}
    for name in failing:
        checks[name].setdefault("hint", HINTS.get(name, ""))
    first = checks[failing[0]]
    return 503, {"ready": False, "failing": failing, "error": f"{failing[0]}: {first['error']}",
                 "hint": first["hint"], "checks": checks}


async def _ledger_check(server) -> dict[str, Any]:
    ledger = server.ledger
    if ledger is None:
        return {"ok": False, "error": "no ledger is open: deployment steps cannot be recorded",
                "hint": "run the broker with `exocom serve`, which opens the ledger in its state directory"}
    path = getattr(ledger, "path", None)
    check = {"path": str(path)} if path is not None else {}
    if server.ledger_problem is not None:
        return {"ok": False, **check, "error": f"{server.ledger_problem}; the broker is writing the records it holds "
                                                 "to a fresh ledger, no deployment step starts meanwhile"}
    # One check at a time: checks stuck on a lock must not pile up threads.
    if getattr(server, "_readyz_ledger_busy", False):
        return {"ok": False, **check, "error": "the previous ledger check has not finished yet "
                                                 "(another process may hold the ledger's write lock)"}
    server._readyz_ledger_busy = True
    error = None
    with trio.move_on_after(LEDGER_CHECK_TIMEOUT) as scope:
        try:
            await trio.to_thread.run_sync(_check, server, ledger, abandon_on_cancel=True)
        except LedgerError as e:
            error = str(e)
    if scope.cancelled_caught:
        error = (f"the ledger check did not finish within {LEDGER_CHECK_TIMEOUT:g}s "
                 "(another process may hold the ledger's write lock, or the disk is stalled)")
    if error is not None:
        return {"ok": False, **check, "error": error}
    return {"ok": True, **check}


def _check(server, ledger) -> None:
    """On a worker thread; an abandoned (timed out) check clears the flag when it ends."""
    try:
        ledger.check_writable()
    finally:
        server._readyz_ledger_busy = False
