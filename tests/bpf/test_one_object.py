"""All three profilers in one BPF object: each new process is announced, and so captured, once.

The agent runs with `--profilers cpu,offcpu,alloc`; a workload forks children that each burn CPU,
allocate and sleep, so every profiler samples every child. The agent logs each process event it reads
at debug level ("process PID announced (new)"): with one `known_pids` map and one `proc_events`
buffer there is one announcement per child, where three objects announced it once per profiler.
The object with every section compiled in, each with its own stack copy, also passes the verifier
with the off-CPU kprobe hook (for hosts that have kprobes; this one has none to attach), with and
without the Python walker.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from agent.features import kernel_features
from agent.probes.loader import load_program
from agent.probes.records import PYTHON_MAX_FRAMES
from tests.support.agent import start_agent, wait_for_log
from tests.support.profiles import read_all, samples_of
from tests.support.workloads import compile_workload

pytestmark = pytest.mark.bpf

CHILDREN = 4
# Each child: 0.4 s of CPU time (~20 samples at 49 Hz), 64 MiB allocated (~128 samples
# at the default 512 KiB), and 10 sleeps of 20 ms: blocks above a 10 ms minimum, which keeps the host's
# many short blocks from taking the off-CPU event budget that the adaptive sampler enforces.
CHILD_ARGS = ("400", "64", "10", "20")
ENV = {
    "PROFILING_AGENT_OFFCPU_MIN_BLOCK_US": "10000",
    # On a busy host the adaptive sampler would thin the events to hold the agent's 1% CPU budget: the
    # test needs every child seen, not a cheap agent. Frame-pointer stacks keep the records small.
    "PROFILING_AGENT_SAMPLING_CPU_BUDGET_PERCENT": "100",
    "PROFILING_AGENT_UNWIND_CPU": "fp",
    "PROFILING_AGENT_UNWIND_OFFCPU": "fp",
}
PROFILE_DEADLINE_S = 90.0
ANNOUNCED = re.compile(r"process (\d+) announced \((\w+)\)")


def wait_for_samples(out: Path, pids: list[int], timeout: float) -> dict[str, list[int]]:
    """Poll the written profiles until each profiler has samples of every pid; what is still missing."""
    deadline = time.monotonic() + timeout
    while True:
        missing = {}
        for profiler in ("cpu", "offcpu", "alloc"):
            samples = read_all(out, profiler) if out.is_dir() else []
            absent = [pid for pid in pids if not samples_of(samples, pid)]
            if absent:
                missing[profiler] = absent
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(1.0)


def test_each_new_process_is_announced_once_with_every_profiler_on(tmp_path: Path) -> None:
    binary = compile_workload("process_family", tmp_path)
    out, log = tmp_path / "profiles", tmp_path / "agent.log"
    agent = start_agent(
        out,
        "--profilers",
        "cpu,offcpu,alloc",
        "--interval",
        "2",
        "--frequency",
        "49",
        "--log-level",
        "debug",
        log_path=log,
        env=ENV,
    )
    try:
        wait_for_log(log, "profiling started", 120, agent)
        family = subprocess.run(
            [str(binary), str(CHILDREN), *CHILD_ARGS], capture_output=True, text=True, timeout=120, check=True
        )
        children = [int(line) for line in family.stdout.split()]
        # The precondition: every profiler sampled every child (else a single announcement proves
        # nothing). The report thread may lag on a busy host: wait for the profiles to be written.
        missing = wait_for_samples(out, children, PROFILE_DEADLINE_S)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert agent.returncode == 0, text
    assert len(children) == CHILDREN
    assert not missing, f"children without samples, by profiler: {missing}"
    announcements = Counter(int(pid) for pid, kind in ANNOUNCED.findall(text) if kind == "new")
    assert {pid: announcements[pid] for pid in children} == dict.fromkeys(children, 1)


@pytest.mark.parametrize("python_frames", [0, 1, 96, PYTHON_MAX_FRAMES])
@pytest.mark.parametrize("use_kprobe", [0, 1])
def test_every_profiler_passes_the_verifier_in_one_object(use_kprobe: int, python_frames: int) -> None:
    """All three sections at once, each with a stack copy, with either off-CPU hook (the kprobe one can
    be verified even where kprobes cannot be attached), without and with the Python walker at up to its
    largest limit (every Python slot write provably inside `ips`)."""
    from bcc import BPF

    fsbase = kernel_features().task_fsbase_offset
    if python_frames and fsbase is None:
        pytest.skip(f"Python frames unavailable: {kernel_features().task_fsbase_unavailable}")

    defines: dict[str, int | str] = {
        "KNOWN_PIDS_ENTRIES": 1024,
        "FILTER_PIDS": 1,
        "AGENT_PID": 1,
        "PROFILE_CPU": 1,
        "PROFILE_OFFCPU": 1,
        "PROFILE_ALLOC": 1,
        "CPU_STACK_BYTES": 8192,
        "OFFCPU_STACK_BYTES": 4096,
        "ALLOC_STACK_BYTES": 512,
        "USE_KPROBE": use_kprobe,
        "BLOCKED_ENTRIES": 1024,
        "STACK_ENTRIES": 256,
        "THREAD_ENTRIES": 1024,
        "PYTHON_FRAMES": python_frames,
        "TASK_FSBASE_OFFSET": fsbase or 0,
        "PYTHON_PROCS_ENTRIES": 64,
        "PYTHON_THREADS_ENTRIES": 64,
        "PYTHON_CODES_SEEN_ENTRIES": 64,
    }
    switch = ("on_finish_task_switch", BPF.KPROBE) if use_kprobe else ("on_sched_switch", BPF.TRACEPOINT)
    programs = [("on_cpu_sample", BPF.PERF_EVENT), switch, ("on_malloc", BPF.KPROBE), ("on_calloc", BPF.KPROBE)]
    programs += [("tracepoint__sched__sched_process_exec", BPF.TRACEPOINT)]
    programs += [("tracepoint__sched__sched_process_exit", BPF.TRACEPOINT)]
    bpf = load_program("agent", defines)
    try:
        for name, kind in programs:
            assert bpf.load_func(name.encode(), kind).fd >= 0, name
    finally:
        bpf.cleanup()
