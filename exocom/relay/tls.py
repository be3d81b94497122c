"""TLS for relays and tools: the `ssl.SSLContext` a `wss://` connection uses.

    context = client_context(ca_file="ca.pem", cert_file="todos.pem", key_file="todos-key.pem")
    async with open_relay("wss://broker:4100/services", "todos", ssl_context=context) as relay: ...

The example services and `exocom probe` read the same files from flags or,
when no flag is given, from the environment:

    EXOCOM_TLS_CA           the CA that signed the broker's certificate (default: the system's CAs)
    EXOCOM_TLS_CLIENT_CERT  this service's client certificate (for a broker started with --tls-client-ca)
    EXOCOM_TLS_CLIENT_KEY   its private key
"""

from __future__ import annotations

import ssl
from typing import Mapping

ENV_CA, ENV_CERT, ENV_KEY = "EXOCOM_TLS_CA", "EXOCOM_TLS_CLIENT_CERT", "EXOCOM_TLS_CLIENT_KEY"


def client_context(ca_file: str | None = None, cert_file: str | None = None,
                   key_file: str | None = None) -> ssl.SSLContext:
    """Verifies the broker against `ca_file` (else the system's CAs) and presents `cert_file` if given."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context


def context_from(ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                 environ: Mapping[str, str] | None = None) -> ssl.SSLContext | None:
    """The context of flags, falling back on EXOCOM_TLS_* of `environ`; None when neither names a file
    (a wss:// URL then verifies against the system's CAs)."""
    env = environ or {}
    ca_file, cert_file, key_file = ca_file or env.get(ENV_CA), cert_file or env.get(ENV_CERT), key_file or env.get(ENV_KEY)
    if not (ca_file or cert_file):
        return None
    return client_context(ca_file, cert_file, key_file)
