"""Where `exocom` commands take their settings from when no flag gives them:
the environment, then the defaults. `serve`, `status` and `deployments` share
these rules, so they always agree on which broker and which ledger they mean.
"""

from __future__ import annotations

import argparse
import os

from ..core.config import ConfigError

DEFAULT_PORT = 4100
DEFAULT_HOST = "0.0.0.0"


def default_state_dir(environ) -> str:
    if environ.get("EXOCOM_STATE_DIR"):
        return environ["EXOCOM_STATE_DIR"]
    base = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "exocom")


def parse_port(text: str) -> int:
    """A TCP port, 0-65535 (0: a free one). The OS would take 99999 modulo
    65536 and listen where nobody looks."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r} is not a port number (0-65535)")
    return port


def port_argument(text: str) -> int:
    """argparse type of --port: a bad value is a usage error (exit 2)."""
    try:
        return parse_port(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def resolve_port(arg: int | None, environ) -> int:
    if arg is not None:
        return arg
    for key in ("EXOCOM_PORT", "PORT"):
        value = environ.get(key)
        if value:
            try:
                return parse_port(value)
            except ValueError as e:
                raise ConfigError(f"{key}={e}") from None
    return DEFAULT_PORT
