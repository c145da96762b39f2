"""Scenario: DWARF unwinding, its CPU cost per sample and what it finds that a frame-pointer walk loses.

Runs in the benchmark's own process. For each workload the CPU probe
(`agent.probes.cpu.CpuProbe`) samples it at 99 Hz, limited to its pid, with an 8 KiB copy of the user
stack in every record; the benchmark polls the perf buffer itself and, while the process is alive (its
mappings are read from /proc), hands every sample to the unwinder (`agent.unwind.unwinder.Unwinder`,
which unwinds alike for `unwind.*=auto` and `dwarf`), timing each call with `time.thread_time` (CPU
time of this thread). It unwinds a copy of each record taken out of the ring, where the agent's
reader unwinds the record in place inside the callback: the same steps, over memory already cached.
The first second of samples warms them (unwind tables read, FDEs decoded as addresses turn up) and is
reported on its own; the next seconds are measured. The workloads are single-threaded: Debian's
`/usr/bin/python3` in a busy loop (no frame pointers in python3 or libc),
`tests/workloads/frameless_leaf` (frame pointers, but a hot leaf without one, called 3:1 from
`caller_a` and `caller_b`) and `bench/workloads/busy.c` with one thread (frame pointers throughout
its own code, which is where its time goes; libc's start-up frames keep none). The stacks the kernel
walked by frame pointer (`event.user`) and the unwound ones are compared by naming frames of the main
executable from its symbol table: whether the outermost frame is `_start` (the stack reaches the
thread's entry) and whether a caller known to be on every stack is there.
"""

from __future__ import annotations

import logging
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.probes.bpf_probe import StackCopyPlan
from agent.probes.cpu import CpuProbe
from agent.probes.events import StackEvent
from agent.probes.program import ProbeProgram
from agent.probes.reader import PerfReader
from agent.probes.records import stack_record_size
from agent.probes.settings import ProfilingConfig
from agent.process.elf import read_elf
from agent.process.maps import load_bias, read_process_maps
from agent.types import Stack, StackStatus
from agent.unwind.unwinder import Unwinder
from bench.build import REPO
from bench.context import Context
from bench.results import ScenarioResult, Spread, Table

logger = logging.getLogger(__name__)

HZ = 99
STACK_BYTES = 8192
WARMUP_S = 1.0
MEASURE_S = 8.0
MODES = ("dwarf",)  # auto unwinds the same way (it differs only on kernels that cannot copy the stack)
SOURCES = ("fp", *MODES)  # fp: the kernel's frame-pointer walk, as the record carries it
PROC = Path("/proc")
PY_BUSY = REPO / "tests" / "workloads" / "python_busy.py"  # the unwinding tests' workload too


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    label: str
    argv: tuple[str, ...]  # a name in ctx.binaries first, or an absolute path
    anchors: tuple[str, ...]  # functions of the executable on (nearly) every true stack

    def command(self, ctx: Context) -> list[str]:
        program = self.argv[0]
        return [program if program.startswith("/") else str(ctx.binaries[program]), *self.argv[1:]]


WORKLOADS = (
    # `main` is not in python3's dynamic symbol table: Py_BytesMain, which it calls, is.
    Workload(
        "python3",
        "Debian /usr/bin/python3 (no frame pointers)",
        ("/usr/bin/python3", str(PY_BUSY), "0"),
        ("Py_BytesMain",),
    ),
    Workload(
        "frameless_leaf",
        "frameless_leaf (frame pointers, frameless leaf)",
        ("frameless_leaf", "3600"),
        ("caller_a", "caller_b"),
    ),
    # gcc folds spin_leaf's loop to a constant: the time goes to clock_gettime, in libc and the vDSO.
    Workload("busy", "busy.c, one thread (frame pointers)", ("busy", "0", "1"), ("main",)),
)


class ExeNames:
    """Names of the addresses that fall in the process's main executable ("" elsewhere)."""

    def __init__(self, pid: int) -> None:
        maps = read_process_maps(PROC, pid)
        symbols = read_elf(PROC / str(pid) / "exe", maps.exe_path)
        self._symbols = symbols
        self._ranges = [
            (m.start, m.end, load_bias(m, segment))
            for m in maps.mappings
            if m.path == maps.exe_path and (segment := symbols.segment_for_offset(m.offset)) is not None
        ]
        self._memo: dict[int, str] = {}

    def name(self, address: int) -> str:
        found = self._memo.get(address)
        if found is None:
            bias = next((b for start, end, b in self._ranges if start <= address < end), None)
            found = self._memo[address] = "" if bias is None else self._symbols.lookup(address - bias)
        return found

    def frames(self, stack: Stack) -> list[str]:
        """Leaf first; callers by their call instruction (return address - 1)."""
        return [self.name(a - (i > 0)) for i, a in enumerate(stack.addresses)]


@dataclass(slots=True)
class Tally:
    """One stack source over the measured samples of one run."""

    micros: list[float] = field(default_factory=list)  # CPU per unwind call
    frames: int = 0
    entry: int = 0  # outermost frame in _start
    anchored: int = 0  # a known caller found
    samples: int = 0
    complete: int = 0  # unwound to the outermost frame (status OK from the unwinder)

    def add(self, stack: Stack, names: ExeNames, anchors: tuple[str, ...], kept: bool = False) -> None:
        named = names.frames(stack)
        self.samples += 1
        self.complete += not kept and stack.status is StackStatus.OK
        self.frames += len(stack.addresses)
        self.entry += bool(named) and named[-1] == "_start"
        self.anchored += any(name in anchors for name in named)

    def summary(self) -> dict[str, float]:
        n = max(1, self.samples)
        figures = {
            "samples": self.samples,
            "frames": self.frames / n,
            "entry_percent": 100 * self.entry / n,
            "anchor_percent": 100 * self.anchored / n,
            "complete_percent": 100 * self.complete / n,
        }
        if self.micros:
            ordered = sorted(self.micros)
            figures |= {
                "us_median": statistics.median(ordered),
                "us_mean": statistics.fmean(ordered),
                "us_p90": ordered[int(0.9 * (len(ordered) - 1))],
                "us_max": ordered[-1],
            }
        return figures


def profiling_config(pid: int) -> ProfilingConfig:
    return ProfilingConfig(
        profilers=("cpu",),
        frequency_hz=HZ,
        interval_s=10.0,
        duration_s=0.0,
        pids=(pid,),
        perf_buffer_pages=64,
        queue_size=65536,
    )


def decoded_fdes(unwinder: Unwinder, pid: int) -> int:
    """FDEs decoded so far in the tables of the process's binaries; loads the tables not loaded yet."""
    tables = set()
    for entry in read_process_maps(PROC, pid).mappings:
        located = unwinder.tables.for_mapping(pid, entry)
        if located is not None:
            tables.add(located[0])
    return sum(table.decoded_fdes for table in tables)


class Run:
    """One workload sampled once: its events unwound live, both modes, from the same records.

    Events are placed by their timestamp (CLOCK_MONOTONIC, as `time.monotonic_ns`): before `warm_ns`
    they warm the unwinders, up to `end_ns` they are measured, later ones are left alone."""

    def __init__(self, workload: Workload, pid: int, warm_ns: int, end_ns: int) -> None:
        self.workload, self.pid, self.warm_ns, self.end_ns = workload, pid, warm_ns, end_ns
        self.unwinders = {mode: Unwinder() for mode in MODES}
        self.names = ExeNames(pid)
        self.tallies = {source: Tally() for source in SOURCES}
        self.warmup_cpu = dict.fromkeys(MODES, 0.0)
        self.record_bytes: list[int] = []
        self.fp_record_bytes: list[int] = []

    def handle(self, event: StackEvent) -> None:
        if event.user_copy is None or event.pid != self.pid or event.timestamp_ns >= self.end_ns:
            return
        measured, anchors = event.timestamp_ns >= self.warm_ns, self.workload.anchors
        if measured:
            self.tallies["fp"].add(event.user, self.names, anchors)
            kernel, user = len(event.kernel.addresses), len(event.user.addresses)
            python = len(event.python.frames) // 2
            self.record_bytes.append(stack_record_size(kernel, user, python, len(event.user_copy.data)))
            self.fp_record_bytes.append(stack_record_size(kernel, user, python))
        for mode in MODES:
            begun = time.thread_time()
            stack = self.unwinders[mode].unwind(event)
            spent = time.thread_time() - begun
            if measured:
                self.tallies[mode].micros.append(1e6 * spent)
                self.tallies[mode].add(stack, self.names, anchors, kept=stack is event.user)
            else:
                self.warmup_cpu[mode] += spent

    def summary(self) -> dict[str, Any]:
        figures: dict[str, Any] = {source: tally.summary() for source, tally in self.tallies.items()}
        for mode, unwinder in self.unwinders.items():
            figures[mode] |= {
                "tables_loaded": unwinder.tables.stats.loaded,
                "tables_failed": unwinder.tables.stats.failed,
                "table_load_ms": 1e3 * unwinder.tables.stats.load_seconds,
                "warmup_cpu_ms": 1e3 * self.warmup_cpu[mode],
                "frame_pointer_steps_percent": 100 * unwinder.frame_pointer_steps / max(1, unwinder.frames),
            }
        for mode, unwinder in self.unwinders.items():  # last: it reads (empty) tables of unsampled binaries
            figures[mode]["fdes_decoded"] = decoded_fdes(unwinder, self.pid)
        figures["record_bytes"] = statistics.median(self.record_bytes or [0])
        figures["fp_record_bytes"] = statistics.median(self.fp_record_bytes or [0])
        return figures


def sample(ctx: Context, workload: Workload) -> dict[str, Any]:
    """Like the agent's reader, poll until the buffer wakes (once per HZ records) and handle the batch."""
    process = subprocess.Popen(workload.command(ctx), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events: list[object] = []
    config = profiling_config(process.pid)
    probe = CpuProbe(config, events.append, StackCopyPlan(STACK_BYTES))
    program = ProbeProgram(config, [probe], events.append)
    try:
        program.load()
        program.attach()
        reader = PerfReader(program)
        warm_ns = time.monotonic_ns() + int(WARMUP_S * 1e9)
        run = Run(workload, process.pid, warm_ns, warm_ns + int(MEASURE_S * 1e9))
        while True:
            done = time.monotonic_ns() >= run.end_ns
            if done:
                reader.drain()  # what arrived since the last wake-up
            else:
                reader.poll(250)
            for event in events:
                if isinstance(event, StackEvent):
                    run.handle(event)
            events.clear()
            if done:
                break
        if process.poll() is not None:
            raise RuntimeError(f"{workload.name} exited early with status {process.returncode}")
        return run.summary()
    finally:
        program.close()
        process.kill()
        process.wait()


def timer_overhead_us() -> float:
    """What one `time.thread_time()` pair costs: in every figure, not subtracted."""
    spent = []
    for _ in range(1000):
        begun = time.thread_time()
        spent.append(time.thread_time() - begun)
    return 1e6 * statistics.median(spent)


def spread(runs: list[dict[str, Any]], *keys: str) -> Spread:
    """The spread over runs of the figure at `keys` (nested dicts)."""
    values = []
    for run in runs:
        value: Any = run
        for key in keys:
            value = value.get(key, {})
        values.append(float(value) if isinstance(value, int | float) else float("nan"))
    return Spread.of(values)


Rows = tuple[tuple[str, ...], ...]
COST = (("us_median", 1, ""), ("us_p90", 1, ""), ("us_max", 0, ""), ("frames", 1, ""), ("complete_percent", 1, "%"))
COST_COLUMNS = (
    *("workload", "mode", "CPU per sample, µs (median)", "p90, µs", "max, µs", "frames per sample"),
    "complete (ended at the outermost frame)",
    *(f"mean CPU per sample x {HZ} Hz, % of one core per busy CPU", "samples measured per run"),
)


def cost_rows(by_workload: dict[str, list[dict[str, Any]]]) -> Rows:
    rows = []
    for workload in WORKLOADS:
        runs = by_workload[workload.name]
        for mode in MODES:
            cells = [spread(runs, mode, key).show(digits, unit) for key, digits, unit in COST]
            share = f"{spread(runs, mode, 'us_mean').median * HZ / 1e4:.3f}%"
            rows.append((workload.label, "auto / dwarf", *cells, share, spread(runs, mode, "samples").show(0)))
    return tuple(rows)


SOURCE_LABELS = {"fp": "frame pointers (kernel walk)", "dwarf": "unwound with CFI (auto / dwarf)"}
REACH_COLUMNS = ("workload", "user stack", "frames per sample", "outermost frame is `_start`", "has the known caller")


def reach_rows(by_workload: dict[str, list[dict[str, Any]]]) -> Rows:
    rows = []
    for workload in WORKLOADS:
        runs, anchors = by_workload[workload.name], " or ".join(f"`{a}`" for a in workload.anchors)
        for source in SOURCES:
            frames, entry = spread(runs, source, "frames").show(1), spread(runs, source, "entry_percent").show(1, "%")
            anchored = f"{anchors}: {spread(runs, source, 'anchor_percent').show(1, '%')}"
            rows.append((workload.label, SOURCE_LABELS[source], frames, entry, anchored))
    return tuple(rows)


ONE_OFF_COLUMNS = (
    *("workload", f"bytes per record: frame pointers only / with the {STACK_BYTES // 1024} KiB copy"),
    *("unwind tables read (dwarf)", "table reading CPU, ms (one-off)"),
    *(
        f"unwinding CPU in the first {WARMUP_S:g} s, ms (tables included)",
        "FDEs decoded (functions with CFI rules read)",
    ),
    "frames found by frame pointer for lack of CFI",
)


def one_off_rows(by_workload: dict[str, list[dict[str, Any]]]) -> Rows:
    rows = []
    for workload in WORKLOADS:
        runs = by_workload[workload.name]
        loaded, failed = spread(runs, "dwarf", "tables_loaded"), spread(runs, "dwarf", "tables_failed")
        rows.append(
            (
                workload.label,
                f"{spread(runs, 'fp_record_bytes').show(0)} / {spread(runs, 'record_bytes').show(0)}",
                f"{loaded.median:.0f}, {failed.median:.0f} failed",
                spread(runs, "dwarf", "table_load_ms").show(1),
                spread(runs, "dwarf", "warmup_cpu_ms").show(1),
                spread(runs, "dwarf", "fdes_decoded").show(0),
                spread(runs, "dwarf", "frame_pointer_steps_percent").show(1, "%"),
            )
        )
    return tuple(rows)


def summarize(ctx: Context, by_workload: dict[str, list[dict[str, Any]]], overhead_us: float) -> ScenarioResult:
    result = ScenarioResult("unwind", "DWARF unwinding: cost per sample and what it finds", __doc__ or "")
    result.tables.append(Table(COST_COLUMNS, cost_rows(by_workload)))
    result.tables.append(Table(REACH_COLUMNS, reach_rows(by_workload)))
    result.tables.append(Table(ONE_OFF_COLUMNS, one_off_rows(by_workload)))
    result.notes += [
        f"{ctx.reps} runs per workload, each {WARMUP_S:g} s of warm-up then {MEASURE_S:g} s measured at {HZ} Hz; "
        f"A `time.thread_time()` pair alone costs "
        f"{overhead_us:.2f} µs (included in the figures, not subtracted).",
        "The buffer wakes the reader once per "
        f"{HZ} records, as in the agent; the first unwind of each batch finds cold caches and costs a few "
        "times the median (the tail). The share of a core uses the mean, and counts unwinding alone; the agent's "
        "whole steady-state cost with unwinding on (its default) is in the steady-state section.",
        "Record sizes are what the program sends (perf's own header not counted): the fixed part and both "
        "stacks without a copy; the fixed part, every `ips` slot and the copied chunks with one (the copy "
        "stops at the top of the stack).",
    ]
    result.raw = {"runs": by_workload, "hz": HZ, "stack_bytes": STACK_BYTES, "measure_s": MEASURE_S}
    return result


def run(ctx: Context) -> ScenarioResult:
    overhead = timer_overhead_us()
    by_workload: dict[str, list[dict[str, Any]]] = {w.name: [] for w in WORKLOADS}
    for rep in range(ctx.reps):
        for workload in WORKLOADS:
            logger.info("unwind: %s, run %d", workload.name, rep + 1)
            by_workload[workload.name].append(sample(ctx, workload))
    return summarize(ctx, by_workload, overhead)
