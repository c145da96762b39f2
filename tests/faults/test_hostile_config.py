"""Hostile or broken config (#16), through the real command line with a hard time bound: each is
refused with exit 2 and one line that says why, in well under a second of the agent's own work (the
bound below leaves a loaded host its margin; the alias bomb took over 60 s and 2.6 GB before)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.config import billion_laughs

BOUND_S = 10.0  # the interpreter's start-up included; the refusal itself is milliseconds


def _config_command(path: Path) -> tuple[int, str, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "agent", "config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, result.stderr, time.monotonic() - started


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("bomb.yaml", billion_laughs(9).encode(), "expands to more than 100,000 values (through YAML aliases)"),
        ("big.yaml", b"# padding\n" * 120_000, "is larger than 1,048,576 bytes"),
        ("binary.yaml", b"\x7fELF\x02\x01\x01\x00" + bytes(64), "is a binary file, not YAML text"),
        ("loop.yaml", b"profiling: &p\n  pids: [*p]\n", "refers to itself (a recursive YAML alias)"),
    ],
)
def test_a_hostile_config_is_refused_at_once(tmp_path: Path, name: str, content: bytes, says: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    code, stderr, took = _config_command(path)
    assert code == 2, stderr
    assert stderr == f"profiling-agent: configuration error: config file {path} {says}\n"
    assert took < BOUND_S, took


def test_a_directory_as_config_is_named(tmp_path: Path) -> None:
    code, stderr, _ = _config_command(tmp_path)
    assert code == 2 and stderr == f"profiling-agent: configuration error: config file {tmp_path} is a directory\n"
