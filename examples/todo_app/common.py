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
    async def main():
        async with open_relay(url, role, version) as relay:
            setup(relay)
            await trio.sleep_forever()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
