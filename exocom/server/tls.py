"""TLS on the broker's port: `wss://` and `https://` (`--tls-cert`, `--tls-key`),
optionally with client certificates (`--tls-client-ca`) that name the roles
their holder may register as.

A client certificate grants roles only through URI subject alternative
names `exocom:role:<name>` (one per role). Nothing else grants a role, not
the subject's CN: an organisation's CA signs certificates whose CN is a host
or a person, and such a certificate must not become a role by coincidence of
names. A certificate without such a SAN passes the handshake and may
register as no role (4007).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

ROLE_URI_PREFIX = "exocom:role:"
# A client that connects and never finishes the handshake holds one task and
# one file descriptor for at most this long.
HANDSHAKE_TIMEOUT = 10.0
# `tls handshake failed` events: at most this many per window, then one
# event says how many were left out (a scanner must not flood the log).
FAILURE_LOGS_PER_WINDOW = 10
FAILURE_LOG_WINDOW = 10.0
# The first byte of every TLS handshake record: what a plaintext port sees
# from a TLS client, and what a TLS port misses from a plaintext one.
TLS_HANDSHAKE_BYTE = 0x16


class TLSError(Exception):
    """A certificate, key or CA file that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class TLSFiles:
    cert: str
    key: str
    client_ca: str | None = None

    def context(self) -> ssl.SSLContext:
        """A server context from the files as they are now (blocking file I/O)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except FileNotFoundError as e:
            raise TLSError(f"cannot read the certificate or key: {e.filename or e}: no such file") from None
        except (ssl.SSLError, OSError) as e:
            raise TLSError(f"cannot use --tls-cert {self.cert} with --tls-key {self.key}: {e} (both PEM; the key "
                           "must be the certificate's, unencrypted)") from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (ssl.SSLError, OSError) as e:
                raise TLSError(f"cannot use --tls-client-ca {self.client_ca}: {e} (one or more PEM CA "
                               "certificates)") from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context


class TLS:
    """The running broker's TLS: the context new connections use, replaced
    on SIGHUP (`reloading.reload`); connections already open keep theirs."""

    def __init__(self, files: TLSFiles, context: ssl.SSLContext | None = None):
        self.files = files
        self.context = context or files.context()
        self.handshake_failures = 0
        self._window_start = 0.0
        self._logged_in_window = 0
        self._suppressed = 0

    @property
    def client_certificates(self) -> bool:
        return self.files.client_ca is not None

    def failure_to_log(self, now: float) -> int | None:
        """Count a failed handshake: None if its event is left out (rate
        limit), else how many were left out before it."""
        self.handshake_failures += 1
        if now - self._window_start >= FAILURE_LOG_WINDOW:
            self._window_start, self._logged_in_window = now, 0
        if self._logged_in_window >= FAILURE_LOGS_PER_WINDOW:
            self._suppressed += 1
            return None
        self._logged_in_window += 1
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed


def cert_roles(peercert: dict | None) -> frozenset[str]:
    """The roles a verified client certificate (`SSLObject.getpeercert()`) may register as."""
    if not peercert:
        return frozenset()
    return frozenset(value[len(ROLE_URI_PREFIX):] for kind, value in peercert.get("subjectAltName", ())
                     if kind == "URI" and value.startswith(ROLE_URI_PREFIX) and len(value) > len(ROLE_URI_PREFIX))


def describe(error: BaseException) -> str:
    """A short reason for a failed handshake, from trio's BrokenResourceError (the ssl error is its cause)."""
    cause = error.__cause__ or error.__context__ or error
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or str(cause)
        hints = {"HTTP_REQUEST": "a plaintext HTTP request: use https://",
                 "WRONG_VERSION_NUMBER": "not TLS (plaintext?): use https:// or wss://",
                 "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate (--tls-client-ca requires one)",
                 "CERTIFICATE_VERIFY_FAILED": "the client certificate is not signed by --tls-client-ca",
                 "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust this broker's certificate",
                 "SSLV3_ALERT_BAD_CERTIFICATE": "the client rejected this broker's certificate",
                 "UNSUPPORTED_PROTOCOL": "the client's TLS version is below 1.2"}
        return hints.get(reason, reason.lower().replace("_", " "))
    if isinstance(cause, (ConnectionError, EOFError)) or not str(cause):
        return "the client closed the connection during the handshake"
    return str(cause)
