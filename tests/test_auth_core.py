"""Per-role tokens in the core (issue 10): who may register as a role with a credential."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exocom.core.actions import CLOSE_THROTTLED, CLOSE_UNAUTHORIZED
from exocom.core.config import ConfigError, parse_service_data

from core import Harness

TODOS_TOKEN = "todos-secret-1"
WEB_TOKEN = "web-secret-2"


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


ROUTES = {
    "web": {"sends": ["todo.create"], "receives": ["todo.created"], "tokenSha256": sha(WEB_TOKEN)},
    "todos": {"receives": ["todo.create"], "sends": ["todo.created"], "tokenSha256": sha(TODOS_TOKEN)},
    "legacy": {"receives": ["todo.created"]},  # open: no credential
}


class Auth(Harness):
    def __init__(self, routes=ROUTES, **options):
        super().__init__(routes, **options)
        self.port = 40000

    def join(self, role: str, *, token=None, bearer=None, host: str = "10.0.0.1", payload=None, version=None) -> int:
        conn = next(self._ids)
        self.port += 1
        self.run(self.broker.connected(conn, f"{host}:{self.port}", self.now, bearer=bearer))
        payload = dict(payload or {})
        if token is not None:
            payload["token"] = token
        if version is not None:
            payload["version"] = version
        self.register(conn, role, payload=payload or None)
        return conn

    def registered(self, conn: int) -> bool:
        return conn in self.broker.registry.by_conn

    def refusals(self) -> list[dict]:
        return [log.fields for log in self.logs if log.event == "registration refused"]


def test_the_right_token_in_the_payload_or_as_bearer_registers():
    h = Auth()
    assert h.registered(h.join("todos", token=TODOS_TOKEN, version="1.0.0"))
    assert h.registered(h.join("web", bearer=WEB_TOKEN))
    assert h.broker.stats.registrations_refused == {}


def test_a_missing_or_wrong_token_closes_with_4006_and_says_so_without_the_token():
    h = Auth()
    missing = h.join("todos")
    wrong = h.join("todos", token="guess")
    wrong_bearer = h.join("todos", bearer="guess")
    for conn in (missing, wrong, wrong_bearer):
        assert not h.registered(conn)
        assert h.closed[conn][0] == CLOSE_UNAUTHORIZED
    assert "needs a token" in h.closed[missing][1] and "Authorization: Bearer" in h.closed[missing][1]
    assert h.closed[wrong][1] == "role 'todos': wrong token"
    refusals = h.refusals()
    assert [r["code"] for r in refusals] == [CLOSE_UNAUTHORIZED] * 3
    assert all(r["role"] == "todos" and r["peer"].startswith("10.0.0.1:") for r in refusals)
    assert "guess" not in repr(h.logs) + repr(h.closed)
    assert h.broker.stats.registrations_refused[CLOSE_UNAUTHORIZED] == 3


def test_the_payload_token_is_the_one_judged_when_both_come():
    h = Auth()
    assert not h.registered(h.join("todos", token="wrong", bearer=TODOS_TOKEN))
    assert h.registered(h.join("todos", token=TODOS_TOKEN, bearer="wrong"))


def test_a_token_replayed_on_another_role_is_refused():
    h = Auth()
    conn = h.join("todos", token=WEB_TOKEN)
    assert h.closed[conn][0] == CLOSE_UNAUTHORIZED


def test_an_open_role_registers_with_no_token_and_ignores_one():
    h = Auth()
    assert h.registered(h.join("legacy"))
    assert h.registered(h.join("legacy", token=12))
    assert h.registered(h.join("legacy", bearer="anything"))


@pytest.mark.parametrize("token", [None, 1, 1.5, True, [], {}, [TODOS_TOKEN], {"t": TODOS_TOKEN}, "",
                                   TODOS_TOKEN + "x" * 5000, "x" * 100_000])
def test_a_token_of_another_type_or_size_is_refused(token):
    h = Auth()
    conn = h.join("todos", payload={"token": token})
    assert h.closed[conn][0] == CLOSE_UNAUTHORIZED


@settings(max_examples=200, deadline=None)
@given(token=st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                          max_leaves=8),
       payload_extra=st.dictionaries(st.sampled_from(["version", "x", "token"]), st.text(max_size=5), max_size=2))
def test_any_registration_frame_with_a_token_is_refused_cleanly_unless_the_token_is_right(token, payload_extra):
    h = Auth()
    conn = next(h._ids)
    h.run(h.broker.connected(conn, "10.0.0.9:1", h.now))
    payload = {**payload_extra, "token": token}
    h.frame(conn, json.dumps({"name": "exocom.register-service", "sender": "todos", "payload": payload}))
    if token == TODOS_TOKEN:
        assert h.registered(conn) or h.closed[conn][0] != CLOSE_UNAUTHORIZED  # a bad version may still refuse it
    else:
        assert not h.registered(conn)
        assert h.closed[conn][0] == CLOSE_UNAUTHORIZED
        assert not h.broker.pending and not h.broker.registrations.bearers


def test_repeated_failures_from_one_host_are_refused_at_once_for_a_while():
    h = Auth()
    for _ in range(5):
        h.join("todos", token="guess", host="10.6.6.6")
    throttled = [log for log in h.logs if log.event == "registrations throttled"]
    assert len(throttled) == 1 and throttled[0].fields["host"] == "10.6.6.6"
    # Even the right token waits out the block; another host does not.
    blocked = [h.join("todos", token=TODOS_TOKEN, host="10.6.6.6") for _ in range(3)]
    assert all(h.closed[c][0] == CLOSE_THROTTLED for c in blocked)
    assert "try again in 30s" in h.closed[blocked[0]][1]
    assert len(h.refusals()) == 5  # the blocked ones are counted, not logged
    assert h.broker.stats.registrations_refused[CLOSE_THROTTLED] == 3
    assert h.registered(h.join("todos", token=TODOS_TOKEN, host="10.7.7.7"))
    assert h.registered(h.join("legacy", host="10.6.6.6"))  # an open role is not guarded
    h.tick(31)
    assert h.registered(h.join("todos", token=TODOS_TOKEN, host="10.6.6.6"))


def test_failures_spread_wider_than_the_window_are_not_throttled():
    h = Auth()
    for _ in range(8):
        h.join("todos", token="guess", host="10.6.6.6")
        h.tick(20)
    assert CLOSE_THROTTLED not in h.broker.stats.registrations_refused


def test_the_throttle_remembers_a_bounded_number_of_hosts():
    h = Auth()
    throttle = h.broker.registrations.throttle
    throttle.max_hosts = 50
    for i in range(500):
        h.join("todos", token="guess", host=f"10.1.{i // 250}.{i % 250}")
    assert len(throttle.recent) <= 50


def test_a_reload_applies_new_credentials_to_new_registrations():
    h = Auth()
    routes = {**ROUTES, "legacy": {**ROUTES["legacy"], "tokenSha256": sha("legacy-token")},
              "todos": {k: v for k, v in ROUTES["todos"].items() if k != "tokenSha256"}}
    h.run(h.broker.reconfigure(parse_service_data(routes, "test"), h.now))
    assert h.closed[h.join("legacy")][0] == CLOSE_UNAUTHORIZED
    assert h.registered(h.join("legacy", token="legacy-token"))
    assert h.registered(h.join("todos"))


def test_an_unresolved_reference_refuses_every_token():
    """The core never reads files: a tokenFile the shell did not resolve keeps the role closed, not open."""
    h = Auth({"todos": {"tokenFile": "todos.token"}})
    assert h.config.open_roles == []
    assert h.closed[h.join("todos", token="anything")][0] == CLOSE_UNAUTHORIZED


@pytest.mark.parametrize("entry, error", [
    ({"tokenSha256": "abc"}, "64 hex digits"),
    ({"tokenFile": ""}, "must be a file path"),
    ({"tokenEnv": 3}, "environment variable name"),
    ({"tokenFile": "a", "tokenEnv": "B"}, "give one of"),
])
def test_credential_keys_are_checked(entry, error):
    with pytest.raises(ConfigError, match=error):
        parse_service_data({"todos": entry}, "test")


def test_config_json_says_how_a_role_authenticates_never_the_digest():
    h = Auth()
    routes = h.broker.config_json()["routes"]
    assert routes["todos"]["credential"] == "tokenSha256" and "credential" not in routes["legacy"]
    assert sha(TODOS_TOKEN) not in json.dumps(h.broker.config_json())
