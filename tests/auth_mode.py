"""EXOCOM_TEST_REQUIRE_AUTH=1: run the end-to-end tests with a credential on
every role (issue 10's "done when").

Every broker the tests start (tests/processes.py BrokerProcess, tests/wire.py
running_broker) then gets a `tokenSha256` on each role of its routing and
`--require-auth` (a subprocess); every client presents the token: the relay
and the example services through $EXOCOM_TOKEN (set by conftest.py for this
process and the processes it starts), tests/wire.py and tests/raw_ws.py as
`Authorization: Bearer` on the upgrade. One token serves every role here;
tests/test_auth_*.py cover distinct tokens, wrong and replayed ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

ON = os.environ.get("EXOCOM_TEST_REQUIRE_AUTH") == "1"
TOKEN = "exocom-test-token"
DIGEST = hashlib.sha256(TOKEN.encode()).hexdigest()
HEADERS = [(b"authorization", b"Bearer " + TOKEN.encode())] if ON else []


def with_tokens(routes: Any) -> Any:
    """`routes` with a credential on every role that has none (anything else unchanged: a test of a bad file)."""
    if not ON or not isinstance(routes, dict):
        return routes
    out = {}
    for role, entry in routes.items():
        if entry is None:
            entry = {}
        if isinstance(entry, dict) and not {"tokenFile", "tokenEnv", "tokenSha256"} & entry.keys():
            entry = {**entry, "tokenSha256": DIGEST}
        out[role] = entry
    return out


def text_with_tokens(text: str) -> str:
    if not ON:
        return text
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return json.dumps(with_tokens(data)) if isinstance(data, dict) else text


def rewrite_file(path: Path) -> None:
    if ON and path.exists():
        path.write_text(text_with_tokens(path.read_text()))
