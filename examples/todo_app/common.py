"""Shared command-line plumbing of the example services."""

import argparse
import os

import trio

from exocom.logs import configure
from exocom.relay import open_relay


def parse_args(description: str, default_version: str | None = None, extra=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default=os.environ.get("EXOCOM_URL", "ws://127.0.0.1:4100/services"))
    parser.add_argument("--version", default=default_version)
    if extra:
        extra(parser)
    args = parser.parse_args()
    configure(None, "info")
    return args


def serve_forever(url: str, role: str, version: str | None, setup) -> None:
    """Connect as `role`@`version` and serve until Ctrl-C (SIGINT), which
    closes the connection cleanly. `setup(relay)` registers the handlers
    before the relay connects."""
    async def main():
        async with open_relay(url, role, version, setup=setup):
            await trio.sleep_forever()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
