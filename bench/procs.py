"""Benchmark helpers: launching processes under `/usr/bin/time -v`, and reading their CPU and memory.

CPU comes from `/proc/PID/stat` (utime + stime of every thread, live and exited), resident memory from
psutil while a process runs and from `time -v`'s "Maximum resident set size" once it has exited, and
the peak so far from `/proc/PID/status` (VmHWM).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

TIME = "/usr/bin/time"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PERF_EVENT_LINK = "anon_inode:[perf_event]"


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread, live and exited), in seconds."""
    return cpu_seconds_of(f"/proc/{pid}/stat")


def status_kib(pid: int, key: str) -> int:
    """A `kB` line of /proc/PID/status, such as VmHWM (peak resident) or VmRSS."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def perf_event_fds(pid: int) -> int:
    """How many perf events the process holds open (BCC opens one per probe and CPU)."""
    count = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == PERF_EVENT_LINK:
                count += 1
        except OSError:
            continue
    return count


def parse_time_v(text: str) -> dict[str, str]:
    """`/usr/bin/time -v` output as {"Maximum resident set size (kbytes)": "1792", ...}."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().rpartition(": ")
        if sep and key:
            values[key] = value.strip()
    return values


@dataclass(frozen=True, slots=True)
class TimeV:
    """The figures of `/usr/bin/time -v` the report uses."""

    user_s: float
    system_s: float
    max_rss_kib: int
    exit_status: int
    raw: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> TimeV:
        values = parse_time_v(text)
        return cls(
            user_s=float(values.get("User time (seconds)", "nan")),
            system_s=float(values.get("System time (seconds)", "nan")),
            max_rss_kib=int(values.get("Maximum resident set size (kbytes)", "0")),
            exit_status=int(values.get("Exit status", "-1")),
            raw=values,
        )


class Timed:
    """A command run under `/usr/bin/time -v -o FILE`; `pid` is the command's own process."""

    def __init__(
        self,
        argv: Sequence[str],
        time_file: Path,
        *,
        stdin: int | IO[Any] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.time_file = time_file
        self.launched = time.monotonic()
        self.popen = subprocess.Popen(
            [TIME, "-v", "-o", str(time_file), *argv],
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            text=True,
        )
        self.pid = self._child_pid()

    def _child_pid(self, timeout: float = 10.0) -> int:
        parent = psutil.Process(self.popen.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            children = parent.children()
            if children:
                return int(children[0].pid)
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited at once ({self.popen.returncode})")
            time.sleep(0.002)
        raise RuntimeError(f"no child of {TIME} for {self.argv[0]}")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, signum: int = signal.SIGINT) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def stop(self, timeout: float = 30.0, signum: int = signal.SIGINT) -> TimeV:
        """Signal the command (SIGINT by default), wait for it, and read `time -v`'s figures."""
        if self.alive():
            self.send(signum)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.popen.wait(10)
        return self.times()

    def wait(self, timeout: float | None = None) -> TimeV:
        self.popen.wait(timeout)
        return self.times()

    def times(self) -> TimeV:
        try:
            return TimeV.parse(self.time_file.read_text(errors="replace"))
        except OSError:
            return TimeV.parse("")


@dataclass(slots=True)
class MemoryTrack:
    """Resident-set samples of one process, taken by a `MemorySampler`."""

    samples: list[int] = field(default_factory=list)

    @property
    def max_bytes(self) -> int:
        return max(self.samples, default=0)


class MemorySampler:
    """Samples the RSS of some processes every `period` seconds on a thread of its own, until stopped."""

    def __init__(self, pids: Mapping[str, int], period: float = 0.5) -> None:
        self._pids = dict(pids)
        self._period = period
        self.tracks = {name: MemoryTrack() for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            for name, pid in self._pids.items():
                try:
                    self.tracks[name].samples.append(rss_bytes(pid))
                except psutil.Error:
                    continue
            if self._stop.wait(self._period):
                return


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> float:
    """Poll `predicate()` until true; returns the seconds it took. Raises TimeoutError naming `what`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what} did not happen within {timeout:g} s")
        time.sleep(interval)
    return time.monotonic() - start


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """CPU nanoseconds of each live thread of `pid`, by thread id: the scheduler's runtime, the first
    field of /proc/PID/task/TID/schedstat (where /proc's stat counts 10 ms ticks)."""
    found: dict[int, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                found[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended
    return found


def thread_comm(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return f"thread {tid}"


def thread_breakdown(pid: int, before: Mapping[int, int], seconds: float, py_spy: Path) -> dict[str, float]:
    """% of one core per thread of `pid` since `before` (from `thread_cpu_ns`), by name: the Python
    thread's name from py-spy when it is installed, else the kernel's comm (libgrpc's native threads,
    a Go runtime's). Threads that share a name are summed; threads that ended since are not counted."""
    after = thread_cpu_ns(pid)
    names = python_thread_names(pid, py_spy)
    percent: dict[str, float] = {}
    for tid, used in after.items():
        name = names.get(tid) or thread_comm(pid, tid)
        percent[name] = percent.get(name, 0.0) + 100 * (used - before.get(tid, 0)) / 1e9 / seconds
    return percent


def cpu_seconds_of(stat_path: str) -> float:
    """utime + stime from a /proc stat file; fields[0] is field 3 (state), so 14 and 15 are 11 and 12."""
    with open(stat_path, encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


PY_SPY_THREAD = re.compile(r'^Thread (\d+) \([^)]*\): "([^"]*)"', re.MULTILINE)


def python_thread_names(pid: int, py_spy: Path) -> dict[int, str]:
    """Thread id -> Python thread name, from `py-spy dump` when py-spy is installed; else empty."""
    if not os.access(py_spy, os.X_OK):
        return {}
    result = subprocess.run([str(py_spy), "dump", "--pid", str(pid)], capture_output=True, text=True, check=False)
    return {int(tid): name for tid, name in PY_SPY_THREAD.findall(result.stdout)}


def process_clock_id(pid: int) -> int:
    """The clock id of `pid`'s CPU-time clock (the kernel's MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)).

    It reads the scheduler's nanosecond runtime of every thread, live and exited, where /proc/PID/stat
    counts 10 ms ticks: one tick is 0.033 points of a 30 s window."""
    cpuclock_sched = 2
    return (~pid << 3) | cpuclock_sched


def process_cpu_ns(pid: int) -> int:
    """CPU nanoseconds `pid` has used so far (every thread); OSError once it has exited."""
    return time.clock_gettime_ns(process_clock_id(pid))
