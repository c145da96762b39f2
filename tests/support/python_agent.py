"""One agent for a whole module of Python-frame tests, and the Python workloads run under it.

A module starts `HostAgent` once (BCC's compile is the slow part of a start: seconds idle, a minute on
a busy 2-core host) and runs each interpreter's workloads under it in turn, so the agent profiles the
whole host (no --pid: processes started after it must be profiled too). Each test reads the samples of
its own workload's pid, once `wait_flushed` says the intervals after the workload ended are written.

The metric and label names the Python support exports are looked up here only (`PYTHON_PROCESSES`,
`RUNTIME_LABELS`, ...), so that a rename is one edit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from agent._proto import profile_pb2
from tests.support.agent import STARTUP_TIMEOUT_S, free_port, start_agent, wait_for_log
from tests.support.interpreters import Interpreter
from tests.support.pyframes import FrameSample, read_frames

PYTHON_WORKLOADS = Path(__file__).resolve().parent.parent / "workloads" / "python"
# A gauge: inspected processes by their current Python state (enabled, thread_map, not_python,
# unsupported_version, validation_failed, free_threaded, no_symbols, read_failed, disabled).
PYTHON_PROCESSES = "profiling_agent_python_processes"
WALKED_STATES = ("enabled", "thread_map")  # Python frames walked in BPF
NOT_CPYTHON_STATES = ("not_python", "disabled")  # every other process on the host; or the feature off
RUNTIME_LABELS = ("process.runtime.name", "process.runtime.version")
EVAL_FRAME = "_PyEval_EvalFrameDefault"
REPORTED_INTERVALS = "profiling_agent_report_intervals_total"  # by outcome: reported, empty
# Budgets the adaptive sampler never reaches: every off-CPU block of at least the minimum is kept and
# allocations are sampled at the default mean distance, so the tests' bounds need no sampling factor.
# Files are never deleted (the default keeps 1,000). Bigger perf buffers: at 499 Hz the CPU records of
# a busy host with stack copies fill the default 64 pages per CPU in a fraction of a second.
AGENT_ENV = {
    "PROFILING_AGENT_SAMPLING_MAX_EVENTS_PER_S": "10000000",
    "PROFILING_AGENT_SAMPLING_CPU_BUDGET_PERCENT": "100",
    "PROFILING_AGENT_EXPORT_FILES_MAX_FILES": "0",
    "PROFILING_AGENT_EXPORT_FILES_MAX_BYTES": "0",
    "PROFILING_AGENT_PROFILING_PERF_BUFFER_PAGES": "1024",
}
FLUSH_TIMEOUT_S = 60.0


class HostAgent:
    """`profiling-agent run` (over the whole host unless `extra` has --pid), writing pprof files every
    `interval` seconds."""

    def __init__(self, directory: Path, profilers: str, frequency: int, *extra: str, interval: float = 2.0) -> None:
        """`extra` adds flags, e.g. `--pid N` to profile those processes only."""
        self.out, self.log = directory / "profiles", directory / "agent.log"
        self.metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
        address = self.metrics_url.removeprefix("http://").removesuffix("/metrics")
        self.profilers = profilers.split(",")
        self.frequency = frequency
        args = ("--profilers", profilers, "--frequency", str(frequency), "--interval", str(interval))
        self.proc = start_agent(
            self.out, *args, *extra, "--metrics-address", address, log_path=self.log, env=AGENT_ENV
        )  # fmt: skip
        wait_for_log(self.log, "profiling started", STARTUP_TIMEOUT_S, self.proc)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text: str = response.read().decode()
            return text

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a series' samples with these labels (0 when there are none)."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def python_processes(self) -> dict[str, float]:
        """PYTHON_PROCESSES by its `state` label."""
        states: dict[str, float] = {}
        for line in self.metrics().splitlines():
            if line.startswith(PYTHON_PROCESSES + "{") and 'state="' in line:
                state = line.split('state="', 1)[1].split('"', 1)[0]
                states[state] = states.get(state, 0.0) + float(line.rsplit(" ", 1)[1])
        return states

    def native_only_pythons(self) -> float:
        """Processes that look like CPython and are kept native-only, whatever the reason."""
        states = self.python_processes()
        return sum(v for state, v in states.items() if state not in (*WALKED_STATES, *NOT_CPYTHON_STATES))

    def wait_walked(self, workloads: list[PythonWorkload], timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Poke each of `workloads` at its gate (by which an agent that meets processes only through their
        samples meets them), block until the agent walks the Python frames of as many processes (with
        --pid for exactly those: until it walks each of them), and resume them: the gates' waits from
        then on are followed with their Python frames."""
        for workload in workloads:
            workload.poke()
        deadline = time.monotonic() + timeout
        while sum(self.python_processes().get(state, 0.0) for state in WALKED_STATES) < len(workloads):
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(workloads)} processes not walked in {timeout} s: {self.python_processes()}")
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent exited with {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.2)
        for workload in workloads:
            workload.resume()

    def wait_flushed(self, after_ns: int, timeout: float = FLUSH_TIMEOUT_S) -> None:
        """Block until every profiler has written a profile whose interval starts after `after_ns`
        (wall clock): the intervals before it, with everything sampled until then, are in files."""
        deadline = time.monotonic() + timeout
        waiting = set(self.profilers)
        while waiting:
            for prefix in list(waiting):
                if any(_starts(path) > after_ns for path in self.out.glob(f"{prefix}-*.pb.gz")):
                    waiting.discard(prefix)
            if waiting and time.monotonic() > deadline:
                raise AssertionError(f"no {sorted(waiting)} profile after {after_ns} within {timeout} s")
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent exited with {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.2)

    def wait_reported(self, intervals: int = 2, timeout: float = FLUSH_TIMEOUT_S) -> None:
        """Block until `intervals` more intervals of every profiler are reported (with samples or empty),
        counted from now: what was sampled before now is in files, even when nothing is sampled since
        (`wait_flushed` waits for a file, which an interval without samples does not write)."""
        target = self.metric(REPORTED_INTERVALS) + intervals * len(self.profilers)
        deadline = time.monotonic() + timeout
        while self.metric(REPORTED_INTERVALS) < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"{intervals} intervals not reported within {timeout} s")
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent exited with {self.proc.returncode}:\n{self.text()}")
            time.sleep(0.2)

    def samples(self, prefix: str, pid: int) -> list[FrameSample]:
        return read_frames(self.out, prefix, pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        assert self.proc.returncode == 0, self.text()[-5000:]
        assert "Traceback" not in self.text(), self.text()[-5000:]


_starts_memo: dict[Path, int] = {}


def _starts(path: Path) -> int:
    """The wall-clock start of a profile file's interval (read once per file: they are written whole)."""
    if path not in _starts_memo:
        import gzip

        profile = profile_pb2.Profile()
        profile.ParseFromString(gzip.decompress(path.read_bytes()))
        _starts_memo[path] = profile.time_nanos
    return _starts_memo[path]


class PythonWorkload:
    """A workload of tests/workloads/python run by one interpreter, held at its gate until `go()`.

    `prefix` goes before the interpreter (e.g. `unshare -fpm --mount-proc`); its truth file is read by
    `finish()`. `pid` is the interpreter's pid as the host sees it (for a prefix, the prefix's child
    that runs the interpreter)."""

    def __init__(
        self,
        interpreter: Interpreter,
        script: str,
        args: list[str],
        directory: Path,
        prefix: tuple[str, ...] = (),
        hold: bool = False,
    ) -> None:
        """`hold`: the workload stops itself once its truth is written (workload_common.hold), and
        `finish()` returns then; `release()` lets it exit."""
        self.truth_path = directory / f"{script}-{interpreter.label}-{time.monotonic_ns()}.json"
        self.script = PYTHON_WORKLOADS / f"{script}.py"
        assert not (hold and prefix), "a held workload is waited for as the child it is"
        self.hold = hold
        argv = [*prefix, str(interpreter.executable), str(self.script), *args, str(self.truth_path), "gate"]
        argv += ["hold"] if hold else []
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == "ready\n", (argv, line)
        self.pid = self.proc.pid if not prefix else _interpreter_pid(self.proc.pid, interpreter.executable)
        self.started_ns = 0
        self.usage: Any = None

    @property
    def filename(self) -> str:
        """co_filename of the script's code: the path it was run by."""
        return str(self.script)

    def poke(self, timeout: float = 60.0) -> None:
        """A short sleep at the gate, an off-CPU block by which an agent meets the waiting process; the
        workload then stops itself until `resume()`."""
        assert self.proc.stdin is not None and self.proc.pid == self.pid, "no poke through a prefix"
        self.proc.stdin.write("p")
        self.proc.stdin.flush()
        self._wait(timeout, os.WUNTRACED)

    def resume(self) -> None:
        """Continue a poked workload: it waits at its gate again."""
        assert self.proc.stdout is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        assert self.proc.stdout.readline() == "poked\n"

    def go(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.started_ns = time.time_ns()
        self.proc.stdin.write("g")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "started\n"

    def finish(self, timeout: float = 300.0) -> dict[str, Any]:
        """Wait for the exit (reaping it with its resource usage), or for the stop of a held workload,
        and return its truth."""
        self._wait(timeout, os.WUNTRACED if self.hold else 0)
        truth: dict[str, Any] = json.loads(self.truth_path.read_text())
        return truth

    def release(self, timeout: float = 60.0) -> None:
        """Continue a held workload that `finish()` saw stop, and reap its exit."""
        assert self.hold and self.proc.returncode is None, self.script
        os.kill(self.proc.pid, signal.SIGCONT)
        self._wait(timeout, 0)

    def _wait(self, timeout: float, flags: int) -> None:
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG | flags)
            if pid and os.WIFSTOPPED(status):
                return
            if pid:
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"{self.script.name} did not finish within {timeout} s")
            time.sleep(0.05)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.usage = usage
        assert self.proc.returncode == 0, self.script

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _interpreter_pid(parent: int, interpreter: Path, timeout: float = 10.0) -> int:
    """The host pid of the descendant of `parent` that runs `interpreter` (unshare forks it)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(parent).children(recursive=True):
            try:
                if Path(child.exe()) == interpreter.resolve() or child.cmdline()[:1] == [str(interpreter)]:
                    return int(child.pid)
            except psutil.Error:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no {interpreter} under pid {parent}")
