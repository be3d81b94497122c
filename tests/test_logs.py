"""Log lines stay readable and bounded whatever a client put in its frames."""

import io
import json

import orjson
import pytest
import structlog

from exocom import logs


@pytest.fixture
def stream():
    out = io.StringIO()
    yield out
    logs.configure("json", "debug")  # what conftest set up for the other tests


def deep(depth: int):
    return orjson.loads("[" * depth + "]" * depth)  # orjson reads deeper than it (or json) writes


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_deeply_nested_id_and_a_huge_name_still_make_one_bounded_line(stream, fmt):
    logs.configure(fmt, "debug", stream=stream)
    structlog.get_logger("exocom").warning("message refused", name="x" * 1_000_000, activity_id=deep(1000),
                                           missed={"todos": "no live version"})
    [line] = stream.getvalue().splitlines()
    assert len(line) < 2000
    assert "message refused" in line and "(+999500 chars)" in line
    if fmt == "json":
        record = json.loads(line)
        assert record["missed"] == {"todos": "no live version"}  # our own fields keep their shape
        assert record["activity_id"].startswith("[[[")
