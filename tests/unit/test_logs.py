"""Log set-up: text by default, one JSON object per line with --log-format json."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from agent import logs


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", "json")
    logging.getLogger("agent.test").info("profiled %d processes", 3)
    logging.getLogger("agent.test").debug("not at info level")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("agent.test").exception("stage failed")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "profiled 3 processes"
    assert (first["level"], first["logger"]) == ("info", "agent.test")
    assert first["time"].endswith("Z")
    assert second["level"] == "error" and "ValueError: boom" in second["exception"]


def test_text_format(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("warning", "text")
    logging.getLogger("agent.test").info("hidden")
    logging.getLogger("agent.test").warning("shown %s", "here")
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert "WARNING agent.test: shown here" in err
