"""Shared command-line plumbing of the example services."""

import argparse
import os
import signal

import trio

from exocom.logs import configure, get_logger
from exocom.relay import open_relay


def parse_args(description: str, default_version: str | None = None, extra=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default=os.environ.get("EXOCOM_URL", "ws://127.0.0.1:4100/services"))
    parser.add_argument("--version", default=default_version)
    parser.add_argument("--token", default=None,
                        help="this role's token, if the broker's routing file gives it one (default: $EXOCOM_TOKEN)")
    if extra:
        extra(parser)
    args = parser.parse_args()
    configure(None, "info")
    return args


def serve_forever(url: str, role: str, version: str | None, setup, token: str | None = None) -> None:
    """Connect as `role`@`version` and serve until SIGTERM (`docker stop`) or
    SIGINT (Ctrl-C), which close the connection cleanly and exit 0.
    `setup(relay)` registers the handlers before the relay connects."""
    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(stop_on_signal, nursery.cancel_scope)
            async with open_relay(url, role, version, setup=setup, token=token):
                await trio.sleep_forever()

    trio.run(main)


async def stop_on_signal(scope: trio.CancelScope, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    # Without a handler, SIGTERM kills a process outright -- or does nothing
    # to PID 1 in a container, which Docker then kills 10 s later.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            get_logger().info("service stopping", signal=signal.Signals(signum).name)
            scope.cancel()
            return
