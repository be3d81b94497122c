"""TLS (issue 10 item 2): wss:// and https:// on the broker's port, client
certificates that name roles (4007), certificates reloaded on SIGHUP, and
plaintext/TLS mismatches that fail fast and clearly. Real processes, real
sockets, certificates made here with trustme."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import time
import urllib.request
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509

from exocom.cli.certificates import role_certificate
from exocom.cli.probe import probe
from exocom.core.actions import CLOSE_NOT_IN_CERTIFICATE
from exocom.relay import RegistrationRefused, client_context, open_relay
from exocom.core.broker import Broker
from exocom.core.config import parse_service_data
from exocom.server import tls as tls_module
from exocom.server.listener import Server
from exocom.server.tls import TLS, TLSFiles, cert_roles
from tests.core import Harness
from tests.processes import BrokerProcess, run_web, start_example, wait_for


def role_cert(ca: trustme.CA, tmp_path: Path, name: str, *roles: str) -> tuple[str, str]:
    return role_certificate(ca, tmp_path, name, *roles)


class TLSBroker(BrokerProcess):
    def __init__(self, tmp_path: Path, ca: trustme.CA, *args: str):
        self.server_cert = ca.issue_cert("127.0.0.1", "localhost")
        self.cert_file, self.key_file = tmp_path / "server.pem", tmp_path / "server-key.pem"
        self.server_cert.cert_chain_pems[0].write_to_path(str(self.cert_file))
        self.server_cert.private_key_pem.write_to_path(str(self.key_file))
        self.ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        # The broker's own client certificate for its health checks, when client certificates are required.
        self.probe_cert = role_cert(ca, tmp_path, "probe")
        super().__init__(tmp_path, "--tls-cert", str(self.cert_file), "--tls-key", str(self.key_file), *args)

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/services"

    @property
    def http(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def context(self, cert: tuple[str, str] | None = None) -> ssl.SSLContext:
        return client_context(str(self.ca_file), *(cert or self.probe_cert))

    def get(self, path: str):
        try:
            with urllib.request.urlopen(self.http + path, timeout=2, context=self.context()) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def named(self, event: str) -> list[dict]:
        return [line for line in self.events() if line.get("event") == event]


@contextlib.contextmanager
def running(broker: BrokerProcess):
    try:
        yield broker.start()
    finally:
        broker.stop()


@pytest.fixture
def ca():
    return trustme.CA()


async def exchange(url: str, context: ssl.SSLContext, web_context: ssl.SSLContext | None = None) -> dict:
    """todos answers todos.list; web asks: the payload of the answer."""
    async with open_relay(url, "todos", connect_timeout=10, ssl_context=context) as todos:
        @todos.handler("todos.list")
        async def listing(message):
            await message.reply("todos.listing", {"todos": ["over TLS"]})

        async with open_relay(url, "web", connect_timeout=10, ssl_context=web_context or context) as web:
            answer = await web.request("todos.list", timeout=5)
    return answer.payload


async def test_relays_exchange_messages_over_wss_and_https_answers(tmp_path, ca):
    with running(TLSBroker(tmp_path, ca)) as broker:
        assert broker.get("/healthz") is not None  # https://
        context = client_context(str(broker.ca_file))
        assert await exchange(broker.url, context) == {"todos": ["over TLS"]}
        [listening] = broker.named("broker listening")
        assert listening["tls"] == "on"


def _handshake(port: int, context: ssl.SSLContext) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            peercert = tls.getpeercert()
            tls.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            # TLS 1.3: a refused client certificate shows on the first read (an alert, or the end of the connection).
            if not tls.recv(1):
                raise ConnectionResetError("the broker closed the connection without an answer")
            return peercert


async def test_client_certificates_name_the_roles(tmp_path, ca):
    with running(TLSBroker(tmp_path, ca, "--tls-client-ca", str(tmp_path / "ca.pem"))) as broker:
        # No certificate: refused at the handshake.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _handshake(broker.port, client_context(str(broker.ca_file)))
        wait_for(lambda: broker.named("tls handshake failed"), what="the refused handshake's event")
        assert "no client certificate" in broker.named("tls handshake failed")[0]["reason"]

        todos_cert = broker.context(role_cert(ca, tmp_path, "todos", "todos"))
        # A certificate for todos may not register as web: 4007.
        with pytest.raises(RegistrationRefused) as refused:
            async with open_relay(broker.url, "web", connect_timeout=10, ssl_context=todos_cert):
                pass
        assert refused.value.code == CLOSE_NOT_IN_CERTIFICATE == 4007
        [event] = broker.named("registration refused")
        assert event["code"] == 4007 and "'web' is not allowed by the client certificate" in event["reason"]
        # As todos it works; a certificate may name several roles.
        web_cert = broker.context(role_cert(ca, tmp_path, "web", "web", "todo-search"))
        assert await exchange(broker.url, todos_cert, web_cert) == {"todos": ["over TLS"]}
        # A certificate of another CA: refused at the handshake.
        stranger = broker.context(role_cert(trustme.CA(), tmp_path, "stranger", "todos"))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _handshake(broker.port, stranger)


async def test_sighup_reloads_the_certificate(tmp_path, ca):
    with running(TLSBroker(tmp_path, ca)) as broker:
        context = client_context(str(broker.ca_file))
        before = _handshake(broker.port, context)["serialNumber"]
        # A bad file changes nothing and says why.
        broker.key_file.write_text("not a key")
        broker.process.send_signal(signal.SIGHUP)
        wait_for(lambda: broker.named("tls reload refused"), what="the refused reload")
        assert "cannot use --tls-cert" in broker.named("tls reload refused")[0]["error"]
        assert _handshake(broker.port, context)["serialNumber"] == before
        renewed = ca.issue_cert("127.0.0.1")
        renewed.cert_chain_pems[0].write_to_path(str(broker.cert_file))
        renewed.private_key_pem.write_to_path(str(broker.key_file))
        broker.process.send_signal(signal.SIGHUP)
        wait_for(lambda: broker.named("tls reloaded"), what="the reload")
        after = _handshake(broker.port, context)["serialNumber"]
        assert after != before
        assert int(after, 16) == x509.load_pem_x509_certificate(renewed.cert_chain_pems[0].bytes()).serial_number


async def test_plaintext_to_the_tls_port_gets_a_clear_answer_at_once(tmp_path, ca):
    with running(TLSBroker(tmp_path, ca)) as broker:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        assert time.monotonic() - started < 3
        assert answer.startswith(b"HTTP/1.1 400") and b"this port serves TLS: use https:// or wss://" in answer
        wait_for(lambda: broker.named("tls handshake failed"), what="the event")
        [event] = broker.named("tls handshake failed")
        assert event["peer"].startswith("127.0.0.1:") and "plaintext" in event["reason"]


async def test_tls_to_the_plaintext_port_fails_at_once(tmp_path, ca):
    with running(BrokerProcess(tmp_path)) as broker:
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        started = time.monotonic()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _handshake(broker.port, client_context(str(ca_file)))
        assert time.monotonic() - started < 3
        wait_for(lambda: TLSBroker.named(broker, "tls handshake failed"), what="the event")
        [event] = TLSBroker.named(broker, "tls handshake failed")
        assert "a TLS client on the plaintext port" in event["reason"]
        # The relay says what went wrong instead of hanging.
        with pytest.raises(Exception) as failed:
            async with open_relay(f"wss://127.0.0.1:{broker.port}/services", "web", connect_timeout=2,
                                  ssl_context=client_context(str(ca_file))):
                pass
        assert "TLS handshake" in str(failed.value) and "serving plaintext? then use ws://" in str(failed.value)


async def test_the_health_check_probe_speaks_tls(tmp_path, ca):
    with running(TLSBroker(tmp_path, ca, "--tls-client-ca", str(tmp_path / "ca.pem"))) as broker:
        env = {"EXOCOM_PORT": str(broker.port), "EXOCOM_TLS_CERT": str(broker.cert_file)}
        assert await trio.to_thread.run_sync(probe, "/readyz", env) == 1  # no client certificate
        env.update(EXOCOM_TLS_CA=str(broker.ca_file), EXOCOM_TLS_CLIENT_CERT=broker.probe_cert[0],
                   EXOCOM_TLS_CLIENT_KEY=broker.probe_cert[1])
        assert await trio.to_thread.run_sync(probe, "/readyz", env) == 0
    (tmp_path / "plain").mkdir()
    with running(BrokerProcess(tmp_path / "plain")) as broker:
        assert await trio.to_thread.run_sync(probe, "/readyz", {"PORT": str(broker.port)}) == 0


async def test_example_services_take_the_tls_files_from_flags_and_environment(tmp_path, ca, monkeypatch):
    with running(TLSBroker(tmp_path, ca, "--tls-client-ca", str(tmp_path / "ca.pem"))) as broker:
        todos_cert, todos_key = role_cert(ca, tmp_path, "todos", "todos")
        todos = start_example("todos.py", "--url", broker.url, "--db", str(tmp_path / "todos.sqlite3"),
                              "--ca-file", str(broker.ca_file), "--cert-file", todos_cert, "--key-file", todos_key,
                              log=tmp_path / "todos.log")
        try:
            wait_for(lambda: (broker.get("/config.json") or {"clients": []})["clients"] and
                     any(c["role"] == "todos" and c["instances"] for c in broker.get("/config.json")["clients"]),
                     what="todos to register over wss://")
            web_cert, web_key = role_cert(ca, tmp_path, "web", "web")
            monkeypatch.setenv("EXOCOM_TLS_CA", str(broker.ca_file))
            monkeypatch.setenv("EXOCOM_TLS_CLIENT_CERT", web_cert)
            monkeypatch.setenv("EXOCOM_TLS_CLIENT_KEY", web_key)
            result = run_web(broker.url, "list")
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout) == []
        finally:
            todos.terminate()
            todos.wait(timeout=10)


async def test_a_client_that_never_finishes_the_handshake_is_closed(tmp_path, ca, monkeypatch):
    monkeypatch.setattr(tls_module, "HANDSHAKE_TIMEOUT", 0.5)
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    tls = TLS(TLSFiles(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")))
    server = Server(Broker(parse_service_data({"web": {}}, "test")), None, handle_signals=False, tls=tls)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, "127.0.0.1", 0)
        stalled = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stalled.send_all(b"\x16\x03\x01")  # the start of a ClientHello, and then nothing
        with trio.fail_after(3):
            assert await stalled.receive_some(100) == b""  # closed by the broker
        assert tls.handshake_failures == 1
        nursery.cancel_scope.cancel()


def test_a_certificate_grants_roles_only_by_uri_san():
    assert cert_roles({"subject": ((("commonName", "todos"),),),
                       "subjectAltName": (("URI", "exocom:role:todos"), ("URI", "exocom:role:web"),
                                          ("URI", "exocom:role:"), ("URI", "https://todos"),
                                          ("DNS", "exocom:role:security"))}) == {"todos", "web"}
    assert cert_roles({"subject": ((("commonName", "todos"),),)}) == frozenset()  # not the CN
    assert cert_roles(None) == frozenset()


def test_core_refuses_a_role_the_certificate_does_not_name():
    h = Harness({"web": {"sends": ["x"]}, "todos": {"receives": ["x"]}})
    conn = 1
    h.run(h.broker.connected(conn, "peer", h.now, cert_roles=frozenset({"todos"})))
    h.register(conn, "web")
    assert h.closed[conn][0] == 4007
    h.run(h.broker.connected(2, "peer", h.now, cert_roles=frozenset({"todos"})))
    h.register(2, "todos")
    assert 2 not in h.closed
    h.run(h.broker.connected(3, "peer", h.now))  # no client certificates: as before
    h.register(3, "web")
    assert 3 not in h.closed
    assert h.broker.stats.registrations_refused[4007] == 1
