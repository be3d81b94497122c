"""The `exocom` command: `serve`, `status`, `deployments`, `check-config`, `demo`."""

from .commands import main

__all__ = ["main"]
