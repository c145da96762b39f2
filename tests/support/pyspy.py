"""py-spy, the independent reference for the Python-frame tests: it samples the same process at the same
time as the agent, and its stacks are parsed into (function, file, line) frames.

py-spy is installed into .venv by `make setup` (the `dev` extra). It runs in its default, blocking mode:
for each sample it pauses the target, reads the frame chain and resumes it, so each stack is consistent
(the thread cannot move on mid-read). `--nonblocking` reads a running process: cheaper for the target,
but a stack can be torn (frames of two moments, a code object half updated) and its line numbers off,
which is no reference to hold the agent to. The pauses do not bias the comparison: the agent samples
CPU time, which a stopped process does not accrue, and py-spy samples wall time only while the thread is
active (idle threads are left out without `--idle`), the same instants of running code either way.

`--format raw` writes collapsed stacks, one line each: `root;...;leaf COUNT`, each frame
`name (file:line)`; `--full-filenames` keeps co_filename whole. The name is co_qualname on 3.11+
(`Mixer.churn`) and co_name before (`churn`).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PY_SPY = Path(sys.executable).parent / "py-spy"
ATTACH_TIMEOUT_S = 60.0
# What py-spy prints on stderr once it has attached and sampling begins.
SAMPLING_BANNER = "Sampling process"
_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>.*):(?P<line>\d+)\)$")


@dataclass(frozen=True, slots=True)
class SpyFrame:
    name: str
    filename: str
    line: int


@dataclass(frozen=True, slots=True)
class SpyStack:
    frames: tuple[SpyFrame, ...]  # leaf first, as the agent's samples are
    count: int


def parse_raw(text: str) -> list[SpyStack]:
    """py-spy's collapsed output. A frame without `(file:line)` (py-spy writes some that way when it
    cannot read the line) keeps its name with an empty file and line 0."""
    stacks = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        folded, _, count = raw.rpartition(" ")
        frames = []
        for part in reversed(folded.split(";")):
            match = _FRAME.match(part)
            if match is None:
                frames.append(SpyFrame(part, "", 0))
            else:
                frames.append(SpyFrame(match["name"], match["file"], int(match["line"])))
        stacks.append(SpyStack(tuple(frames), int(count)))
    return stacks


class PySpyRecord:
    """`py-spy record --pid PID --rate RATE --format raw` until the process exits (or `duration_s`)."""

    def __init__(self, pid: int, rate: int, output: Path, duration_s: float | None = None) -> None:
        self.output = output
        self.log = output.with_suffix(".log")
        duration = ["--duration", str(round(duration_s))] if duration_s is not None else []
        argv = [str(PY_SPY), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--full-filenames"]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([*argv, *duration, "--output", str(output)], stdout=log, stderr=log)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_sampling(self, timeout: float = ATTACH_TIMEOUT_S) -> None:
        """Block until py-spy has attached and started sampling."""
        deadline = time.monotonic() + timeout
        while SAMPLING_BANNER not in self.log_text():
            if self.proc.poll() is not None:
                raise AssertionError(f"py-spy exited with {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"py-spy did not start sampling within {timeout} s:\n{self.log_text()}")
            time.sleep(0.05)

    def stacks(self, timeout: float = 60.0) -> list[SpyStack]:
        """Wait for py-spy to finish (the process exited, or the duration passed) and read its stacks."""
        self.proc.wait(timeout=timeout)
        assert self.proc.returncode == 0, self.log_text()
        return parse_raw(self.output.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def errors(self) -> int:
        """The sampling errors py-spy reported (`Samples: N Errors: M`)."""
        match = re.search(r"Errors: (\d+)", self.log_text())
        return int(match[1]) if match else 0

    def error_share(self) -> float:
        """Sampling errors per sample taken: py-spy reads a running process without pausing it, so a read
        can meet a frame being changed (1 of 16,948 on a busy host); those samples are left out."""
        match = re.search(r"Samples: (\d+)", self.log_text())
        taken = int(match[1]) if match else 0
        return self.errors() / taken if taken else float(self.errors() > 0)


def total(stacks: list[SpyStack]) -> int:
    return sum(stack.count for stack in stacks)


def inclusive(stacks: list[SpyStack], name: str, filename: str) -> int:
    """Samples with a frame of the function `name` in `filename` anywhere on the stack."""
    return sum(s.count for s in stacks if any(f.name == name and f.filename == filename for f in s.frames))


def hottest_line(stacks: list[SpyStack], name: str, filename: str) -> tuple[int, dict[int, int]]:
    """The line the innermost frame of the function was at most often, and the count per line."""
    lines: dict[int, int] = {}
    for stack in stacks:
        frame = next((f for f in stack.frames if f.name == name and f.filename == filename), None)
        if frame is not None:
            lines[frame.line] = lines.get(frame.line, 0) + stack.count
    return max(lines, key=lambda line: lines[line], default=0), lines
