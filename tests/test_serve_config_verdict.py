"""`exocom serve` and `exocom check-config` give one verdict on a routing
file, in the same words: the same validator (exocom/check.py) runs in both."""

from __future__ import annotations

import json

import pytest
import trio

from test_cli import EXOCOM, environment, exocom_serve, free_port, one_line, run_exocom

TYPO = "web:\n  sends: [a]\n  receives: [a]\nusers:\n  recieves: [a]\n"
BAD_YAML = "web:\n  sends: [a\n  receives: b\n"
TWO_ERRORS = "web:\n  sends: [a]\n  receives: [a]\n  colour: red\nusers:\n  recieves: [a]\n"
WARNING_ONLY = "web:\n  sends: [a]\nusers:\n  receives: [a, a]\n"


async def check_config(path) -> tuple[int, list[str]]:
    result = await trio.run_process([*EXOCOM, "check-config", str(path)], capture_stdout=True, check=False)
    *problems, _summary = result.stdout.decode().splitlines()
    return result.returncode, problems


@pytest.mark.parametrize("text", [TYPO, BAD_YAML], ids=["misspelled key", "invalid YAML"])
async def test_a_file_check_config_rejects_stops_serve_with_the_same_line(tmp_path, text):
    path = tmp_path / "routes.yml"
    path.write_text(text)
    code, [problem] = await check_config(path)
    assert code == 1

    code, out, err = await run_exocom(tmp_path, "--port", str(free_port()), "--config", str(path), env=environment())
    assert code == 2
    record = json.loads(one_line(out, err))
    assert record["event"] == "exocom cannot start"
    assert record["error"] == f"invalid configuration: {problem}"
    assert "\n" not in record["error"] and f"{path}:" in record["error"]


async def test_the_misspelled_key_says_what_was_meant_and_where(tmp_path):
    path = tmp_path / "routes.yml"
    path.write_text(TYPO)
    _, out, err = await run_exocom(tmp_path, "--port", str(free_port()), "--config", str(path), env=environment())
    error = json.loads(one_line(out, err))["error"]
    assert f"{path}:5: error: role 'users', key 'recieves': unknown key 'recieves' (did you mean 'receives'?)" in error


async def test_every_error_is_listed_and_the_message_points_to_check_config(tmp_path):
    path = tmp_path / "routes.yml"
    path.write_text(TWO_ERRORS)
    _, problems = await check_config(path)
    _, out, err = await run_exocom(tmp_path, "--port", str(free_port()), "--config", str(path), env=environment())
    record = json.loads(one_line(out, err))
    assert record["problems"] == problems and len(problems) == 2
    assert record["error"].startswith(f"invalid configuration: {problems[0]} (and 1 more error: "
                                      f"`exocom check-config {path}`")


async def test_warnings_of_check_config_are_the_warnings_of_serve(tmp_path):
    path = tmp_path / "routes.yml"
    path.write_text(WARNING_ONLY)
    code, problems = await check_config(path)
    assert code == 0 and len(problems) == 1 and ": warning: " in problems[0]
    async with exocom_serve(tmp_path, "--host", "127.0.0.1", "--port", "0", "--config", str(path),
                            env=environment()) as exocom:
        await exocom.wait_for("broker listening")
        warnings = [r["problem"] for r in exocom.records() if r["event"] == "configuration warning"]
        assert warnings == problems


async def test_service_data_keeps_the_go_brokers_tolerance_with_the_checks_words(tmp_path):
    # Exosphere writes each service's free-form dependency-data into SERVICE_DATA;
    # the Go broker started with keys it did not know: so does this one, and says what it ignored.
    routes = {"web": {"sends": ["a"], "dependencies": ["mongo"]}, "users": {"recieves": ["a"]}}
    env = environment(SERVICE_DATA=json.dumps(routes))
    async with exocom_serve(tmp_path, "--host", "127.0.0.1", "--port", "0", env=env) as exocom:
        await exocom.wait_for("broker listening")
        warnings = [r["problem"] for r in exocom.records() if r["event"] == "configuration warning"]
    assert "SERVICE_DATA: warning: role 'users', key 'recieves': unknown key 'recieves' (did you mean " \
           "'receives'?); known keys: deploys, receives, rollout, sends, stepTimeout, tokenEnv, tokenFile, tokenSha256, " \
           "translations, versions" in warnings
    assert any("role 'web', key 'dependencies': unknown key 'dependencies'" in w for w in warnings)
    assert any("sends 'a', which no role receives" in w for w in warnings)
