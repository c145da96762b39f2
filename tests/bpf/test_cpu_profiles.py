"""CPU profiling end to end: the real agent, real BPF, workloads with a known truth, go tool pprof.

Each test runs `profiling-agent run` as a user would, with a workload compiled with frame pointers,
and reads the pprof files it wrote.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from agent.symbolize.types import KERNEL_MAPPING_NAME
from tests.support.agent import STARTUP_TIMEOUT_S, start_agent, wait_for_log
from tests.support.profiles import ReadSample, read_all, samples_of
from tests.support.stats import binomial_tolerance, poisson_tolerance
from tests.support.workloads import compile_workload

pytestmark = pytest.mark.bpf
FREQUENCY = 99


def run_workload_under_agent(
    tmp_path: Path, workload: list[str], *, agent_args: tuple[str, ...] = (), settle: float = 0.5, tail: float = 1.5
) -> tuple[Path, int, float, str]:
    """Start the agent, run the workload to completion under it, stop the agent; returns
    (output dir, workload pid, workload CPU seconds, workload stdout)."""
    out = tmp_path / "profiles"
    log = tmp_path / "agent.log"
    agent = start_agent(out, "--frequency", str(FREQUENCY), "--interval", "4", *agent_args, log_path=log)
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        time.sleep(settle)
        proc = subprocess.Popen(workload, stdout=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.returncode == 0
        assert proc.stdout is not None
        output = proc.stdout.read()
        time.sleep(tail)
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    assert agent.returncode == 0, log.read_text()
    return out, proc.pid, usage.ru_utime + usage.ru_stime, output


def share(samples: list[ReadSample], function: str) -> float:
    """Inclusive share: the leaf may be a kernel frame of the clock_gettime the loop makes."""
    total = sum(s.values[0] for s in samples)
    return sum(s.values[0] for s in samples if function in s.functions) / total


def test_cpu_split_is_attributed_and_complete(tmp_path: Path) -> None:
    binary = compile_workload("cpu_split", tmp_path)
    seconds, threads = 10.0, 2
    out, pid, cpu_seconds, output = run_workload_under_agent(tmp_path, [str(binary), str(seconds), str(threads)])
    truth = {name: float(value) for name, value in re.findall(r"(hot_[ab])=([0-9.]+)", output)}
    true_a = truth["hot_a"] / (truth["hot_a"] + truth["hot_b"])
    assert abs(true_a - 0.75) < 0.01, truth  # the workload did what it promises (in its own CPU time)
    samples = samples_of(read_all(out), pid)
    assert samples, "no samples of the workload"
    count = sum(s.values[0] for s in samples)
    a, b = share(samples, "hot_a"), share(samples, "hot_b")
    # Each sample lands in hot_a with probability true_a: 4 binomial standard errors of the samples
    # taken (~2,000 on an idle host, 0.04; half as many beside a CPU hog, 0.055). 10 s rather than 6 so
    # that a busy host still gives enough samples for a bound that tells 3:1 from 2:1.
    assert abs(a / (a + b) - true_a) <= binomial_tolerance(true_a, count * (a + b)), (a, b, count, truth)
    # Nearly all of its time is in the two leaves (the loop between them is a few instructions): with
    # ~1,000 samples or more, 4 binomial standard errors of a 1% miss are under 0.02, well inside 0.05.
    assert a + b >= 0.95, (a, b, count)
    # "Busy seconds" are the CPU seconds the threads got (frequency x seconds x threads on an idle
    # machine); measuring them keeps the bound exact when other processes share the 2 cores. The
    # count is within 4 Poisson standard errors of FREQUENCY x those seconds (a timer's samples of a
    # process sharing the CPUs are binomial at each tick, of smaller variance).
    expected = FREQUENCY * cpu_seconds
    assert abs(count - expected) <= poisson_tolerance(expected), (count, cpu_seconds)
    # Callers are there too: frame pointers give main -> worker -> hot_a on the main thread.
    assert any(s.functions[:3] == ("hot_a", "worker", "main") for s in samples)
    assert all(s.values[1] == s.values[0] * round(1e9 / FREQUENCY) for s in samples)


@pytest.mark.skipif(shutil.which("go") is None, reason="go is not installed (go tool pprof reads the files)")
def test_go_tool_pprof_opens_the_files(tmp_path: Path) -> None:
    binary = compile_workload("cpu_split", tmp_path)
    out, _, _, _ = run_workload_under_agent(tmp_path, [str(binary), "3", "2"])
    files = sorted(out.glob("cpu-*.pb.gz"))
    assert files
    env = {**os.environ, "PPROF_BINARY_PATH": ""}
    top = subprocess.run(
        ["go", "tool", "pprof", "-top", "-sample_index=samples", *map(str, files)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert re.search(r"\bhot_a\b", top) and re.search(r"\bhot_b\b", top), top
    raw = subprocess.run(["go", "tool", "pprof", "-raw", str(files[0])], capture_output=True, text=True, env=env)
    assert raw.returncode == 0, raw.stderr
    assert "PeriodType: cpu nanoseconds" in raw.stdout


def test_short_lived_process_is_symbolized(tmp_path: Path) -> None:
    """A process that lives one second and exits mid-interval (interval 4 s) still gets names."""
    binary = compile_workload("cpu_split", tmp_path)
    out, pid, cpu_seconds, _ = run_workload_under_agent(tmp_path, [str(binary), "1", "1"], tail=3.0)
    samples = samples_of(read_all(out), pid)
    count = sum(s.values[0] for s in samples)
    # Its samples are those of the CPU time it measured (a third of a second or more beside a CPU hog,
    # not the second an idle host gives it), within 4 Poisson standard errors.
    expected = FREQUENCY * cpu_seconds
    assert count > 0 and abs(count - expected) <= poisson_tolerance(expected), (count, cpu_seconds)
    # Named: all but the few samples outside hot_a and hot_b (~1%); 0.8 is more than 4 binomial
    # standard errors of a 1% miss for 10 samples or more, and leaves room for none going unnamed.
    named = [s for s in samples if {"hot_a", "hot_b"} & set(s.functions)]
    assert sum(s.values[0] for s in named) >= 0.8 * count, (named, count)
    assert all(s.strings.get("comm") == "cpu_split" for s in samples)


def test_kernel_frames_are_named(tmp_path: Path) -> None:
    binary = compile_workload("syscall_heavy", tmp_path)
    out, pid, _, _ = run_workload_under_agent(tmp_path, [str(binary), "3"])
    samples = samples_of(read_all(out), pid)
    assert samples
    kallsyms = {line.split()[2] for line in Path("/proc/kallsyms").read_text().splitlines()}
    with_kernel = [s for s in samples if "spin_reads" in s.functions and s.mappings[0] == KERNEL_MAPPING_NAME]
    assert sum(s.values[0] for s in with_kernel) >= 0.5 * sum(s.values[0] for s in samples)
    # Above spin_reads are kernel frames and, for its clock_gettime calls, libc's and the vDSO's.
    above = [
        frame
        for s in samples
        if "spin_reads" in s.functions
        for frame in zip(s.functions[: s.functions.index("spin_reads")], s.mappings, strict=False)
    ]
    kernel_names = {name for name, file in above if file == KERNEL_MAPPING_NAME}
    assert kernel_names and kernel_names <= kallsyms, kernel_names - kallsyms
    assert all(name.startswith("__vdso_") for name, file in above if file == "[vdso]"), above
    assert kernel_names & {"read_zero", "clear_user", "iov_iter_zero", "vfs_read", "ksys_read", "do_syscall_64"}


def test_pid_filter_limits_profiling_to_those_processes(tmp_path: Path) -> None:
    binary = compile_workload("cpu_split", tmp_path)
    other = subprocess.Popen([str(binary), "600", "1"])  # outlives the run however slow start-up is
    try:
        out, _, _, _ = run_workload_under_agent(
            tmp_path, [str(binary), "2", "1"], agent_args=("--pid", str(other.pid)), tail=0.5
        )
    finally:
        other.kill()
        other.wait(timeout=30)
    pids = {s.numeric.get("pid") for s in read_all(out)}
    assert pids == {other.pid}, pids
