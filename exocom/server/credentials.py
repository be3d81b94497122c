"""Per-role tokens given by reference (`tokenFile`, `tokenEnv`): read when the
configuration is loaded (at startup and on every reload, so a rotated file
takes effect with `exocom reload`) and kept only as SHA-256 digests; the core
never sees a token of the configuration, and no error names one.

Also the operator token (`--admin-token-file`) and the comparison both use.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import replace
from pathlib import Path
from typing import Mapping

from ..core.config import Config, ConfigError, Credential


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def read_token_file(path: Path, what: str) -> str:
    """The token in `path` without its surrounding whitespace (`echo TOKEN > file` adds a newline)."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e.__class__.__name__
        raise ConfigError(f"{what}: cannot read the token file {str(path)!r} ({reason}): create it, or fix the path")
    if not token:
        raise ConfigError(f"{what}: the token file {str(path)!r} is empty: write the token into it")
    return token


def _resolve_one(role: str, credential: Credential, environ: Mapping[str, str], base: Path) -> Credential:
    where = f"role {role!r}: key {credential.key!r}"
    if credential.key == "tokenFile":
        path = Path(credential.reference).expanduser()
        token = read_token_file(path if path.is_absolute() else base / path, where)
    elif credential.key == "tokenEnv":
        token = environ.get(credential.reference, "").strip()
        if not token:
            raise ConfigError(f"{where}: the environment variable {credential.reference} is not set or empty: "
                              "set it in the broker's environment (a reload cannot see a change of it)")
    else:
        return credential
    return replace(credential, sha256=digest(token))


def resolve(config: Config, environ: Mapping[str, str], base: Path) -> Config:
    """`config` with the digest of every role's token filled in; a relative
    `tokenFile` is read from `base` (the routing file's directory)."""
    roles = {name: role if role.credential is None else
             replace(role, credential=_resolve_one(name, role.credential, environ, base))
             for name, role in config.roles.items()}
    return replace(config, roles=roles)


def matches(token: str, expected: bytes) -> bool:
    """Constant time in the token's content: the digests compared have a fixed length."""
    return hmac.compare_digest(digest(token), expected)
