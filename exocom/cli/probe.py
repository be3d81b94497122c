"""The container's health check: `python -m exocom.cli.probe [/readyz]`.

Asks the broker of this container (127.0.0.1, the port `exocom serve` finds:
EXOCOM_PORT, else PORT, else 4100) for a path; exit 0 on 200, else 1. With
EXOCOM_TLS_CERT set (TLS on, as `exocom serve` reads it) it speaks https://,
verifying the broker against EXOCOM_TLS_CA when given and presenting
EXOCOM_TLS_CLIENT_CERT/EXOCOM_TLS_CLIENT_KEY when the broker requires client
certificates. The host name is not checked: the probe talks to its own
container over loopback, which the certificate does not name. Ignores any
HTTP proxy of the environment (no curl in the slim image).
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request
from typing import Mapping

from ..relay.tls import ENV_CA, ENV_CERT, ENV_KEY


def probe(path: str, environ: Mapping[str, str], timeout: float = 3.0) -> int:
    port = environ.get("EXOCOM_PORT") or environ.get("PORT") or "4100"
    handlers: list = [urllib.request.ProxyHandler({})]
    scheme = "http"
    if environ.get("EXOCOM_TLS_CERT"):
        scheme = "https"
        context = ssl.create_default_context(cafile=environ.get(ENV_CA))
        context.check_hostname = False
        if not environ.get(ENV_CA):
            context.verify_mode = ssl.CERT_NONE  # its own process over loopback: nobody to impersonate it
        if environ.get(ENV_CERT):
            context.load_cert_chain(environ[ENV_CERT], environ.get(ENV_KEY))
        handlers.append(urllib.request.HTTPSHandler(context=context))
    url = f"{scheme}://127.0.0.1:{port}{path}"
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=timeout) as response:
            return 0 if response.status == 200 else 1
    except OSError as e:
        print(f"exocom probe {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(probe(sys.argv[1] if len(sys.argv) > 1 else "/readyz", os.environ))
