"""The `exocom` command line: `serve`, `deployments`."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import gc
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from functools import partial
from pathlib import Path

import trio

from .. import __version__
from ..core.broker import Broker
from ..core.config import ConfigError, load, parse_deployment
from ..logs import LEVELS, configure, get_logger, silence
from ..server.ledger import FILE_NAME, MARKER_NAME, LedgerError, SQLiteLedger, lost_ledger_error, move_aside, traces_of_a_lost_ledger
from ..server import credentials
from ..server.listener import Limits, Server
from ..server.state_lock import StateDirBusy, StateDirLock
from ..server.tls import TLS, TLSError, TLSFiles
from .check import InvalidConfig, check_config_command, load_checked, reloader
from .settings import DEFAULT_HOST, DEFAULT_PORT, default_state_dir, port_argument, resolve_port
from .status import (Unreachable, add_admin_token_arguments, admin_headers, default_url, fetch, last_error,
                     normalize_url, status_command, use_admin_token)


def deployment_argument(text: str) -> str:
    """argparse type of ROLE@VERSION: a malformed one is a usage error (exit 2)."""
    try:
        return str(parse_deployment(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exocom", description="Message broker for microservice fleets, with versioned deployments.")
    parser.add_argument("--version", action="version", version=f"exocom {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(p, default=None):
        p.add_argument("--config", metavar="FILE", default=default,
                       help="routing file (YAML or JSON); default: $SERVICE_DATA, else the embedded default")
        p.add_argument("--state-dir", metavar="DIR", default=default,
                       help="where the ledger lives (default: $EXOCOM_STATE_DIR, else ~/.local/state/exocom)")

    def cluster_ledger_args(p, default=None):
        p.add_argument("--cluster", metavar="URL", default=default,
                       help="read the cluster's ledger in this Redis (as `exocom serve --cluster`) instead of asking "
                            "a broker; without a broker answering, $EXOCOM_CLUSTER_URL is read when set")
        p.add_argument("--cluster-password-file", metavar="FILE", default=default,
                       help="the Redis password, read from this file (env EXOCOM_CLUSTER_PASSWORD_FILE)")

    serve = sub.add_parser("serve", help="run the broker")
    config_args(serve)
    serve.add_argument("--host", default=os.environ.get("EXOCOM_HOST", DEFAULT_HOST), help=f"address to listen on (default {DEFAULT_HOST}, env EXOCOM_HOST)")
    serve.add_argument("--port", type=port_argument, help=f"port (default: $EXOCOM_PORT, else $PORT, else {DEFAULT_PORT})")
    serve.add_argument("--log-format", choices=("json", "console"), help="default: console on a terminal, JSON lines otherwise")
    serve.add_argument("--log-level", choices=LEVELS, default=os.environ.get("EXOCOM_LOG_LEVEL", "info"),
                       help="debug logs every delivery; info (default) registrations and deployments; warning refusals only")
    serve.add_argument("--max-frame-bytes", type=int, default=1024 * 1024, help="larger frames close the connection with 1009 (default 1 MiB)")
    serve.add_argument("--max-outbox-bytes", type=int, default=8 * 1024 * 1024,
                       help="a receiver with more unsent bytes is disconnected as a slow consumer (default 8 MiB)")
    serve.add_argument("--max-messages-per-second", type=float,
                       default=os.environ.get("EXOCOM_MAX_MESSAGES_PER_SECOND", "0"),
                       help="per connection; more are refused (code rate_limited) and dropped "
                            "(default 0: unlimited; env EXOCOM_MAX_MESSAGES_PER_SECOND)")
    serve.add_argument("--step-timeout", type=float, default=300.0, help="time limit of a deployment step in seconds (default 300; per deployment: stepTimeout)")
    serve.add_argument("--grace-period", type=float, default=5.0, help="seconds to wait for connections to close on SIGTERM (default 5)")
    serve.add_argument("--drain-period", type=float, default=float(os.environ.get("EXOCOM_DRAIN_PERIOD", "30")),
                       help="seconds without traffic after which a replaced (draining) version is drained: safe to "
                            "stop (default 30; env EXOCOM_DRAIN_PERIOD)")
    # TLS (issue 10): wss:// and https:// on the same port; the files are read again on SIGHUP.
    serve.add_argument("--tls-cert", metavar="FILE", default=os.environ.get("EXOCOM_TLS_CERT"),
                       help="serve TLS (wss://, https://) with this PEM certificate chain (env EXOCOM_TLS_CERT; "
                            "needs --tls-key)")
    serve.add_argument("--tls-key", metavar="FILE", default=os.environ.get("EXOCOM_TLS_KEY"),
                       help="the certificate's PEM private key (env EXOCOM_TLS_KEY)")
    serve.add_argument("--tls-client-ca", metavar="FILE", default=os.environ.get("EXOCOM_TLS_CLIENT_CA"),
                       help="require a client certificate signed by this CA; its URI SANs exocom:role:NAME are the "
                            "roles it may register as (env EXOCOM_TLS_CLIENT_CA)")
    # Who may connect (issue 10: tokens and operator endpoints).
    serve.add_argument("--require-auth", action="store_true",
                       help="refuse to start while any role has no tokenFile/tokenEnv/tokenSha256 (no open roles)")
    serve.add_argument("--admin-token-file", metavar="FILE",
                       help="operator token: every POST endpoint (retry, rollout, rollback, reload) then needs "
                            "'Authorization: Bearer TOKEN'")
    serve.add_argument("--protect-reads", action="store_true",
                       help="with --admin-token-file: /config.json, /deployments and /metrics need the token too "
                            "(the status page then takes it from its URL: /#token=TOKEN)")
    # Several brokers, one fleet (issue 12).
    serve.add_argument("--cluster", metavar="URL", default=os.environ.get("EXOCOM_CLUSTER_URL"),
                       help="share the fleet with the other brokers on this Redis or Valkey: redis://HOST:PORT/DB, "
                            "rediss://HOST:PORT/DB?ssl_ca_certs=CA.pem for TLS, or "
                            "redis+sentinel://HOST:PORT[,HOST:PORT]/PRIMARY to find the primary through Sentinel "
                            "(env EXOCOM_CLUSTER_URL; needs pip install 'exocom[cluster]')")
    serve.add_argument("--cluster-password-file", metavar="FILE",
                       default=os.environ.get("EXOCOM_CLUSTER_PASSWORD_FILE"),
                       help="the Redis password, read from this file (env EXOCOM_CLUSTER_PASSWORD_FILE)")
    serve.add_argument("--cluster-volatile-ledger", action="store_true",
                       help="start although Redis does not persist writes (appendonly no): after a Redis restart "
                            "every deployment step runs again (tests, demos)")
    serve.add_argument("--broker-id", default=os.environ.get("EXOCOM_BROKER_ID"),
                       help="this broker's name in the cluster, stable across restarts (default HOSTNAME:PORT; "
                            "env EXOCOM_BROKER_ID)")

    deployments = sub.add_parser("deployments", help="list deployments (from the running broker, else its ledger), "
                                                     "retry a failed one, or reset a lost or damaged ledger",
                                 description="Without a subcommand: list.")
    config_args(deployments)
    deployments.add_argument("--url", default=None, help="the running broker to ask first (default "
                                                           "http://127.0.0.1:$EXOCOM_PORT, else $PORT, else 4100); "
                                                           "list reads the ledger instead when --state-dir is given "
                                                           "or no broker answers")
    deployments.add_argument("--json", action="store_true", help="print JSON")
    cluster_ledger_args(deployments)
    add_admin_token_arguments(deployments)
    deployments.set_defaults(action="list", target=None)
    actions = deployments.add_subparsers(dest="action", metavar="{list,retry,reset}")
    # Options given after the subcommand: SUPPRESS keeps them from erasing the
    # same options given before it (`deployments --state-dir X list`).
    listing = actions.add_parser("list", help="every configured deployment and its steps, from the running broker, "
                                              "else from the ledger (also while the broker is down)",
                                 description="Every configured deployment and its steps: asked of the running broker "
                                             "at --url, else read from the ledger in --state-dir (which also skips "
                                             "asking the broker).")
    listing.add_argument("target", nargs="?", metavar="ROLE[@VERSION]",
                         type=lambda text: deployment_argument(text) if "@" in text else text,
                         help="only the deployments of this role (and version)")
    config_args(listing, argparse.SUPPRESS)
    listing.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    listing.add_argument("--url", default=argparse.SUPPRESS, help="the running broker to ask")
    cluster_ledger_args(listing, argparse.SUPPRESS)
    add_admin_token_arguments(listing, argparse.SUPPRESS)
    retry_parser = actions.add_parser(
        "retry", help="re-arm the failed step of a deployment",
        description="Re-arm the failed step of a deployment: on the running broker at --url if one answers "
                    "(the step starts again at once), else in the ledger (it runs at the broker's next start).")
    retry_parser.add_argument("target", metavar="ROLE@VERSION", type=deployment_argument,
                              help="the deployment, as in its script's `deploys`, e.g. todo-search@0.0.1")
    retry_parser.add_argument("--url", default=argparse.SUPPRESS, help="the running broker to ask first (default "
                                                          "http://127.0.0.1:$EXOCOM_PORT, else $PORT, else 4100)")
    config_args(retry_parser, argparse.SUPPRESS)
    add_admin_token_arguments(retry_parser, argparse.SUPPRESS)
    reset_parser = actions.add_parser(
        "reset", help="start over: move the ledger aside (the broker must be stopped)",
        description="Move the ledger, its -wal/-shm files and ledger.created aside as NAME.reset-TIMESTAMP, so "
                    "that the next `exocom serve` starts with an empty ledger and every deployment step runs again. "
                    "Refuses while a broker uses the state directory.")
    config_args(reset_parser, argparse.SUPPRESS)

    status = sub.add_parser("status", help="roles, versions, instances and deployments of a running broker "
                                           "(exit 1: a version held or failed, 2: no broker answers)")
    status.add_argument("--url", default=None, help="the running broker (default http://127.0.0.1:$EXOCOM_PORT, else $PORT, else 4100)")
    status.add_argument("--json", action="store_true", help="print /config.json and /deployments combined as JSON")
    status.add_argument("--watch", action="store_true", help="follow it: redrawn in place on a terminal, one "
                                                             "timestamped line per change otherwise; Ctrl-C ends it")
    status.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between looks with --watch "
                                                                                 "(default 2)")
    add_admin_token_arguments(status)

    # Rollouts (contract 7.4): `exocom rollout ROLE@VERSION [ACTION]`, `exocom rollback ROLE@VERSION`.
    from .rollout import add_arguments as rollout_arguments
    rollout_arguments(sub, deployment_argument)

    check = sub.add_parser("check-config", help="list every problem of a routing file (exit 1 on errors)")
    check.add_argument("file", metavar="FILE", help="routing file (YAML or JSON)")

    from .reload import add_arguments as reload_arguments
    reload_arguments(sub.add_parser("reload", help="make a running broker read its --config file again (exit 1: "
                                                   "refused, nothing changed; 2: no broker answers)"))

    from .demo import add_arguments as demo_arguments
    demo_arguments(sub.add_parser("demo", help="walk through two deployments of the tutorial's todo app, with real "
                                               "processes (needs a source checkout)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _command(argv)
    except BrokenPipeError:
        # `exocom deployments --json | head`: the reader has what it wanted;
        # end quietly, as a tool killed by SIGPIPE would (serve keeps serving).
        silence(sys.stdout)
        return 1


def _command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args, os.environ)
    problem = use_admin_token(args, os.environ)
    if problem:
        print(f"exocom {args.command}: {problem}", file=sys.stderr)
        return 2
    if args.command == "status" and args.watch:
        if args.json:
            print("exocom status: --watch prints text for people; for JSON, run `exocom status --json` "
                  "every few seconds", file=sys.stderr)
            return 2
        from .watch import watch_command
        return watch_command(args.url, args.interval, os.environ)
    if args.command == "status":
        return status_command(args.url, args.json, os.environ)
    if hasattr(args, "operate"):  # rollout, rollback
        return args.operate(args, os.environ)
    if args.command == "check-config":
        return check_config_command(args.file)
    if args.command == "reload":
        from .reload import reload_command
        return reload_command(args.url, args.json, os.environ)
    if args.command == "demo":
        from .demo import main as demo_main
        return demo_main(args)
    return deployments_command(args, os.environ)


def fail(message: str, code: int = 2, **fields) -> int:
    get_logger().error("exocom cannot start", error=message, **fields)
    return code


def _open_roles_error(open_roles: list[str]) -> str:
    return (f"--require-auth: role{'s' * (len(open_roles) > 1)} {', '.join(open_roles)} "
            f"{'have' if len(open_roles) > 1 else 'has'} no credential: give each one tokenFile, tokenEnv or "
            "tokenSha256 in the routing file")


def _closed_roles_only(load):
    """--require-auth holds on reload too: a file that opens a role is refused like a file with errors."""
    def checked():
        config, warnings = load()
        if config.open_roles:
            raise ConfigError(_open_roles_error(config.open_roles))
        return config, warnings
    return checked


def serve(args, environ) -> int:
    configure(args.log_format, args.log_level)
    log = get_logger()
    try:
        config, warnings = load_checked(args.config, environ)
        port = resolve_port(args.port, environ)
    except InvalidConfig as e:
        return fail(f"invalid configuration: {e}", **({"problems": e.lines} if len(e.lines) > 1 else {}))
    except ConfigError as e:
        return fail(f"invalid configuration: {e}")
    for problem in warnings:
        log.warning("configuration warning", problem=problem)
    try:
        tls = _tls(args)
    except TLSError as e:
        return fail(str(e))
    open_roles = config.open_roles
    if args.require_auth and open_roles:
        return fail(_open_roles_error(open_roles), open_roles=open_roles)
    admin_token_sha256 = None
    if args.admin_token_file:
        try:
            admin_token_sha256 = credentials.digest(credentials.read_token_file(Path(args.admin_token_file),
                                                                               "--admin-token-file"))
        except ConfigError as e:
            return fail(str(e))
    elif args.protect_reads:
        return fail("--protect-reads needs --admin-token-file (the token the reads are then protected with)")
    try:
        cluster = _cluster(args, port)
    except ConfigError as e:
        return fail(str(e))
    state_dir = args.state_dir or default_state_dir(environ)
    try:
        lock = StateDirLock.acquire(state_dir, "exocom serve")
    except StateDirBusy as e:
        return fail(f"{e}: stop that broker first, or give this one its own --state-dir")
    except OSError as e:
        return fail(f"cannot lock the state directory {state_dir}: {e}; pass a writable --state-dir or set "
                    "EXOCOM_STATE_DIR")
    try:
        if cluster is not None:
            ledger, records = None, _cluster_ledger(cluster, args.cluster_volatile_ledger, log)
        else:
            ledger = SQLiteLedger.in_state_dir(state_dir)
            records = ledger.load()
    except LedgerError as e:
        lock.release()
        return fail(str(e))
    except OSError as e:
        lock.release()
        return fail(f"{e}; pass a writable --state-dir or set EXOCOM_STATE_DIR")
    broker = Broker(config, ledger_records=records, step_timeout=args.step_timeout,
                    log_deliveries=args.log_level == "debug", max_messages_per_second=args.max_messages_per_second,
                    drain_period=args.drain_period, now=time.time(),
                    **({} if cluster is None else {"cluster_id": cluster.me, "lease": cluster.lease_ttl}))
    reload = reloader(args.config, environ)
    if args.require_auth and reload.load is not None:
        reload = dataclasses.replace(reload, load=_closed_roles_only(reload.load))
    server = Server(broker, ledger, Limits(args.max_frame_bytes, args.max_outbox_bytes), grace_period=args.grace_period,
                    reloader=reload, tls=tls, admin_token_sha256=admin_token_sha256,
                    protect_reads=args.protect_reads)
    server.cluster = cluster

    listen_error: list[OSError] = []

    async def run():
        async with trio.open_nursery() as nursery:
            def announce() -> None:
                lock.announce_address(f"{args.host}:{server.port}")
                log.info("broker listening", host=args.host, port=server.port, config_source=config.source,
                         roles=sorted(config.roles), open_roles=open_roles,
                         deployments=[str(d) for _, d, _ in config.deployments()],
                         state_dir=str(Path(state_dir).resolve()), ledger_records=len(records), version=__version__,
                         tls="off" if tls is None else "client certificates required" if tls.client_certificates else "on",
                         **({} if cluster is None else {"cluster": cluster.shown_url, "broker_id": cluster.me,
                                                     "redis": cluster.kind}))

            try:
                await nursery.start(partial(server.serve, args.host, port, announce=announce))
            except OSError as e:
                # Raised here unwrapped; once out of the nursery it would be an
                # ExceptionGroup that the handler below does not catch.
                listen_error.append(e)
                return
            # What was loaded at startup lives as long as the process: keep the
            # garbage collector from walking it on every full collection.
            gc.freeze()

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    finally:
        if server.ledger is not None:
            server.ledger.close()
        lock.release()
    if listen_error:
        e = listen_error[0]
        if e.errno == errno.EADDRINUSE:
            return fail(f"port {port} on {args.host} is already in use: stop the other process or pass --port")
        if e.errno == errno.EACCES:
            return fail(f"no permission to listen on port {port}: use a port above 1023 or pass --port")
        return fail(f"cannot listen on {args.host}:{port}: {e}")
    if server.forced_stop:
        log.warning("broker stopped", forced=True)
        return 1
    log.info("broker stopped")
    return 0


def _cluster(args, port: int):
    """The link to the cluster's Redis (`--cluster`), or None: coredis is imported only then."""
    if not args.cluster:
        if args.cluster_password_file:
            raise ConfigError("--cluster-password-file needs --cluster URL (or EXOCOM_CLUSTER_URL)")
        return None
    if not args.cluster.startswith(("redis://", "rediss://", "redis+sentinel://")):
        raise ConfigError(f"--cluster {args.cluster!r}: give a redis://, rediss:// or redis+sentinel:// URL "
                          "(e.g. redis://127.0.0.1:6379/0)")
    try:
        from ..server.cluster import SENTINEL, ClusterLink, sentinel_address
    except ImportError as e:
        raise ConfigError(f"--cluster needs the Redis client coredis ({e}): pip install 'exocom[cluster]'") from None
    if args.cluster.startswith(SENTINEL):
        try:
            sentinel_address(args.cluster)
        except ValueError as e:
            shown = re.sub(r"//[^/]*@", "//", args.cluster)  # without a password
            raise ConfigError(f"--cluster {shown!r}: {e}") from None
    password = None
    if args.cluster_password_file:
        password = credentials.read_token_file(Path(args.cluster_password_file), "--cluster-password-file")
    return ClusterLink(args.cluster, args.broker_id or f"{socket.gethostname()}:{port}", password=password)


def _cluster_ledger(cluster, volatile_ok: bool, log) -> list[dict]:
    """The records of the cluster's ledger in Redis (LedgerError: Redis cannot be read or keeps no records)."""
    from ..server.cluster import REDIS_AWAY, PersistenceTooWeak, open_ledger, reason
    try:
        records, warnings, cluster.redis_cluster = trio.run(partial(open_ledger, cluster.url, cluster.password,
                                                                    volatile_ok=volatile_ok))
    except* PersistenceTooWeak as group:
        raise LedgerError(str(group.exceptions[0])) from None
    except* REDIS_AWAY as group:
        raise LedgerError(f"cannot read the cluster's ledger from Redis at {cluster.shown_url}: "
                          f"{reason(group.exceptions[0])}; start Redis (or fix --cluster), then the broker") from None
    for warning in warnings:
        log.warning("cluster redis persistence", problem=warning)
    cluster.known = len(records)
    return records


def _tls(args) -> TLS | None:
    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise TLSError("TLS needs both --tls-cert and --tls-key (or EXOCOM_TLS_CERT and EXOCOM_TLS_KEY)")
    return TLS(TLSFiles(args.tls_cert, args.tls_key, args.tls_client_ca))


def deployments_command(args, environ) -> int:
    if args.action == "retry":
        try:
            url = args.url or f"http://127.0.0.1:{resolve_port(None, environ)}"
        except ConfigError as e:
            print(f"exocom deployments retry: {e}; or pass --url", file=sys.stderr)
            return 2
        return retry(args, environ, url)
    if args.action == "reset":
        return reset(args, environ)
    config = _load_config("exocom deployments", args, environ)
    if config is None:
        return 2
    listing = None if args.state_dir or args.cluster else _ask_running_broker(args, environ)
    if listing is None:
        cluster_url = None if args.state_dir else args.cluster or environ.get("EXOCOM_CLUSTER_URL")
        if cluster_url:
            listing = _read_cluster_ledger(cluster_url, args.cluster_password_file
                                           or environ.get("EXOCOM_CLUSTER_PASSWORD_FILE"), config)
        else:
            listing = _read_ledger(args.state_dir or default_state_dir(environ), config)
        if listing is None:
            return 2
    rows, source = listing["deployments"], listing["source"]
    if args.target:
        rows = [row for row in rows if _names(row, args.target)]
        if not rows:
            print(f"exocom deployments list: no deployment of {args.target} is configured; configured: "
                  f"{', '.join(r['role'] + '@' + r['version'] for r in listing['deployments']) or 'none'}",
                  file=sys.stderr)
            return 1
        listing = {**listing, "deployments": rows}
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    print(source)
    if not rows:
        print("no deployments are configured")
        return 0
    print(f"{'DEPLOYMENT':32} {'BY':28} {'STATE':7} {'OFFLINE':16} {'ONLINE':16} LAST ERROR")
    for row in rows:
        steps = {s["step"]: s for s in row["steps"]}
        cells = [f"{steps[n]['status']} ({steps[n]['attempts']}x)" for n in ("offline", "online")]
        print(f"{row['role'] + '@' + row['version']:32} {row['deployedBy']:28} {row['state']:7} {cells[0]:16} "
              f"{cells[1]:16} {last_error(row)}")
    orphans = listing.get("unconfigured_records")
    if orphans:
        print(f"\n{len(orphans)} ledger records belong to deployments this configuration does not "
              "declare (kept, not acted on): --json lists them")
    return 0


def _ask_running_broker(args, environ) -> dict | None:
    """The deployments as the running broker has them, as `exocom status`
    asks it; None when no broker answers (a note says so on stderr)."""
    try:
        url = normalize_url(args.url or default_url(environ))
    except ConfigError:
        return None  # a bad port variable: there is no broker to name; the ledger is read
    try:
        body = fetch(url, "/deployments")
    except Unreachable as e:
        print(f"exocom deployments: {e}; reading the ledger instead", file=sys.stderr)
        return None
    if not isinstance(body, dict) or not isinstance(body.get("deployments"), list):
        print(f"exocom deployments: {url}/deployments is not an exocom broker's answer; reading the ledger instead",
              file=sys.stderr)
        return None
    ledger = body.get("ledger")
    return {"source": f"from the running broker at {url} (its ledger: {ledger or 'unknown'}; "
                      "--state-dir reads a ledger file instead)",
            "url": url, "ledger": ledger, "deployments": body["deployments"]}


def _read_ledger(state_dir: str, config) -> dict | None:
    ledger_path = Path(state_dir) / FILE_NAME
    if not ledger_path.exists():
        traces = traces_of_a_lost_ledger(ledger_path)
        if traces:
            print(f"exocom deployments: {lost_ledger_error(ledger_path, traces)}", file=sys.stderr)
            return None
        # Not an error (no broker has run here yet), but never silent: a wrong
        # --state-dir would otherwise show every deployment as pending.
        print(f"exocom deployments: no ledger at {ledger_path}: nothing recorded yet; "
              "is this the broker's --state-dir (or EXOCOM_STATE_DIR)?", file=sys.stderr)
        records = []
    else:
        try:
            ledger = SQLiteLedger(ledger_path, create=False)
            try:
                records = ledger.load()
            finally:
                ledger.close()
        except LedgerError as e:
            print(f"exocom deployments: {e}", file=sys.stderr)
            return None
    broker = Broker(config, ledger_records=records)
    return {"source": f"from the ledger {ledger_path.resolve()} (read directly, not from a running broker)",
            "url": None, "ledger": str(ledger_path.resolve()), "deployments": broker.deployments_json(),
            "unconfigured_records": broker.orphan_records}


def _read_cluster_ledger(url: str, password_file: str | None, config) -> dict | None:
    """The deployments as a cluster's ledger in Redis has them (no broker needs to run)."""
    try:
        from ..server.cluster import REDIS_AWAY, open_ledger, reason, shown_url
    except ImportError as e:
        print(f"exocom deployments: --cluster needs the Redis client coredis ({e}): pip install 'exocom[cluster]'",
              file=sys.stderr)
        return None
    try:
        password = (credentials.read_token_file(Path(password_file), "--cluster-password-file")
                    if password_file else None)
    except ConfigError as e:
        print(f"exocom deployments: {e}", file=sys.stderr)
        return None
    records = None
    try:
        records, _, _ = trio.run(partial(open_ledger, url, password, volatile_ok=True))
    except* REDIS_AWAY as group:
        print(f"exocom deployments: cannot read the cluster's ledger from Redis at {shown_url(url)}: "
              f"{reason(group.exceptions[0])}", file=sys.stderr)
    if records is None:
        return None
    broker = Broker(config, ledger_records=records)
    return {"source": f"from the cluster's ledger in Redis at {shown_url(url)} (read directly, not from a "
                      "running broker)", "url": None, "ledger": f"Redis at {shown_url(url)}",
            "deployments": broker.deployments_json(), "unconfigured_records": broker.orphan_records}


def reset(args, environ) -> int:
    """Start over: move the ledger (damaged, or whose loss the state directory
    shows) aside, so that the next `exocom serve` creates an empty one."""
    state_dir = Path(args.state_dir or default_state_dir(environ))
    if not state_dir.is_dir():
        print(f"exocom deployments reset: no state directory at {state_dir}: nothing to reset "
              "(pass the broker's --state-dir)", file=sys.stderr)
        return 2
    try:
        lock = StateDirLock.acquire(state_dir, "exocom deployments reset")
    except StateDirBusy as e:
        print(f"exocom deployments reset: {e}: stop that broker first; nothing was moved", file=sys.stderr)
        return 2
    try:
        suffix = f"reset-{time.strftime('%Y%m%dT%H%M%S')}"
        moved = move_aside(state_dir / FILE_NAME, suffix)
        marker = state_dir / MARKER_NAME
        if marker.exists():
            marker.rename(marker.with_name(f"{MARKER_NAME}.{suffix}"))
            moved.append(f"{MARKER_NAME}.{suffix}")
    finally:
        lock.release()
    if not moved:
        print(f"nothing to reset in {state_dir}: there is no ledger")
        return 0
    print(f"moved aside in {state_dir}: {', '.join(moved)}. The next `exocom serve` starts with an empty ledger: "
          "every deployment step runs again")
    return 0


def _names(row: dict, target: str) -> bool:
    role, at, version = target.partition("@")
    return row["role"] == role and (not at or row["version"] == version)


def _load_config(command: str, args, environ):
    try:
        return load(args.config, environ)
    except ConfigError as e:
        print(f"{command}: invalid configuration: {e}", file=sys.stderr)
        return None


def retry(args, environ, url: str) -> int:
    role, _, version = args.target.partition("@")
    request = urllib.request.Request(f"{url}/deployments/{args.target}/retry", method="POST", data=b"",
                                     headers=admin_headers())
    # A proxy from the environment must not stand between us and a local broker
    # (a refused proxy would look like "no broker running").
    host = urllib.parse.urlsplit(url).hostname
    local = host in (None, "localhost") or host.startswith("127.") or host == "::1"
    opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if local else []))
    try:
        with opener.open(request, timeout=5):
            print(f"{args.target}: retrying now on the running broker at {url}")
            return 0
    except urllib.error.HTTPError as e:
        try:
            error = json.loads(e.read() or b"{}").get("error")
        except (ValueError, AttributeError):
            error = None
        print(f"exocom deployments retry: {error or f'{url} answered HTTP {e.code}'}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if not isinstance(reason, ConnectionRefusedError):
            # Something may be running there (a timeout, a reset): never write
            # behind a running broker's back.
            print(f"exocom deployments retry: no answer from {url} ({reason}); nothing re-armed", file=sys.stderr)
            return 1
        # No broker running: re-arm in the ledger; it runs at the next start.
    config = _load_config("exocom deployments retry", args, environ)
    if config is None:
        return 2
    state_dir = args.state_dir or default_state_dir(environ)
    try:
        ledger = SQLiteLedger.in_state_dir(state_dir, create=False)
    except LedgerError as e:
        print(f"exocom deployments retry: {e}: nothing to re-arm (pass the broker's --state-dir)", file=sys.stderr)
        return 2
    try:
        # A broker on this state directory that is not at `url` must not be written behind.
        lock = StateDirLock.acquire(state_dir, "exocom deployments retry")
    except (StateDirBusy, OSError) as e:
        ledger.close()
        print(f"exocom deployments retry: {e}; nothing re-armed: pass that broker's --url", file=sys.stderr)
        return 1
    try:
        broker = Broker(config, ledger_records=ledger.load())
        try:
            actions = broker.retry(role, version, time.time())
        except (KeyError, ValueError) as e:
            print(f"exocom deployments retry: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
            return 1
        for action in actions:
            if hasattr(action, "record"):
                ledger.append(action.record)
    except LedgerError as e:
        print(f"exocom deployments retry: {e}", file=sys.stderr)
        return 2
    finally:
        ledger.close()
        lock.release()
    print(f"{args.target}: re-armed in the ledger; the broker is not running at {url}, it runs the step at its next start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
