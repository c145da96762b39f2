"""Run the real `profiling-agent` command, as a user would, for the privileged tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

AGENT = [sys.executable, "-m", "agent"]
REPO = Path(__file__).resolve().parent.parent.parent


def start_agent(output_dir: Path | None, *args: str, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """`profiling-agent run` in the background; `output_dir` None leaves the directory to the config."""
    assert log_path is not None or output_dir is not None
    log = open(log_path or output_dir.parent / "agent.log", "wb")  # type: ignore[union-attr]  # noqa: SIM115
    directory = ["--output-dir", str(output_dir)] if output_dir is not None else []
    return subprocess.Popen(
        [*AGENT, "run", *directory, *args],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for_log(log_path: Path, text: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    """Block until the agent's log contains `text` (e.g. 'profiling started')."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log_path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"agent exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.1)
    raise AssertionError(f"agent did not log {text!r} within {timeout} s:\n{log_path.read_text(errors='replace')}")
