"""Every port exocom is given, by flag or environment, is 0-65535: the OS
would silently take 99999 as 99999 - 65536 and listen where nobody looks."""

from __future__ import annotations

import pytest

from test_cli import environment, free_port, one_line, run_exocom


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "4100x"])
async def test_a_port_flag_out_of_range_is_a_usage_error(tmp_path, port):
    code, out, err = await run_exocom(tmp_path, "--host", "127.0.0.1", "--port", port, env=environment())
    assert code == 2, out + err
    assert out == "", "nothing listened"
    assert f"argument --port: {port!r} is not a port number (0-65535)" in err


@pytest.mark.parametrize("variable", ["EXOCOM_PORT", "PORT"])
@pytest.mark.parametrize("port", ["99999", "-1"])
async def test_a_port_variable_out_of_range_stops_the_start(tmp_path, variable, port):
    code, out, err = await run_exocom(tmp_path, "--host", "127.0.0.1", env=environment(**{variable: port}))
    assert code == 2
    line = one_line(out, err)
    assert "exocom cannot start" in line and f"{variable}={port!r} is not a port number (0-65535)" in line


async def test_port_65535_is_a_port(tmp_path):
    # The boundary is accepted: it fails (or not) at listening, not at parsing.
    code, out, err = await run_exocom(tmp_path, "--host", "127.0.0.1", "--port", "65535", "--config", "/nonexistent",
                                      env=environment())
    assert code == 2 and "not a port number" not in out + err and "cannot read" in out + err
