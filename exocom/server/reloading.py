"""Reloading the routing configuration while the broker runs: on SIGHUP,
`POST /reload` and `exocom reload` (which posts it).

The source is the one the broker started from: `--config FILE` is read
again and judged exactly as at startup (`exocom check-config`'s verdict); a
file with errors changes nothing and the log says why. `SERVICE_DATA` comes
from the process's environment, which cannot change under it: a reload is
refused. The embedded default cannot change either: nothing to do. A good
file is applied at once by the core (`Broker.reconfigure`), between two
messages, without dropping a connection of a role that stays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import trio

from ..core.config import Config, ConfigError
from ..core.reconfigure import config_changes
from .tls import TLSError

if TYPE_CHECKING:
    from .listener import Server

# The fields of the `configuration reloaded` log event, by key of `config_changes`.
_LOG_FIELDS = {"rolesAdded": "roles_added", "rolesRemoved": "roles_removed", "rolesChanged": "roles_changed",
               "deploymentsAdded": "deployments_added", "deploymentsRemoved": "deployments_removed"}


@dataclass(frozen=True)
class Reloader:
    """Where the running broker's configuration comes from and how to read
    it again (`exocom serve` builds it: `cli.check.reloader`)."""

    source: str
    # Reads and checks the source (blocking file I/O: run on a worker thread);
    # raises ConfigError, whose `lines` (if any) are check-config's lines.
    load: Callable[[], tuple[Config, list[str]]] | None = None
    # Why there is nothing to read again (load is None): refused if set, else nothing to do.
    refused: str | None = None


async def reload(server: Server, trigger: str) -> tuple[int, dict[str, Any]]:
    """Read the configuration (and the TLS files) again and run with them: (HTTP status, body)."""
    status, body = await _reload_config(server, trigger)
    # TLS certificates: their own verdict, whatever the configuration's was (a renewed certificate must not wait
    # for a good routing file).
    if server.tls is not None:
        body["tls"] = await _reload_tls(server, server.log.bind(trigger=trigger))
    return status, body


async def _reload_tls(server: Server, log) -> dict[str, Any]:
    files = server.tls.files
    try:
        context = await trio.to_thread.run_sync(files.context)
    except TLSError as e:
        error = f"{e}; nothing changed: new connections still use the certificates loaded before"
        log.error("tls reload refused", cert=files.cert, error=error)
        return {"reloaded": False, "error": error}
    server.tls.context = context
    log.info("tls reloaded", cert=files.cert, client_ca=files.client_ca)
    return {"reloaded": True}


async def _reload_config(server: Server, trigger: str) -> tuple[int, dict[str, Any]]:
    log = server.log.bind(trigger=trigger)
    reloader = server.reloader
    async with server.reload_lock:  # a SIGHUP during a POST /reload waits for it
        if reloader is None or reloader.load is None:
            source = reloader.source if reloader else "unknown"
            if reloader is not None and reloader.refused:
                log.error("configuration reload refused", source=source, error=reloader.refused)
                return 409, {"reloaded": False, "source": source, "error": reloader.refused}
            reason = f"the broker runs on the {source}, which cannot change: nothing to reload " \
                     "(start it with --config FILE to reload a file)"
            log.info("configuration reload skipped", source=source, reason=reason)
            return 200, {"reloaded": False, "source": source, "reason": reason}
        try:
            config, warnings = await trio.to_thread.run_sync(reloader.load)
        except ConfigError as e:
            problems = getattr(e, "lines", None) or [str(e)]
            error = f"{e}; nothing changed: fix the file (`exocom check-config {reloader.source}`) and reload again"
            log.error("configuration reload refused", source=reloader.source, error=error, problems=problems)
            return 422, {"reloaded": False, "source": reloader.source, "error": error, "problems": problems}
        changes = config_changes(server.broker.config, config)
        # One synchronous step of the event loop: no message is handled half under the old routes.
        server.execute(server.broker.reconfigure(config, time.time()))
        for problem in warnings:
            log.warning("configuration warning", problem=problem)
        log.info("configuration reloaded", source=reloader.source,
                 **{field: changes[key] for key, field in _LOG_FIELDS.items()})
        return 200, {"reloaded": True, "source": reloader.source, "changes": changes, "warnings": warnings}
