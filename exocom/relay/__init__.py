"""The Python Exorelay: a trio client for services and deployment scripts.

    from exocom.relay import open_relay, DeploymentScript

See `exocom.relay.client` for the whole story.
"""

from .client import (
    ConnectionLost,
    DeploymentScript,
    Message,
    RegistrationRefused,
    Relay,
    RelayClosed,
    RelayError,
    RequestTimeout,
    open_relay,
)
from .tls import client_context, context_from

__all__ = [
    "ConnectionLost",
    "DeploymentScript",
    "Message",
    "RegistrationRefused",
    "Relay",
    "RelayClosed",
    "RelayError",
    "RequestTimeout",
    "client_context",
    "context_from",
    "open_relay",
]
