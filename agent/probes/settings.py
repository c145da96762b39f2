"""Probes stage: its configuration sections, `profiling`, `offcpu`, `alloc` and `python`.

`profiling` says what the probes collect and how often the pipeline reports; `offcpu` and `alloc` tune
their profilers; `python` says whether every profiler walks Python frames, and how many (the process
stage reads it too, to decide whether to inspect Python processes at all). Each field is declared
once, with its default, parser, help and flag (see `agent.settings`); `agent.config` gathers the
sections and loads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from agent.settings import as_list, choice, parse_bool, ranged_float, ranged_int, setting

KNOWN_PROFILERS = ("cpu", "offcpu", "alloc")
# MAX_MEAN in bpf/alloc_math.h: the allocation threshold arithmetic stays within 64 bits.
MAX_SAMPLE_BYTES = 1 << 40
# PYTHON_MAX_FRAMES in bpf/common.h: the room struct stack_event has for Python frames.
PYTHON_MAX_FRAMES = 128


def parse_profilers(value: Any) -> tuple[str, ...]:
    items = as_list(value)
    names = tuple(dict.fromkeys(str(item).strip().lower() for item in items if str(item).strip()))
    if not names:
        raise ValueError("expected at least one profiler")
    unknown = [name for name in names if name not in KNOWN_PROFILERS]
    if unknown:
        raise ValueError(f"unknown profiler {unknown[0]!r}; known: {', '.join(KNOWN_PROFILERS)}")
    return names


PID_MAX_LIMIT = 4_194_304  # the kernel's largest pid_max on 64-bit (include/linux/threads.h)


def parse_pids(value: Any) -> tuple[int, ...]:
    pids = []
    for item in as_list(value):
        text = str(item).strip()
        if not re.fullmatch(r"[1-9][0-9]{0,9}", text):
            raise ValueError(f"expected process ids (positive integers), got {item!r}")
        if int(text) > PID_MAX_LIMIT:  # the BPF filter keys are u32: 2^32 + P would profile P
            raise ValueError(f"process id {text} is above the kernel's limit ({PID_MAX_LIMIT})")
        pids.append(int(text))
    return tuple(sorted(set(pids)))


@dataclass(frozen=True, slots=True)
class ProfilingConfig:
    """What the probes collect and how often the pipeline reports."""

    SECTION: ClassVar[str] = "profiling"

    profilers: tuple[str, ...] = setting(("cpu",), parse_profilers, "Profilers to run, comma-separated.", "--profilers")
    frequency_hz: int = setting(19, ranged_int(1, 1000), "CPU sampling frequency per CPU (Hz).", "--frequency")
    interval_s: float = setting(10.0, ranged_float(1.0, 3600.0), "Reporting interval (s).", "--interval")
    duration_s: float = setting(
        0.0,
        ranged_float(0.0, 1e9),
        "Stop after this long, counted from when sampling starts, then flush and exit 0 (0: run until stopped).",
        "--duration",
    )
    pids: tuple[int, ...] = setting(
        (), parse_pids, "Profile only these processes (repeatable flag).", "--pid", flag_repeats=True
    )
    perf_buffer_pages: int = setting(
        64, ranged_int(1, 4096), "Perf buffer size per CPU, in pages (rounded up to a power of two)."
    )
    queue_size: int = setting(
        65536,
        ranged_int(1024, 1 << 24),
        "Records buffered between the perf-buffer reader and the pipeline; the oldest are dropped (and counted) "
        "when it is full.",
    )


@dataclass(frozen=True, slots=True)
class OffCpuConfig:
    """Time threads spend blocked (scheduled out), with the stack they blocked in."""

    SECTION: ClassVar[str] = "offcpu"

    min_block_us: int = setting(
        1000, ranged_int(1, 60_000_000), "Blocks shorter than this are not reported (microseconds)."
    )
    attach: str = setting(
        "auto",
        choice("auto", "kprobe", "tracepoint"),
        "How to hook the scheduler: a kprobe on finish_task_switch where the kernel has kprobes, else the "
        "sched:sched_switch tracepoint (auto), or force one.",
    )


@dataclass(frozen=True, slots=True)
class AllocConfig:
    """Bytes allocated through the C library, sampled in the kernel by bytes."""

    SECTION: ClassVar[str] = "alloc"

    sample_bytes: int = setting(
        512 * 1024,
        ranged_int(1, MAX_SAMPLE_BYTES),
        "Mean bytes between allocation samples (the starting point; the adaptive sampler adjusts it).",
    )


@dataclass(frozen=True, slots=True)
class PythonSettings:
    """Python functions in every profiler's stacks: the BPF walker of CPython's frame chain (docs/python.md)."""

    SECTION: ClassVar[str] = "python"

    enabled: bool = setting(
        True,
        parse_bool,
        "Walk the frames of CPython processes (3.10+) in every profiler, and name their Python functions.",
    )
    max_frames: int = setting(
        96,
        ranged_int(1, PYTHON_MAX_FRAMES),
        "Python frames kept per sample, innermost first; deeper stacks lose their outermost callers.",
    )


@dataclass(frozen=True, slots=True)
class JvmSettings:
    """Java methods in the stacks of HotSpot JVMs, named from the JVM's own vmStructs (agent/flow/jvm.py)."""

    SECTION: ClassVar[str] = "jvm"

    enabled: bool = setting(
        True,
        parse_bool,
        "Name the Java methods HotSpot JVMs (JDK 11+) interpret, read from each JVM's own tables, in the"
        " profilers that unwind stack copies (unwind auto or dwarf); no signal or attach is ever sent.",
    )


class StackCopies(Protocol):
    """The `unwind` section as the probes see it (`agent.unwind.settings.UnwindConfig`): per profiler, its
    mode as an attribute and the user stack bytes its program copies. A protocol, so that the probes do
    not import a stage downstream of them."""

    def copy_bytes(self, profiler: str) -> int: ...


class ProbesConfig(Protocol):
    """The sections the probe registry builds the probes from (`agent.config.AgentConfig` has them)."""

    @property
    def profiling(self) -> ProfilingConfig: ...
    @property
    def offcpu(self) -> OffCpuConfig: ...
    @property
    def alloc(self) -> AllocConfig: ...
    @property
    def python(self) -> PythonSettings: ...
    @property
    def unwind(self) -> StackCopies: ...
