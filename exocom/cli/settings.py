"""Where `exocom` commands take their settings from when no flag gives them:
the environment, then the defaults. `serve`, `status` and `deployments` share
these rules, so they always agree on which broker and which ledger they mean.
"""

from __future__ import annotations

import os

from ..core.config import ConfigError

DEFAULT_PORT = 4100
DEFAULT_HOST = "0.0.0.0"


def default_state_dir(environ) -> str:
    if environ.get("EXOCOM_STATE_DIR"):
        return environ["EXOCOM_STATE_DIR"]
    base = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "exocom")


def resolve_port(arg: int | None, environ) -> int:
    if arg is not None:
        return arg
    for key in ("EXOCOM_PORT", "PORT"):
        value = environ.get(key)
        if value:
            try:
                port = int(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} is not a port number") from None
            if not 0 <= port <= 65535:
                raise ConfigError(f"{key}={value!r} is not a port number (0-65535)")
            return port
    return DEFAULT_PORT
