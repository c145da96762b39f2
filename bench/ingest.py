"""Scenario 4, ingest capacity: events per second one core turns into a profile (decode -> aggregate -> build).

Synthetic `struct stack_event` records (`bpf/common.h`, built with the ctypes mirror and truncated after
the last frame as the kernel sends them, then followed by the 4 bytes of padding a perf buffer adds
and never writes, here random bytes) with a realistic mix: 2,000 unique stacks over 50 processes
cloned from real ones, drawn with Zipf-like weights (a few hot stacks, a long tail), user stacks of
4-30 frames, a quarter with kernel frames. A small C library (`bench/workloads/ingest_driver.c`) hands
them to the agent's own perf-buffer callback through the same ctypes trampoline libbcc's perf reader
uses (`CFUNCTYPE(None, py_object, c_void_p, c_int)` and BCC's wrapper), in batches; the callback is the
CPU probe's (`BpfProbe.open_buffer`), so decoding and the bounded queue are the agent's. Then, on the
same thread, the daemon's `Pipeline` (process filter, keep sampler, aggregation, and the sums and
sorts at the interval end), then the `Symbolizer` and `build_pprof`. One warm-up interval fills the
caches; each timed interval holds as many events as one second at the target rate. The queue must
drop nothing. Times are the thread's CPU seconds (`time.thread_time`), so other load on the host does
not count against it.
"""

from __future__ import annotations

import ctypes
import random
import time
from collections.abc import Callable
from typing import Any

from agent.aggregate.types import IntervalProfile
from agent.config import load_config
from agent.flow.pipeline import Pipeline
from agent.flow.queue import DropOldestQueue
from agent.metadata.process import ProcessMetadata
from agent.metadata.selector import ProcessSelector
from agent.pprof.builder import build_pprof
from agent.probes.cpu import CpuProbe
from agent.probes.events import IntervalMark
from agent.probes.records import STACK_EVENT_HEADER_SIZE, StackEventRecord
from agent.process.registry import ProcessRegistry
from agent.sampling.keep import KeepSampler
from agent.symbolize.symbolizer import Symbolizer
from agent.types import Stack
from bench.context import Context
from bench.results import Check, ScenarioResult, Spread, Table
from bench.synthetic import FakeProc, StackFactory, capture_templates

EVENTS_PER_INTERVAL = 250_000
UNIQUE_STACKS = 2_000
PROCESSES = 50
BATCH = 1_024  # records per perf-reader wake-up
TARGET_EVENTS_PER_S = 250_000
PERF_PADDING = 4  # a raw sample's u32 size and its data are padded to whole u64s
RAW_CB = ctypes.CFUNCTYPE(None, ctypes.py_object, ctypes.c_void_p, ctypes.c_int)  # bcc.libbcc._RAW_CB_TYPE


class _CapturingTable:
    def __init__(self, callbacks: dict[str, Callable[..., None]], name: str) -> None:
        self._callbacks, self._name = callbacks, name

    def open_perf_buffer(self, callback: Callable[..., None], **options: Any) -> None:
        self._callbacks[self._name] = callback


class _CapturingBpf:
    """Stands in for `bcc.BPF` so the probe's real perf-buffer callback can be taken out and driven."""

    def __init__(self) -> None:
        self.callbacks: dict[str, Callable[..., None]] = {}

    def __getitem__(self, name: str | bytes) -> _CapturingTable:
        return _CapturingTable(self.callbacks, name.decode() if isinstance(name, bytes) else name)


def record_bytes(pid: int, tid: int, cpu: int, comm: str, kernel: Stack, user: Stack, stamp: int) -> bytes:
    record = StackEventRecord()
    record.timestamp_ns, record.pid, record.tid, record.cpu = stamp, pid, tid, cpu
    record.kernel_stack_len = len(kernel.addresses) if kernel.addresses else -14  # -EFAULT: user-mode sample
    record.user_stack_len = len(user.addresses)
    record.comm = comm.encode()[:15]
    frames = kernel.addresses + user.addresses
    for i, address in enumerate(frames):
        record.ips[i] = address
    return bytes(record)[: STACK_EVENT_HEADER_SIZE + 8 * len(frames)]


class Records:
    """EVENTS_PER_INTERVAL records in one buffer, with their offsets and sizes for the C driver."""

    def __init__(self, factory: StackFactory, pids: list[int], comms: dict[int, str], seed: int = 3) -> None:
        rng = random.Random(seed)
        unique = []
        for i in range(UNIQUE_STACKS):
            pid = pids[i % len(pids)]
            kernel, user = factory.stack_pair(pid)
            unique.append(record_bytes(pid, pid + i % 3, i % 2, comms[pid], kernel, user, 0))
        weights = [1.0 / (rank + 1) ** 1.1 for rank in range(UNIQUE_STACKS)]
        chosen = rng.choices(range(UNIQUE_STACKS), weights=weights, k=EVENTS_PER_INTERVAL)
        blob = b"".join(unique[i] + rng.randbytes(PERF_PADDING) for i in chosen)  # fresh garbage each time
        self.buffer = ctypes.create_string_buffer(blob, len(blob))
        sizes = [len(unique[i]) + PERF_PADDING for i in chosen]
        offsets, position = [], 0
        for size in sizes:
            offsets.append(position)
            position += size
        self.offsets = (ctypes.c_long * len(offsets))(*offsets)
        self.sizes = (ctypes.c_int * len(sizes))(*sizes)
        self.distinct = len(set(chosen))
        self.mean_bytes = len(blob) / len(sizes)


class Harness:
    """The agent's reader callback, queue, pipeline, symbolizer and builder, wired as the daemon wires them."""

    def __init__(self, ctx: Context, proc: FakeProc) -> None:
        config = load_config(environ={})
        self.queue: DropOldestQueue[object] = DropOldestQueue(config.profiling.queue_size)
        probe = CpuProbe(config.profiling, self.queue.put)
        probe._bpf = _CapturingBpf()  # the probe's own callback, minus the kernel
        probe.open_event_buffers()
        on_record = probe._bpf.callbacks["cpu_samples"]

        def raw_cb_(_: object, data: int, size: int) -> None:  # bcc.table's wrapper (its try costs nothing)
            on_record(0, data, size)

        self.callback = RAW_CB(raw_cb_)
        metadata = ProcessMetadata(proc.root)
        self.symbolizer = Symbolizer(ProcessRegistry(proc.root, metadata=metadata))
        self.delivered: list[IntervalProfile] = []
        selector = ProcessSelector(config.filters, metadata)
        processes = self.symbolizer.processes
        self.pipeline = Pipeline({"cpu": probe.spec}, processes, self.delivered.append, selector, KeepSampler())
        self.driver = ctypes.CDLL(str(ctx.binaries["ingest_driver"]))
        self.driver.drive.restype = None
        # The cookie is a py_object, as libbcc's bpf_open_perf_buffer_opts is declared: None arrives as Py_None.
        self.driver.drive.argtypes = (
            RAW_CB,
            ctypes.py_object,
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_long),
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_long,
            ctypes.c_long,
        )

    def interval(self, records: Records) -> dict[str, float]:
        """One interval's worth of records through every stage; seconds per stage."""
        decode = aggregate = 0.0
        for first in range(0, EVENTS_PER_INTERVAL, BATCH):
            count = min(BATCH, EVENTS_PER_INTERVAL - first)
            begun = time.thread_time()
            self.driver.drive(self.callback, None, records.buffer, records.offsets, records.sizes, first, count)
            read = time.thread_time()
            for item in self.queue.get_batch(0):
                self.pipeline.handle(item)
            decode, aggregate = decode + read - begun, aggregate + time.thread_time() - read
        begun = time.thread_time()
        self.queue.put(IntervalMark(time.monotonic_ns()))
        for item in self.queue.get_batch(0):
            self.pipeline.handle(item)  # the interval ends: the aggregator sums and sorts what it kept
        aggregate += time.thread_time() - begun
        interval = self.delivered.pop()
        begun = time.thread_time()
        profile = self.symbolizer.symbolize(interval)
        symbolized = time.thread_time()
        data = build_pprof(profile)
        built = time.thread_time()
        return {
            "decode_s": decode,
            "aggregate_s": aggregate,
            "symbolize_s": symbolized - begun,
            "build_s": built - symbolized,
            "samples": len(interval.samples),
            "pprof_bytes": len(data),
            "dropped": self.queue.dropped,
        }


def run(ctx: Context) -> ScenarioResult:
    templates = capture_templates([ctx.binaries["malloc_heavy"], ctx.binaries["ctxswitch"]])
    proc = FakeProc(ctx.directory("ingest") / "proc", templates, PROCESSES)
    comms = {pid: proc.template_of[pid].comm for pid in proc.pids}
    records = Records(StackFactory(proc), proc.pids, comms)
    harness = Harness(ctx, proc)
    harness.interval(records)  # warm-up: stack cache, ELF tables, process snapshots
    runs = [harness.interval(records) for _ in range(ctx.reps)]
    for r in runs:
        r["total_s"] = r["decode_s"] + r["aggregate_s"] + r["symbolize_s"] + r["build_s"]
        r["events_per_s"] = EVENTS_PER_INTERVAL / r["total_s"]
    return summarize(ctx, runs, records)


def summarize(ctx: Context, runs: list[dict[str, Any]], records: Records) -> ScenarioResult:
    result = ScenarioResult("ingest", "Ingest capacity (one core, in process)", __doc__ or "")
    rate = Spread.of(r["events_per_s"] for r in runs)
    per_event = {
        stage: Spread.of(1e6 * r[f"{stage}_s"] / EVENTS_PER_INTERVAL for r in runs)
        for stage in ("decode", "aggregate", "symbolize", "build")
    }
    rows = [
        ("perf callback + decode + queue", per_event["decode"].show(2)),
        ("pipeline: filter, keep, aggregate", per_event["aggregate"].show(2)),
        ("symbolize (per event, at interval end)", per_event["symbolize"].show(2)),
        ("build pprof (per event, at interval end)", per_event["build"].show(2)),
        ("**events per second, one core**", f"**{rate.show(0)}**"),
    ]
    result.tables.append(Table(("stage", "µs per event"), tuple(rows)))
    dropped = max(r["dropped"] for r in runs)
    result.checks.append(
        Check(
            f"ingest >= {TARGET_EVENTS_PER_S:,} events/s per core without loss",
            f"{rate.show(0)} events/s, {dropped} dropped",
            rate.median >= TARGET_EVENTS_PER_S and dropped == 0,
        )
    )
    result.notes.append(
        f"{ctx.reps} timed intervals of {EVENTS_PER_INTERVAL:,} events after one warm-up; {records.distinct:,} "
        f"distinct stacks drawn, {records.mean_bytes:.0f} bytes per record on average; "
        f"{runs[0]['samples']:,} aggregated samples per interval."
    )
    result.raw = {"runs": runs, "events_per_interval": EVENTS_PER_INTERVAL, "batch": BATCH}
    return result
