"""Every `exocom deployments` subcommand and argument has its own help and a
clear error; so does `POST /deployments/ROLE@VERSION/retry`."""

from __future__ import annotations

import json

import pytest

from exocom.core.config import parse_deployment
from test_deployments_cli import config, exocom  # noqa: F401 (config is a fixture)
from test_http import exchange
from wire import running_broker


def test_retry_has_its_own_help():
    result = exocom("retry", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: exocom deployments retry")
    assert "ROLE@VERSION" in result.stdout and "Re-arm the failed step" in result.stdout and "--url" in result.stdout


def test_list_has_its_own_help():
    result = exocom("list", "--help")
    assert result.stdout.startswith("usage: exocom deployments list")
    assert "ROLE[@VERSION]" in result.stdout and "--url" in result.stdout and "running broker" in result.stdout


@pytest.mark.parametrize("target, problem", [
    ("zzz", "'zzz' does not name a deployment: give ROLE@VERSION, e.g. todo-search@0.0.1"),
    ("zzz@", "'' is not a semantic version"),
    ("@1.0.0", "'@1.0.0' does not name a deployment"),
    ("a@1.0.0@2", "'a@1.0.0@2' does not name a deployment"),
])
def test_retry_refuses_a_malformed_deployment_before_asking_anyone(target, problem):
    result = exocom("retry", target, "--url", "http://127.0.0.1:9")
    assert result.returncode == 2 and result.stdout == ""
    assert f"exocom deployments retry: error: argument ROLE@VERSION: " in result.stderr and problem in result.stderr


def test_list_shows_only_the_deployment_it_is_given(tmp_path, config):  # noqa: F811
    shown = exocom("list", "todos@2.0.0", "--json", "--state-dir", str(tmp_path), "--config", str(config))
    assert shown.returncode == 0
    assert [(d["role"], d["version"]) for d in json.loads(shown.stdout)["deployments"]] == [("todos", "2.0.0")]
    other = exocom("list", "foo@1.0.0", "--state-dir", str(tmp_path), "--config", str(config))
    assert other.returncode == 1 and other.stdout == ""
    assert "no deployment of foo@1.0.0 is configured; configured: todos@2.0.0" in other.stderr


def test_options_before_and_after_the_subcommand_both_count(tmp_path, config):  # noqa: F811
    before = exocom("--config", str(config), "--state-dir", str(tmp_path), "--json", "list")
    after = exocom("list", "--config", str(config), "--state-dir", str(tmp_path), "--json")
    assert before.returncode == after.returncode == 0 and before.stdout == after.stdout
    assert "todos" in before.stdout


ROUTES = {"web": {"sends": ["ping"]}, "users": {"receives": ["ping"]}}


@pytest.mark.parametrize("target", ["zzz", "zzz@", "zzz@1.0", "a@b@c"])
async def test_the_retry_endpoint_answers_400_to_a_malformed_deployment(target):
    async with running_broker(ROUTES) as broker:
        answer = await exchange(broker.port, f"POST /deployments/{target}/retry HTTP/1.1\r\nHost: x\r\n"
                                             "Content-Length: 0\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    with pytest.raises(ValueError) as expected:
        parse_deployment(target)
    assert json.loads(body) == {"error": str(expected.value)}
    assert "ROLE@VERSION" in str(expected.value) or "semantic version" in str(expected.value)


async def test_the_retry_endpoint_still_answers_404_for_a_well_formed_unknown_deployment():
    async with running_broker(ROUTES) as broker:
        answer = await exchange(broker.port, b"POST /deployments/zzz@1.0.0/retry HTTP/1.1\r\nHost: x\r\n"
                                             b"Content-Length: 0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 ") and b"no deployment of zzz@1.0.0 is configured" in answer
