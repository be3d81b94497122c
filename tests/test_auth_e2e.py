"""Who may connect, end to end (issue 10): a real `exocom serve` with per-role
tokens (tokenFile, tokenEnv, tokenSha256), --require-auth, and the operator
token on its HTTP endpoints (--admin-token-file, --protect-reads), with the
project's client and CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import trio

import auth_mode
from fleet import EXOCOM, FAST
from processes import ROOT, BrokerProcess, broker_with_config, free_port
from test_crash_restart import cli_env

from exocom.core.actions import CLOSE_UNAUTHORIZED
from exocom.relay import RegistrationRefused, open_relay

WEB_TOKEN, TODOS_TOKEN, ADMIN_TOKEN = "web-token-1", "todos-token-2", "admin-token-3"


def routes(tmp_path) -> dict:
    (tmp_path / "todos.token").write_text(TODOS_TOKEN + "\n")
    return {
        "web": {"sends": ["todos.list"], "receives": ["todos.listing"], "tokenEnv": "WEB_TOKEN"},
        "todos": {"receives": ["todos.list"], "sends": ["todos.listing"], "tokenFile": "todos.token"},
        "audit": {"receives": ["todos.list"], "tokenSha256": hashlib.sha256(b"audit-token").hexdigest()},
        "legacy": {"receives": ["todos.listing"]},
    }


@pytest.fixture(autouse=True)
def own_credentials(monkeypatch):
    """These tests set every token themselves, also under EXOCOM_TEST_REQUIRE_AUTH=1."""
    monkeypatch.setattr(auth_mode, "ON", False)
    monkeypatch.setattr(auth_mode, "HEADERS", [])
    monkeypatch.delenv("EXOCOM_TOKEN", raising=False)


@pytest.fixture
def broker(tmp_path):
    with broker_with_config(tmp_path, routes(tmp_path)) as process:
        process.env["WEB_TOKEN"] = WEB_TOKEN
        process.start()
        yield process


def events(broker: BrokerProcess, name: str) -> list[dict]:
    return [e for e in broker.events() if e["event"] == name]


async def refused(url: str, role: str, **options) -> RegistrationRefused:
    with pytest.raises(RegistrationRefused) as e:
        with trio.fail_after(10):
            async with open_relay(url, role, **options, **FAST):
                pass
    return e.value


async def test_tokens_by_file_env_and_hash_let_their_roles_in_and_nobody_else(broker):
    async with open_relay(broker.url, "web", token=WEB_TOKEN, **FAST) as web, \
            open_relay(broker.url, "todos", "1.0.0", token=TODOS_TOKEN, **FAST) as todos, \
            open_relay(broker.url, "audit", token="audit-token", **FAST), \
            open_relay(broker.url, "legacy", **FAST):
        todos.handler("todos.list")(lambda m: m.reply("todos.listing", {"ok": True}))
        answer = await web.request("todos.list", timeout=5)
        assert answer.payload == {"ok": True}
    missing = await refused(broker.url, "todos")
    wrong = await refused(broker.url, "todos", token="guess")
    replayed = await refused(broker.url, "web", token=TODOS_TOKEN)
    assert {missing.code, wrong.code, replayed.code} == {CLOSE_UNAUTHORIZED}
    assert "needs a token" in missing.reason and wrong.reason == "role 'todos': wrong token"
    refusals = events(broker, "registration refused")
    assert [(r["role"], r["code"]) for r in refusals] == [("todos", 4006), ("todos", 4006), ("web", 4006)]
    log = broker.log_path.read_text()
    for secret in (WEB_TOKEN, TODOS_TOKEN, "guess", "audit-token"):
        assert secret not in log
    listening = events(broker, "broker listening")[0]
    assert listening["open_roles"] == ["legacy"]
    assert 'exocom_registrations_refused_total{code="4006"} 3' in urllib.request.urlopen(
        broker.http + "/metrics", timeout=5).read().decode()
    config = broker.get("/config.json")
    assert config["routes"]["todos"]["credential"] == "tokenFile"
    assert TODOS_TOKEN not in json.dumps(config)


async def test_the_token_in_the_registration_payload_works_too(broker):
    from raw_ws import RawClient

    client = await RawClient.connect(broker.port)
    await client.send_json({"name": "exocom.register-service", "sender": "todos", "id": "1",
                            "payload": {"token": TODOS_TOKEN, "version": "1.0.0"}})
    await trio.to_thread.run_sync(broker.wait_registered, "todos")
    await client.aclose()
    client = await RawClient.connect(broker.port)
    await client.send_json({"name": "exocom.register-service", "sender": "todos", "id": "2",
                            "payload": {"token": {"nested": TODOS_TOKEN}}})
    assert await client.close_code() == CLOSE_UNAUTHORIZED


async def test_a_reload_rereads_the_token_file(broker, tmp_path):
    (tmp_path / "todos.token").write_text("rotated")
    assert broker.post("/reload") == 200
    await refused(broker.url, "todos", token=TODOS_TOKEN)
    async with open_relay(broker.url, "todos", token="rotated", **FAST):
        pass
    (tmp_path / "todos.token").unlink()
    request = urllib.request.Request(broker.http + "/reload", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 422
    error = json.loads(e.value.read())["error"]
    assert "role 'todos': key 'tokenFile': cannot read the token file" in error and "rotated" not in error
    async with open_relay(broker.url, "todos", token="rotated", **FAST):
        pass  # nothing changed


def serve(tmp_path, routes_: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    config = tmp_path / "refused.json"
    config.write_text(json.dumps(routes_))
    return subprocess.run([sys.executable, "-m", "exocom", "serve", "--config", str(config), "--port",
                           str(free_port()), "--state-dir", str(tmp_path / "refused-state"), "--log-format", "json",
                           *args], capture_output=True, text=True, timeout=30, cwd=ROOT,
                          env={**cli_env(), **(env or {})})


def test_require_auth_refuses_to_start_while_a_role_is_open(tmp_path):
    result = serve(tmp_path, routes(tmp_path), "--require-auth", env={"WEB_TOKEN": WEB_TOKEN})
    assert result.returncode == 2
    (line,) = [json.loads(line) for line in result.stdout.splitlines() if "exocom cannot start" in line]
    assert line["open_roles"] == ["legacy"] and "legacy has no credential" in line["error"]


def test_a_missing_token_file_or_variable_refuses_to_start_naming_role_and_key(tmp_path):
    result = serve(tmp_path, routes(tmp_path))  # WEB_TOKEN not set
    assert result.returncode == 2
    assert "role 'web': key 'tokenEnv': the environment variable WEB_TOKEN is not set" in result.stdout
    config = routes(tmp_path)
    (tmp_path / "todos.token").unlink()
    result = serve(tmp_path, config, env={"WEB_TOKEN": WEB_TOKEN})
    assert result.returncode == 2 and "role 'todos': key 'tokenFile': cannot read the token file" in result.stdout


def test_require_auth_starts_when_every_role_has_a_credential(tmp_path):
    with broker_with_config(tmp_path, {k: v for k, v in routes(tmp_path).items() if k != "legacy"},
                            "--require-auth") as broker:
        broker.env["WEB_TOKEN"] = WEB_TOKEN
        broker.start()
        assert events(broker, "broker listening")[0]["open_roles"] == []
        broker.config.write_text(json.dumps(routes(tmp_path)))  # legacy is open again
        status, _, body = request(broker, "POST", "/reload")
        assert status == 422 and "--require-auth: role legacy has no credential" in json.loads(body)["error"]
        assert events(broker, "configuration reload refused")


# ------------------------------------------------------------- operator endpoints

def request(broker: BrokerProcess, method: str, path: str, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    req = urllib.request.Request(broker.http + path, method=method, data=b"" if method == "POST" else None,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture
def guarded(tmp_path):
    (tmp_path / "admin.token").write_text(ADMIN_TOKEN + "\n")
    with broker_with_config(tmp_path, {"web": {"sends": ["x"]}, "todos": {"receives": ["x"]}},
                            "--admin-token-file", str(tmp_path / "admin.token")) as broker:
        broker.start()
        yield broker


@pytest.mark.parametrize("path", ["/reload", "/deployments/todos@2.0.0/retry", "/deployments/todos@2.0.0/rollout/pause",
                                  "/versions/todos@2.0.0/rollback"])
def test_every_post_needs_the_operator_token(guarded, path):
    status, headers, body = request(guarded, "POST", path)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert "operator token" in json.loads(body)["error"]
    assert request(guarded, "POST", path, "wrong")[0] == 403
    assert request(guarded, "POST", path, ADMIN_TOKEN)[0] not in (401, 403)
    assert ADMIN_TOKEN not in guarded.log_path.read_text()
    assert [e["status"] for e in events(guarded, "operator request refused")] == [401, 403]


def test_reads_stay_open_without_protect_reads(guarded):
    for path in ("/config.json", "/deployments", "/metrics", "/", "/healthz"):
        assert request(guarded, "GET", path)[0] == 200


def test_protect_reads_puts_config_deployments_and_metrics_behind_the_token(tmp_path):
    (tmp_path / "admin.token").write_text(ADMIN_TOKEN)
    with broker_with_config(tmp_path, {"web": {"sends": ["x"]}, "todos": {"receives": ["x"]}},
                            "--admin-token-file", str(tmp_path / "admin.token"), "--protect-reads") as broker:
        broker.start()
        for path in ("/config.json", "/deployments", "/metrics"):
            assert request(broker, "GET", path)[0] == 401
            assert request(broker, "GET", path, "wrong")[0] == 403
            assert request(broker, "GET", path, ADMIN_TOKEN)[0] == 200
        for path in ("/healthz", "/readyz", "/"):
            assert request(broker, "GET", path)[0] == 200
        assert b"#token=" in request(broker, "GET", "/")[2]
        metrics = request(broker, "GET", "/metrics", ADMIN_TOKEN)[2].decode()
        assert 'exocom_http_unauthorized_total{status="401"} 3' in metrics

        def cli(*args, env=None):
            return subprocess.run([*EXOCOM, *args, "--url", broker.http], capture_output=True, text=True, timeout=30,
                                  env={**cli_env(), **(env or {})})

        assert cli("status").returncode == 2
        assert "needs the broker's operator token" in cli("status").stderr
        assert cli("status", "--admin-token", ADMIN_TOKEN).returncode == 0
        assert cli("status", env={"EXOCOM_ADMIN_TOKEN": ADMIN_TOKEN}).returncode == 0
        assert cli("status", "--admin-token-file", str(tmp_path / "admin.token")).returncode == 0
        assert "refused the operator token" in cli("status", "--admin-token", "wrong").stderr
        assert cli("reload").returncode == 1
        assert cli("reload", "--admin-token", ADMIN_TOKEN).returncode == 0
        assert cli("deployments", "--admin-token", ADMIN_TOKEN, "--json").returncode == 0
        retry = cli("deployments", "retry", "todos@2.0.0")
        assert retry.returncode == 1 and "operator token" in retry.stderr
        retry = cli("deployments", "retry", "todos@2.0.0", "--admin-token", ADMIN_TOKEN)
        assert retry.returncode == 1 and "operator token" not in retry.stderr  # 404: no such deployment
        assert cli("rollback", "todos@2.0.0", "--admin-token", ADMIN_TOKEN).returncode != 2
        assert "operator token" in cli("rollback", "todos@2.0.0").stderr


def test_protect_reads_needs_an_admin_token_file(tmp_path):
    result = serve(tmp_path, {"web": {}}, "--protect-reads")
    assert result.returncode == 2 and "--protect-reads needs --admin-token-file" in result.stdout
