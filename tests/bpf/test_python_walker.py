"""The BPF Python walker end to end: CPython children with a known stack, walked by the CPU and off-CPU
profilers of one loaded program (docs/python.md).

Each child (tests/workloads/python_recursion.py) says what it is as it sees itself: its TLS base
(pthread_self and arch_prctl(ARCH_GET_FS)), its PyThreadState, the offsets from its TLS base that hold
that tstate, its code objects' addresses (`id(f.__code__)`) and headers (the fingerprint the walker
puts beside each address must be the one `code_fingerprint` computes from them), and _PyRuntime's
first bytes. The walk's
offsets come from the process stage's `PythonLayout` (a version's table, or 3.13+'s debug offsets):
nothing here is a hard-coded offset. Then it runs spin -> recurse x 6 -> main on CPU and nap -> recurse
x 6 -> main blocked in time.sleep, and the samples of each must carry exactly those code objects; a
third child allocates in grow -> recurse x 6 -> main, for the allocation profiler's uprobes.

Two ways to find the thread state, each on every interpreter: the TLS slot (PYTHON_USE_TSS), and the
python_threads map alone (PYTHON_USE_THREAD_MAP), keyed by the TLS base the kernel reads at
TASK_FSBASE_OFFSET: frames found through the map prove that the BTF offset reads the thread's own
FS base. After the child exits, the exit tracepoint has deleted its python_procs and python_threads
entries.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.probes.alloc import AllocProbe
from agent.probes.cpu import CpuProbe
from agent.probes.events import StackEvent
from agent.probes.offcpu import OffCpuProbe
from agent.probes.program import ProbeProgram
from agent.probes.reader import PerfReader
from agent.probes.records import (
    PYTHON_CODE_TAGGED,
    PYTHON_FRAME_ENTRY,
    PYTHON_FRAME_FLAGS,
    PYTHON_FRAME_SHIM,
    PYTHON_INSTR_IS_INT,
    PYTHON_NO_FIELD,
    PYTHON_USE_THREAD_MAP,
    PYTHON_USE_TSS,
    PythonProcRecord,
    PythonThreadKey,
)
from agent.probes.settings import AllocConfig, OffCpuConfig, PythonSettings
from agent.process.python.layouts import (
    MAX_DEBUG_OFFSETS_SIZE,
    NO_FIELD,
    PythonLayout,
    layout_for_version,
    layout_from_debug_offsets,
)
from agent.process.python.objects import code_fingerprint
from agent.types import InterpreterStatus, code_key, split_code_key
from tests.support.config import profiling
from tests.support.workloads import WORKLOADS

pytestmark = pytest.mark.bpf

PYENV = Path("/root/.pyenv/versions")
INTERPRETERS = {
    "3.10": PYENV / "3.10.13/bin/python3",
    "3.11": PYENV / "3.11.7/bin/python3",
    "3.12": PYENV / "3.12.1/bin/python3",
    "3.13": PYENV / "3.13.0/bin/python3",
    "debian-3.11": Path("/usr/bin/python3.11"),
}
DEPTH = 5  # recurse(5) .. recurse(0): six recurse frames
SECONDS = "1.5"
FREQUENCY_HZ = 99
MAX_FRAMES = 96
Facts = dict[str, Any]  # what a child prints about itself


@dataclass
class Walker:
    program: ProbeProgram
    reader: PerfReader
    events: list[object]


@pytest.fixture(scope="module")
def walker() -> Iterator[Walker]:
    """One program for every test: the CPU and off-CPU (tracepoint) profilers, with the walker."""
    config = profiling("cpu", "offcpu", frequency_hz=FREQUENCY_HZ)
    events: list[object] = []
    probes = [
        CpuProbe(config, events.append),
        OffCpuProbe(config, events.append, OffCpuConfig(min_block_us=1000, attach="tracepoint")),
    ]
    program = ProbeProgram(config, probes, events.append, PythonSettings(enabled=True, max_frames=MAX_FRAMES))
    assert program.python_unavailable == "", program.python_unavailable
    assert program.defines["PYTHON_FRAMES"] == MAX_FRAMES
    program.load()
    try:
        program.attach()
        yield Walker(program, PerfReader(program), events)
    finally:
        program.close()


def record_for(layout: PythonLayout, tls_offset: int, flags: int) -> PythonProcRecord:
    """The python_procs value for `layout` (what the process stage builds for a validated process)."""
    flags |= PYTHON_INSTR_IS_INT if layout.instr_is_int else 0
    flags |= PYTHON_CODE_TAGGED if layout.code_tagged else 0

    def field(offset: int) -> int:
        return PYTHON_NO_FIELD if offset == NO_FIELD else offset

    return PythonProcRecord(
        tls_offset=tls_offset,
        tls_second_offset=0,
        flags=flags,
        tstate_frame=field(layout.tstate_frame),
        cframe_current_frame=field(layout.cframe_current_frame),
        frame_previous=field(layout.frame_previous),
        frame_code=field(layout.frame_code),
        frame_instr=field(layout.frame_instr),
        frame_is_entry=field(layout.frame_is_entry),
        frame_owner=field(layout.frame_owner),
        code_fingerprint=field(layout.code_fingerprint),
        owner_cstack=0 if layout.owner_cstack == NO_FIELD else layout.owner_cstack,
    )


def start_child(interpreter: Path, phases: str = "spin,nap") -> tuple[subprocess.Popen[str], Facts]:
    child = subprocess.Popen(
        [str(interpreter), str(WORKLOADS / "python_recursion.py"), str(DEPTH), SECONDS, phases],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        child.kill()
        pytest.fail(f"{interpreter} printed nothing (exit {child.wait()})")
    return child, json.loads(line)


def layout_of(facts: Facts) -> PythonLayout:
    version = tuple(facts["version"])
    if version >= (3, 13):
        assert len(facts["runtime_bytes"]) // 2 >= MAX_DEBUG_OFFSETS_SIZE
        return layout_from_debug_offsets(bytes.fromhex(facts["runtime_bytes"]))
    return layout_for_version((version[0], version[1]))


def release_and_read(walker: Walker, child: subprocess.Popen[str]) -> None:
    """Forget earlier events, open the child's gate, and read its events until it has exited."""
    walker.events.clear()
    assert child.stdin is not None
    child.stdin.write("g")
    child.stdin.flush()
    while child.poll() is None:
        walker.reader.poll(100)
    walker.reader.drain()


def run_child(
    walker: Walker, interpreter: Path, mode: str, child_and_facts: tuple[subprocess.Popen[str], Facts] | None = None
) -> tuple[int, Facts, PythonLayout, list[StackEvent]]:
    child, facts = child_and_facts or start_child(interpreter)
    pid = child.pid
    try:
        assert facts["pthread"] == facts["fs"]  # glibc's pthread_t is the TLS base the kernel keeps
        (tls_offset,) = facts["tls_offsets"]  # exactly one slot holds the thread's tstate
        layout = layout_of(facts)
        maps = walker.program.python_maps
        assert maps is not None
        enabled_ns = time.monotonic_ns()  # bpf_ktime_get_ns's clock
        if mode == "tss":
            assert maps.enable(pid, record_for(layout, tls_offset, PYTHON_USE_TSS))
        else:
            assert maps.enable(pid, record_for(layout, 0, PYTHON_USE_THREAD_MAP))
            assert maps.set_threads(pid, {facts["fs"]: facts["tstate"]})
        release_and_read(walker, child)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0
    # Not the samples from before the enable that were still in the buffers at the gate: never walked.
    events = [e for e in walker.events if isinstance(e, StackEvent) and e.pid == pid and e.timestamp_ns >= enabled_ns]
    return pid, facts, layout, events


def code_chain(event: StackEvent) -> list[int]:
    """The event's code objects, leaf first, without the shim frames."""
    words = event.python.frames[::2]
    return [word & ~PYTHON_FRAME_FLAGS for word in words if not word & PYTHON_FRAME_SHIM]


def child_code_keys(facts: Facts, layout: PythonLayout) -> dict[str, int]:
    """The code key of each of the child's functions: its code object's address and the fingerprint user
    space computes from the header the child printed, which must be the one the walker computed."""
    headers = facts["code_headers"]
    return {
        name: code_key(address, code_fingerprint(bytes.fromhex(headers[name]), layout))
        for name, address in facts["codes"].items()
    }


def check_frames(events: list[StackEvent], facts: Facts, layout: PythonLayout, leaf: str) -> None:
    codes = child_code_keys(facts, layout)
    expected = [codes[leaf]] + [codes["recurse"]] * (DEPTH + 1) + [codes["main"]]
    walked = [e for e in events if e.python.status is InterpreterStatus.OK]
    in_leaf = [e for e in walked if code_chain(e)[: len(expected)] == expected]
    statuses = Counter(e.python.status.name for e in events)
    # The leaf's phase is one loop of a single-threaded process: from its first sample to its last, every
    # sample is walked and carries exactly the leaf's chain. Outside it (the start-up after the gate, the
    # other phase, the exit) samples are walked too, with other chains.
    assert len(in_leaf) >= 20, (len(in_leaf), statuses)
    first, last = min(e.timestamp_ns for e in in_leaf), max(e.timestamp_ns for e in in_leaf)
    during = [e for e in events if first <= e.timestamp_ns <= last]
    odd = [(e.python.status.name, code_chain(e)) for e in during if e not in in_leaf]
    assert not odd, (len(during), odd[:5])
    # Outside the phase, unwalked samples are allowed: the exit tracepoint deletes the process's entry
    # while the rest of do_exit is still sampled, and an off-CPU block's stacks are taken when it begins
    # (the wait at the gate began before the enable) and stamped when it ends. (A 90% floor on the
    # leaf's share of every sample stood here; beside a CPU hog it failed with 20 of 168 samples
    # unwalked: the samples from before the enable, now left out in run_child, counted against it, and
    # so did the exit's.)
    for event in in_leaf:
        frames = event.python.frames
        for word, instr in zip(frames[::2], frames[1::2], strict=True):
            if word & PYTHON_FRAME_SHIM:
                continue
            code = split_code_key(word & ~PYTHON_FRAME_FLAGS)[0]
            if layout.instr_is_int:
                assert 0 <= instr < 1 << 16  # f_lasti: an index into the code
            else:  # a pointer into the code object's inline bytecode (co_code_adaptive)
                assert code < instr < code + (1 << 16), (hex(code), hex(instr))
    flags = {word & PYTHON_FRAME_FLAGS for e in in_leaf for word in e.python.frames[::2]}
    if layout.frame_is_entry != NO_FIELD:
        assert PYTHON_FRAME_ENTRY in flags  # 3.11: the module's frame (or main's) starts an eval call
    if layout.frame_owner != NO_FIELD:
        assert PYTHON_FRAME_SHIM in flags  # 3.12+: the C stack's shim under the first eval call


@pytest.mark.parametrize("mode", ["tss", "thread_map"])
@pytest.mark.parametrize("name", sorted(INTERPRETERS))
def test_cpu_and_offcpu_samples_carry_the_childs_code_objects(walker: Walker, name: str, mode: str) -> None:
    interpreter = INTERPRETERS[name]
    if not interpreter.exists():
        pytest.skip(f"{interpreter} is not installed")
    announced = walker.program.process_events["python_code"]
    pid, facts, layout, events = run_child(walker, interpreter, mode)
    # The walker says when it meets code it has not met (so the reader reads the buffers at once): at
    # least once for this new process, and at most once per code key its walks carried.
    new_code = walker.program.process_events["python_code"] - announced
    keys = {key for e in events for key in code_chain(e)}
    assert 1 <= new_code <= len(keys), (new_code, len(keys))
    cpu = [e for e in events if e.profiler == "cpu"]
    offcpu = [e for e in events if e.profiler == "offcpu"]
    # 1.5 s of CPU at 99 Hz: far more than 20 samples even on a busy host; 150 naps of 10 ms.
    assert len(cpu) >= 20 and len(offcpu) >= 20, (len(cpu), len(offcpu))
    check_frames(cpu, facts, layout, "spin")
    check_frames(offcpu, facts, layout, "nap")
    assert all(e.python.status is not InterpreterStatus.TRUNCATED for e in events)  # 9 frames < 96
    maps = walker.program.python_maps
    assert maps is not None
    # The exit tracepoint deleted what the kernel held for the child; user space forgets its own.
    bpf = walker.program._bpf
    assert ctypes.c_uint32(pid) not in bpf[b"python_procs"]
    assert PythonThreadKey(pid=pid, pthread=facts["fs"]) not in bpf[b"python_threads"]
    maps.forget(pid)
    assert maps.threads_of(pid) == frozenset()


def test_a_thread_without_a_thread_state_says_so(walker: Walker) -> None:
    """The thread map holds no entry for the child's thread: its samples say NO_THREAD_STATE."""
    interpreter = next((path for path in INTERPRETERS.values() if path.exists()), None)
    if interpreter is None:
        pytest.skip("no interpreter installed")
    child, facts = start_child(interpreter)
    maps = walker.program.python_maps
    assert maps is not None
    try:
        enabled_ns = time.monotonic_ns()
        assert maps.enable(child.pid, record_for(layout_of(facts), 0, PYTHON_USE_THREAD_MAP))
        release_and_read(walker, child)
    finally:
        child.kill()
        child.wait()
    cpu = [
        e
        for e in walker.events
        if isinstance(e, StackEvent) and e.pid == child.pid and e.profiler == "cpu" and e.timestamp_ns >= enabled_ns
    ]
    statuses = Counter(e.python.status for e in cpu)
    assert statuses[InterpreterStatus.NO_THREAD_STATE] >= 20, statuses
    # NONE only once the exit tracepoint has deleted the process's entry (the rest of do_exit): after
    # every NO_THREAD_STATE sample. (A 90% floor on their share stood here: samples from before the
    # enable, and a long exit beside a CPU hog, counted against it.)
    assert set(statuses) <= {InterpreterStatus.NO_THREAD_STATE, InterpreterStatus.NONE}, statuses
    last = max(e.timestamp_ns for e in cpu if e.python.status is InterpreterStatus.NO_THREAD_STATE)
    early = [e for e in cpu if e.python.status is InterpreterStatus.NONE and e.timestamp_ns < last]
    assert not early, (len(early), statuses)


@pytest.mark.parametrize("name", sorted(INTERPRETERS))
def test_allocation_samples_carry_the_allocating_function(name: str) -> None:
    """The allocation uprobes walk too: 1 MiB bytearrays allocated in grow() are sampled under grow."""
    interpreter = INTERPRETERS[name]
    if not interpreter.exists():
        pytest.skip(f"{interpreter} is not installed")
    child_and_facts = start_child(interpreter, "grow")
    config = profiling("alloc", pids=(child_and_facts[0].pid,))
    events: list[object] = []
    probe = AllocProbe(config, events.append, AllocConfig(sample_bytes=1 << 20))
    program = ProbeProgram(config, [probe], events.append, PythonSettings(enabled=True, max_frames=MAX_FRAMES))
    try:
        program.load()
        program.attach()
        walker = Walker(program, PerfReader(program), events)
        _, facts, layout, samples = run_child(walker, interpreter, "tss", child_and_facts)
    finally:
        program.close()
    allocations = [e for e in samples if e.profiler == "alloc"]
    # 1.5 s of 1 MiB allocations, each sampled with probability 1 - 1/e at R = 1 MiB.
    assert len(allocations) >= 20, len(allocations)
    check_frames(allocations, facts, layout, "grow")
