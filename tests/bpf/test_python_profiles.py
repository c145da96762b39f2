"""Issue #12 acceptance: Python functions in the CPU, off-CPU and allocation profiles, on every CPython
found on the machine (tests/support/interpreters.py), checked against py-spy and the workloads' truths.

For each interpreter three workloads of tests/workloads/python are started, held at their gates, and
run at once under one agent (all three profilers, 499 Hz, --pid for the three: at that rate the whole
host's CPU records, each with a stack copy, overflow its buffers on a busy 2-core machine):
cpu_split, with py-spy recording it at the same time, offcpu_split and alloc_bytes. The tests read
each one's samples from that run, by pid.

The gates open only once the agent walks all three (it meets them by the pokes at their gates, or
earlier), and offcpu_split and alloc_bytes stay alive, stopped (workload_common.hold), until the
intervals with their samples are written: these tests measure what the off-CPU and allocation profilers
see of a walked process, not when a process is met or how its exit is handled (test_python_lifecycle's).
alloc_bytes' whole run is well under a second, less than the agent can take to meet and inspect a
process on a busy host, and an interval that ends after its process exited must still name its frames.

Sample counts: cpu_split runs for CPU_SECONDS of its own CPU time, so the agent takes about
FREQUENCY x CPU_SECONDS = ~10,000 samples of it however busy the host is, and py-spy (wall-clock rate
SPY_RATE while the thread is active) at least as many on an idle host and more on a busy one. Each
function's share is ~0.25; the difference of two independent binomial estimates has a standard error
of sqrt(p(1-p)(1/n1 + 1/n2)) = 0.0061 at 10,000 each, so 4 of them (0.025) fit inside the issue's
±3 points. The test checks that from the counts it got (`_enough_for_split`) and fails, asking for a
longer run, rather than let the fixed bound fall below 4 standard errors.

py-spy itself is a sample of wall time (while the thread is runnable), the agent one of CPU time. On
this 2-core machine beside a steady load, py-spy's shares were within 1.3 points of the workload's own
clock (time.thread_time) for every function. Beside a bursty one the two clocks part: the time a task
waited for a CPU counts for py-spy only (seen: `recurse` 25.0% of the CPU time, 19.8% of py-spy's
samples, in a run beside an exec storm). The workload measures both clocks for each task, so the
comparison with py-spy allows, beyond the ±3 points, the difference of the task's two shares in that
run (0 when nothing waited). The agent is held to the CPU clock itself, within 4 binomial standard
errors (1.7 points at 10,000 samples).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.probes.alloc import DEFAULT_SAMPLE_BYTES
from tests.support import pyspy
from tests.support.interpreters import Interpreter, interpreter_params, require
from tests.support.pyframes import (
    FrameSample,
    code_names,
    hottest_line,
    inclusive,
    marked_line,
    short_name,
    weight,
)
from tests.support.python_agent import EVAL_FRAME, RUNTIME_LABELS, HostAgent, PythonWorkload
from tests.support.stats import SIGMAS, binomial_tolerance, sampled_bytes_tolerance

pytestmark = pytest.mark.bpf

FREQUENCY = 499
SPY_RATE = 500
CPU_SECONDS = 20.0
SPLIT_POINTS = 0.03  # the issue's ±3 points
SPY_ERROR_SHARE = 0.001  # py-spy's failed reads, per sample taken
# Compared with py-spy: a method, a recursive function, a generator and a C-extension call.
FUNCTIONS = ("Mixer.churn", "recurse", "squares", "compress")
# cpu_split's tasks (what it times) and the function each is.
TASKS = {"churn": "Mixer.churn", "recurse": "recurse", "drain": "drain", "compress": "compress"}
# The task each compared function runs in: the generator `squares` is consumed by `drain`.
TASK_OF = {"Mixer.churn": "churn", "recurse": "recurse", "squares": "drain", "compress": "compress"}
OFFCPU_ARGS = ["4", "2", "4"]  # seconds, threads, slice ms: wait_a blocks 8 ms, wait_b 4 ms
ALLOC_MB = 512


@dataclass
class Run:
    """One interpreter's workloads, run under the module's agent, and what they measured."""

    interpreter: Interpreter
    agent: HostAgent
    cpu: PythonWorkload
    cpu_truth: dict[str, Any]
    spy: list[pyspy.SpyStack]
    offcpu: PythonWorkload
    offcpu_truth: dict[str, Any]
    alloc: PythonWorkload
    alloc_truth: dict[str, Any]
    cpu_lost: float  # CPU records the agent lost while they ran

    def cpu_samples(self) -> list[FrameSample]:
        return self.agent.samples("cpu", self.cpu.pid)

    def name(self, qualname: str) -> str:
        return self.interpreter.display_name(qualname)


@pytest.fixture(scope="module", params=interpreter_params())
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    interpreter = require(request.param)
    directory = tmp_path_factory.mktemp(f"python-{interpreter.label}")
    cpu = PythonWorkload(interpreter, "cpu_split", [str(CPU_SECONDS)], directory)
    offcpu = PythonWorkload(interpreter, "offcpu_split", OFFCPU_ARGS, directory, hold=True)
    alloc = PythonWorkload(interpreter, "alloc_bytes", [str(ALLOC_MB)], directory, hold=True)
    workloads = (cpu, offcpu, alloc)
    spy = None
    try:
        pids = [arg for workload in workloads for arg in ("--pid", str(workload.pid))]
        agent = HostAgent(directory, "cpu,offcpu,alloc", FREQUENCY, *pids)
        try:
            agent.wait_walked(list(workloads))
            spy = pyspy.PySpyRecord(cpu.pid, SPY_RATE, directory / "py-spy.txt")
            spy.wait_sampling()
            for workload in workloads:
                workload.go()
            alloc_truth, offcpu_truth, cpu_truth = (w.finish() for w in (alloc, offcpu, cpu))
            stacks = spy.stacks()
            time.sleep(0.5)
            lost = agent.metric("profiling_agent_probe_events_lost_total", profiler="cpu")
            agent.wait_reported()  # the held workloads' samples are in files: they may exit now
            for workload in (offcpu, alloc):
                workload.release()
        finally:
            agent.stop()  # flushes the last interval
    finally:
        if spy is not None:
            spy.stop()
        for workload in workloads:
            workload.kill()
    # A left-out sample moves any share by at most its own weight: 0.1% of them is 0.1 points of the 3.
    assert spy.error_share() <= SPY_ERROR_SHARE, spy.log_text()
    return Run(interpreter, agent, cpu, cpu_truth, stacks, offcpu, offcpu_truth, alloc, alloc_truth, lost)


def _enough_for_split(p: float, ours: int, theirs: int) -> float:
    """4 standard errors of the difference of two shares `p` estimated from `ours` and `theirs` samples."""
    return SIGMAS * math.sqrt(p * (1 - p) * (1 / ours + 1 / theirs))


def test_cpu_split_matches_py_spy(run: Run) -> None:
    samples, spy = run.cpu_samples(), run.spy
    ours_n, spy_n = weight(samples), pyspy.total(spy)
    assert run.cpu_lost == 0, "the agent lost CPU records: shares of a rotating workload would be biased"
    shares = {}
    cpu_s, wall_s = run.cpu_truth["tasks"], run.cpu_truth["wall"]
    for qualname in FUNCTIONS:
        name = run.name(qualname)
        ours = inclusive(samples, name, run.cpu.filename) / ours_n
        theirs = pyspy.inclusive(spy, name, run.cpu.filename) / spy_n
        shares[qualname] = (ours, theirs)
        pooled = (ours * ours_n + theirs * spy_n) / (ours_n + spy_n)
        needed = _enough_for_split(pooled, ours_n, spy_n)
        assert needed <= SPLIT_POINTS, f"{ours_n} and {spy_n} samples: 4 SE = {needed:.4f}; raise CPU_SECONDS"
        task = TASK_OF[qualname]
        clocks_apart = abs(cpu_s[task] / sum(cpu_s.values()) - wall_s[task] / sum(wall_s.values()))
        assert abs(ours - theirs) <= SPLIT_POINTS + clocks_apart, (qualname, shares, ours_n, spy_n, clocks_apart)
    # The workload's own clock says the same: each task's share of its CPU time (time.thread_time around
    # the calls, the process's rusage for the whole) is within 4 binomial standard errors of ours.
    process_cpu = run.cpu.usage.ru_utime + run.cpu.usage.ru_stime
    for task, qualname in TASKS.items():
        true_share = run.cpu_truth["tasks"][task] / process_cpu
        ours = inclusive(samples, run.name(qualname), run.cpu.filename) / ours_n
        assert abs(ours - true_share) <= binomial_tolerance(true_share, ours_n), (task, ours, true_share, ours_n)


def _native_only(samples: list[FrameSample]) -> list[tuple[int, list[str]]]:
    """The heaviest stacks without Python frames (their leaf-most frames), for a failure's message."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for sample in samples:
        if not sample.python_frames():
            stacks[tuple(f.name or f.mapping for f in sample.frames[:12])] += sample.values[0]
    return [(n, list(frames)) for frames, n in stacks.most_common(8)]


def test_python_frames_are_named_as_cpython_names_them(run: Run) -> None:
    """Every Python frame of the workload's file names one of its code objects (qualname, co_name, first
    line), the four functions are there under py-spy's names, the eval loop's native frames are gone,
    and the samples carry the runtime's name and version."""
    samples = run.cpu_samples()
    defined = code_names(Path(run.cpu.filename))
    allowed = {run.name(q): lines for q, lines in defined.items()}
    if not run.interpreter.has_qualname:  # 3.10: co_name for both; lambdas of one name may differ in line
        allowed = {short_name(q): {x for k, v in defined.items() if short_name(k) == short_name(q) for x in v}
                   for q in defined}  # fmt: skip
    ours = {(f.name, f.system_name, f.start_line) for s in samples for f in s.frames if f.filename == run.cpu.filename}
    assert ours, [s.frames for s in samples[:3]]
    for name, system_name, start_line in ours:
        assert name in allowed and start_line in allowed[name], (name, start_line, allowed)
        # system_name is co_name; pprof leaves it empty where it equals the name (go tool pprof reads
        # name == system_name as "not demangled" and would rewrite it).
        assert system_name == (short_name(name) if short_name(name) != name else ""), (name, system_name)
    spy_names = {f.name for s in run.spy for f in s.frames if f.filename == run.cpu.filename}
    for qualname in FUNCTIONS:
        assert run.name(qualname) in {name for name, _, _ in ours} & spy_names, (qualname, ours, spy_names)
    with_python = [s for s in samples if s.python_frames()]
    assert weight(with_python) >= 0.95 * weight(samples), (weight(with_python), weight(samples), _native_only(samples))
    # An eval call caught entering (before its first frame is linked) or leaving has no Python frames of
    # its own: it stays native, and only ever leaf-side of every Python frame. Such windows are a few
    # instructions of each call: a small share, never most of a function's samples.
    left = [s for s in with_python if any(f.name.startswith(EVAL_FRAME) for f in s.frames)]
    for sample in left:
        last_eval = max(i for i, f in enumerate(sample.frames) if f.name.startswith(EVAL_FRAME))
        first_python = min(i for i, f in enumerate(sample.frames) if f.python)
        assert last_eval < first_python, [f.name for f in sample.frames]
    assert weight(left) <= 0.02 * weight(with_python), (weight(left), weight(with_python))
    name_label, version_label = RUNTIME_LABELS
    assert {s.strings.get(name_label) for s in with_python} == {"cpython"}
    # The micro comes from Py_Version (3.11+): 3.10 is labelled with its minor only (docs/python.md).
    version = run.interpreter.version_text if run.interpreter.minor >= (3, 11) else "3.10"
    assert {s.strings.get(version_label) for s in with_python} == {version}


def test_hottest_line_of_each_function_matches_py_spy(run: Run) -> None:
    samples = run.cpu_samples()
    for qualname in FUNCTIONS:
        name, hot = run.name(qualname), marked_line(Path(run.cpu.filename), short_name(qualname))
        ours, our_lines = hottest_line(samples, name, run.cpu.filename)
        theirs, spy_lines = pyspy.hottest_line(run.spy, name, run.cpu.filename)
        assert ours == theirs == hot, (qualname, hot, our_lines, spy_lines)


def test_c_extension_keeps_its_native_frames_under_the_python_caller(run: Run) -> None:
    """Samples whose innermost Python frame is `compress` (in zlib.compress): >= 80% have native frames
    leaf-side of it, and most of those are in zlib's library (deflate)."""
    name = run.name("compress")
    innermost_compress = []
    for sample in run.cpu_samples():
        first = next((i for i, f in enumerate(sample.frames) if f.python), None)
        if first is not None and sample.frames[first].name == name:
            innermost_compress.append((sample, first))
    total = sum(s.values[0] for s, _ in innermost_compress)
    assert total > 0, "no samples in compress"
    native = [(s, first) for s, first in innermost_compress if first > 0]
    assert sum(s.values[0] for s, _ in native) >= 0.8 * total, (len(native), total)
    in_libz = sum(s.values[0] for s, first in native if any("libz" in Path(f.mapping).name for f in s.frames[:first]))
    assert in_libz >= 0.5 * total, (in_libz, total, [s.frames[:4] for s, _ in native[:3]])


def test_offcpu_split_and_python_frames_on_blocked_time(run: Run) -> None:
    """wait_a blocks two slices for each of wait_b's: the blocked time by function is within ±3 points of
    what they measured (every block is kept: no sampling error), and Python frames are on >= 95% of the
    process's blocked time (its main thread's join and its gate included)."""
    samples = run.agent.samples("offcpu", run.offcpu.pid)
    filename = run.offcpu.filename
    a, b = inclusive(samples, "wait_a", filename, index=1), inclusive(samples, "wait_b", filename, index=1)
    truth = run.offcpu_truth["ns"]
    true_a = truth["wait_a"] / (truth["wait_a"] + truth["wait_b"])
    assert a + b > 0, "no off-CPU samples in wait_a or wait_b"
    assert abs(a / (a + b) - true_a) <= SPLIT_POINTS, (a, b, truth)
    total = weight(samples, 1)
    with_python = sum(s.values[1] for s in samples if s.python_frames())
    assert with_python >= 0.95 * total, (with_python, total)
    # The caller comes with the blocking function: wait_a's next Python frame is worker.
    callers = {
        s.python_frames()[1].name for s in samples if s.python_frames()[:1] and s.python_frames()[0].name == "wait_a"
    }
    assert callers == {"worker"}, callers


def test_allocating_function_is_named_in_the_alloc_profile(run: Run) -> None:
    """fill_buffers' bytearrays: the bytes under its name are within 4 standard errors of what it
    allocated (sampled every DEFAULT_SAMPLE_BYTES on average), at the line that allocates."""
    samples = run.agent.samples("alloc", run.alloc.pid)
    true_bytes = run.alloc_truth["fill_buffers_bytes"]
    named = inclusive(samples, "fill_buffers", run.alloc.filename, index=1)
    tolerance = sampled_bytes_tolerance(true_bytes, DEFAULT_SAMPLE_BYTES)
    assert abs(named - true_bytes) <= tolerance, (named, true_bytes, tolerance, weight(samples, 1))
    line, lines = hottest_line(samples, "fill_buffers", run.alloc.filename, index=1)
    assert line == marked_line(Path(run.alloc.filename), "fill_buffers"), lines
