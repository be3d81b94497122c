"""Shared command-line plumbing of the example services."""

import argparse
import os
import signal

import trio

from exocom.logs import configure, get_logger
from exocom.relay import context_from, open_relay


def tls_arguments(parser: argparse.ArgumentParser) -> None:
    """--ca-file, --cert-file, --key-file for a wss:// URL (else EXOCOM_TLS_CA, EXOCOM_TLS_CLIENT_CERT,
    EXOCOM_TLS_CLIENT_KEY); `tls_context(args)` makes the relay's context of them."""
    parser.add_argument("--ca-file", help="the CA of the broker's certificate (env EXOCOM_TLS_CA; default: the "
                                          "system's CAs)")
    parser.add_argument("--cert-file", help="client certificate, for a broker started with --tls-client-ca "
                                            "(env EXOCOM_TLS_CLIENT_CERT)")
    parser.add_argument("--key-file", help="its private key (env EXOCOM_TLS_CLIENT_KEY)")


def tls_context(args):
    return context_from(args.ca_file, args.cert_file, args.key_file, os.environ)


def parse_args(description: str, default_version: str | None = None, extra=None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default=os.environ.get("EXOCOM_URL", "ws://127.0.0.1:4100/services"),
                        help="the broker; wss://HOST:PORT/services for TLS")
    parser.add_argument("--version", default=default_version)
    tls_arguments(parser)
    parser.add_argument("--token", default=None,
                        help="this role's token, if the broker's routing file gives it one (default: $EXOCOM_TOKEN)")
    if extra:
        extra(parser)
    args = parser.parse_args()
    configure(None, "info")
    args.ssl_context = tls_context(args)
    return args


def serve_forever(url: str, role: str, version: str | None, setup, ssl_context=None, token: str | None = None) -> None:
    """Connect as `role`@`version` and serve until SIGTERM (`docker stop`) or
    SIGINT (Ctrl-C), which close the connection cleanly and exit 0.
    `setup(relay)` registers the handlers before the relay connects."""
    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(stop_on_signal, nursery.cancel_scope)
            async with open_relay(url, role, version, setup=setup, ssl_context=ssl_context, token=token):
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
