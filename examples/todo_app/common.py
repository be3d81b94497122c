"""Shared command-line plumbing of the example services."""

import argparse
import os
import signal
from pathlib import Path

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
    parser.add_argument("--ready-file", metavar="PATH",
                        help="create this file once registered, remove it when stopping (a container health check)")
    if extra:
        extra(parser)
    args = parser.parse_args()
    configure(None, "info")
    args.ssl_context = tls_context(args)
    return args


def serve_forever(args, role: str, version: str | None, setup) -> None:
    """Connect as `role`@`version` (to `args.url`, with `args.ssl_context` and
    `args.token`) and serve until SIGTERM (`docker stop`) or SIGINT (Ctrl-C),
    which close the connection cleanly and exit 0. `setup(relay)` registers
    the handlers before the relay connects. While registered, the file
    `args.ready_file` exists: a container health check that needs neither the
    broker's port, nor its TLS, nor its operator token."""
    ready = Path(args.ready_file) if args.ready_file else None

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(stop_on_signal, nursery.cancel_scope)
            async with open_relay(args.url, role, version, setup=setup, ssl_context=args.ssl_context,
                                  token=args.token):
                if ready is not None:
                    ready.write_text(f"{role}@{version or '0.0.0'} registered\n")
                try:
                    await trio.sleep_forever()
                finally:
                    if ready is not None:
                        ready.unlink(missing_ok=True)

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
