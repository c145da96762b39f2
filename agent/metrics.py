"""Metrics: the agent's Prometheus series, read from each stage's counters at scrape time.

Owns the one `CollectorRegistry` (with the standard process and platform collectors) and
`AgentCollector`, which turns the stages' plain counters into `profiling_agent_<stage>_<what>` series
when Prometheus scrapes. Stages keep ints and Counters and never import prometheus_client, so a
scrape costs the hot paths nothing.
"""

from __future__ import annotations

import bisect
import platform
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from agent import __version__
from agent.export.files import FileSink
from agent.export.otlp.sink import OtlpSink
from agent.export.otlp.stats import DROPPED, REJECTED_PROFILES, REQUESTS, RETRIES, SPOOL_ERRORS
from agent.probes.program import PROCESS_EVENTS
from agent.process.pidns import TASK_SKIP_REASONS
from agent.process.python.inspect import FALLBACK_REASONS
from agent.process.python.objects import CodeErrorReason
from agent.process.python.proc import RETRY_REASONS, PythonState
from agent.symbolize.debuginfo import SymbolSource
from agent.symbolize.jvm import Outcome
from agent.symbolize.python_merge import MergeOutcome
from agent.symbolize.stats import ErrorReason
from agent.types import StackStatus
from agent.unwind.unwinder import UNWIND_OUTCOMES

if TYPE_CHECKING:
    from agent.flow.pipeline import Pipeline
    from agent.flow.report import Reporter
    from agent.probes.bpf_probe import BpfProbe
    from agent.probes.program import ProbeProgram
    from agent.process.python.inspect import PythonInspector
    from agent.process.python.runtime import CodeResolver
    from agent.process.registry import ProcessRegistry
    from agent.sampling.keep import KeepSampler
    from agent.symbolize.jvm import JvmPerfMapRequester
    from agent.symbolize.symbolizer import Symbolizer
    from agent.unwind.unwinder import Unwinder

PREFIX = "profiling_agent"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class QueueStats(Protocol):
    dropped: int

    def __len__(self) -> int: ...


class MetricsSource(Protocol):
    """What the collector reads: the daemon's stages (see `agent.daemon.Daemon`). Read-only."""

    @property
    def probes(self) -> Sequence[BpfProbe]: ...

    @property
    def program(self) -> ProbeProgram: ...

    @property
    def keep(self) -> KeepSampler: ...

    @property
    def processes(self) -> ProcessRegistry: ...

    @property
    def symbolizer(self) -> Symbolizer: ...

    @property
    def unwinder(self) -> Unwinder | None: ...

    @property
    def jvm(self) -> JvmPerfMapRequester | None: ...

    @property
    def reporter(self) -> Reporter | None: ...

    @property
    def pipeline(self) -> Pipeline | None: ...

    @property
    def python_inspector(self) -> PythonInspector | None: ...

    @property
    def python_codes(self) -> CodeResolver | None: ...

    @property
    def sinks(self) -> Sequence[object]: ...

    @property
    def reloads(self) -> Counter[str]: ...

    @property
    def queues(self) -> dict[str, QueueStats]: ...

    @property
    def sampling_parameters(self) -> dict[tuple[str, str], float]: ...


class _LatencyHistogram:
    """Cumulative buckets fed from the OTLP sink's drained latencies at each scrape."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, values: Iterable[float]) -> None:
        for value in values:
            self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
            self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        cumulative, out = 0, list[tuple[str, float]]()
        for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), self.counts, strict=True):
            cumulative += count
            out.append((bound, cumulative))
        return out


def _known(counts: Mapping[str, int], labels: Iterable[str]) -> list[tuple[str, int]]:
    """`counts` with every label known at start-up present (0 until counted), sorted by label."""
    return sorted({**dict.fromkeys(map(str, labels), 0), **{str(k): v for k, v in counts.items()}}.items())


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))


def _counter_by(
    name: str, doc: str, label: str, counts: Mapping[str, int], known: Iterable[str]
) -> CounterMetricFamily:
    """A counter with one label: a series per known value (0 until counted) and per value counted."""
    family = _counter(name, doc, (label,))
    for value, count in _known(counts, known):
        family.add_metric([value], count)
    return family


class AgentCollector(Collector):
    """Reads the stages' counters at scrape time. Every labelled counter whose labels are known at start-up
    (losses, drops by reason, errors by kind, outcomes) is exported at 0 before anything happens: each
    stage creates its counters with those labels, so an alert on them can be written from the start."""

    def __init__(self, source: MetricsSource, registry: CollectorRegistry | None = None) -> None:
        self._source = source
        self._latency = _LatencyHistogram()
        if registry is not None:  # prometheus_client's way: a collector registers itself where it is told
            registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield from self._build_info()
        yield from self._probes()
        yield from self._pipeline()
        yield from self._unwinder()
        yield from self._symbolizer()
        yield from self._python()
        yield from self._export()
        reloads = _counter("config_reloads", "SIGHUP config reloads, by outcome.", ("outcome",))
        for outcome, count in sorted(self._source.reloads.items()):
            reloads.add_metric([outcome], count)
        yield reloads

    def _build_info(self) -> Iterator[Metric]:
        info = _gauge("build_info", "Agent version and runtime; always 1.", ("version", "python", "bcc"))
        info.add_metric([__version__, platform.python_version(), _bcc_version()], 1)
        yield info

    def _probes(self) -> Iterator[Metric]:
        attached = _gauge("probe_attached", "1 when the profiler's events are attached.", ("profiler", "method"))
        received = _counter("probe_events_received", "Records read from the perf buffers.", ("profiler",))
        lost = _counter("probe_events_lost", "Records the kernel dropped (perf buffer full).", ("profiler", "buffer"))
        malformed = _counter("probe_records_malformed", "Records that could not be decoded.", ("profiler",))
        stacks = _counter("probe_stacks", "Stacks decoded, by status.", ("profiler", "status"))
        for probe in self._source.probes:
            attached.add_metric([probe.name, probe.attach_method or "none"], 1 if probe.attach_method else 0)
            received.add_metric([probe.name], probe.stats.received)
            malformed.add_metric([probe.name], probe.stats.malformed)
            for buffer, count in _known(probe.stats.lost, probe.loss_labels()):
                lost.add_metric([probe.name, buffer], count)
            for status, count in _known(probe.stacks.status_counts, (status.name for status in StackStatus)):
                stacks.add_metric([probe.name, status.lower()], count)
        # The process-event buffer is shared by every profiler: its losses and malformed records are
        # reported under profiler="process".
        program = self._source.program
        malformed.add_metric(["process"], program.stats.malformed)
        for buffer, count in _known(program.stats.lost, (PROCESS_EVENTS,)):
            lost.add_metric(["process", buffer], count)
        processes = _counter(
            "probe_process_events",
            "Process events from the kernel: new (first record), exec, python_code (a Python walk met new code).",
            ("kind",),
        )
        for kind, count in sorted(program.process_events.items()):
            processes.add_metric([kind], count)
        sampling = _gauge("sampling_parameter", "Current sampling parameters.", ("profiler", "parameter"))
        for (profiler, parameter), value in sorted(self._source.sampling_parameters.items()):
            sampling.add_metric([profiler, parameter], value)
        yield from (attached, received, lost, malformed, stacks, processes, sampling)

    def _pipeline(self) -> Iterator[Metric]:
        depth = _gauge("pipeline_queue_depth", "Items waiting between threads.", ("queue",))
        dropped = _counter("pipeline_events_dropped", "Items dropped, by reason.", ("reason",))
        for name, queue in sorted(self._source.queues.items()):
            depth.add_metric([name], len(queue))
            dropped.add_metric([f"{name}_queue_full"], queue.dropped)
        pipeline = self._source.pipeline
        if pipeline is not None:
            dropped.add_metric(["filtered"], pipeline.filtered)
            dropped.add_metric(["unknown"], pipeline.unknown_items)
        rate = _gauge("pipeline_event_rate", "Events per second over the last interval.", ("profiler",))
        for profiler, value in sorted((pipeline.last_rates if pipeline else {}).items()):
            rate.add_metric([profiler], value)
        kept_out = _counter(
            "sampling_events_dropped",
            "Events the sampler's keep probability dropped (the kept ones stand for them: totals stay unbiased).",
            ("profiler",),
        )
        for profiler, count in sorted(self._source.keep.dropped.items()):
            kept_out.add_metric([profiler], count)
        yield from (depth, dropped, rate, kept_out)

    def _unwinder(self) -> Iterator[Metric]:
        unwinder = self._source.unwinder
        if unwinder is None:
            return  # every profiler walks frame pointers in the kernel: no unwind stage
        stacks = _counter("unwind_stacks", "User stacks through the unwind stage, by outcome.", ("outcome",))
        for outcome, count in _known(unwinder.outcomes, UNWIND_OUTCOMES):
            stacks.add_metric([outcome], count)
        frames = _counter("unwind_frames", "Frames unwound from stack copies, by how.", ("method",))
        frames.add_metric(["cfi"], unwinder.frames - unwinder.frame_pointer_steps)
        frames.add_metric(["frame_pointer"], unwinder.frame_pointer_steps)
        seconds = _counter("unwind_seconds", "Time the reader thread spent unwinding, table loading included.")
        seconds.add_metric([], unwinder.seconds)
        tables = _counter("unwind_tables", "Unwind tables read from binaries, by result.", ("result",))
        tables.add_metric(["loaded"], unwinder.tables_loaded)
        tables.add_metric(["failed"], unwinder.tables_failed)
        yield from (stacks, frames, seconds, tables)

    def _symbolizer(self) -> Iterator[Metric]:
        stats = self._source.symbolizer.stats
        hits = _counter("symbolize_cache_hits", "ELF symbol-table cache hits.")
        hits.add_metric([], stats.elf_cache_hits)
        misses = _counter("symbolize_cache_misses", "ELF symbol-table cache misses.")
        misses.add_metric([], stats.elf_cache_misses)
        errors = _counter("symbolize_errors", "Files, processes or tables that could not be used.", ("reason",))
        process_stats = self._source.processes.stats
        reasons = Counter(stats.errors)
        reasons["proc_unreadable"] = process_stats.unreadable  # the registry counts its own; same family
        for reason, count in _known(reasons, ErrorReason):
            errors.add_metric([reason], count)
        frames = _counter("symbolize_frames", "Frames, by whether they got a name.", ("result",))
        frames.add_metric(["named"], stats.frames_symbolized)
        frames.add_metric(["unnamed"], stats.frames_unsymbolized)
        processes = _counter("symbolize_processes", "Process snapshots, by event.", ("event",))
        for event in ("captured", "vanished", "refreshed", "expired", "laid_out"):
            processes.add_metric([event], getattr(process_stats, event))
        jit = _counter("symbolize_jit_addresses", "JIT addresses looked up in perf maps, by result.", ("result",))
        jit.add_metric(["named"], stats.perf_map_hits)
        jit.add_metric(["unnamed"], stats.perf_map_misses)
        sources = _counter("symbolize_symbol_tables", "ELF symbol tables loaded, by source.", ("source",))
        for source, count in _known(stats.symbol_sources, SymbolSource):
            sources.add_metric([source], count)
        sizes = _gauge("symbolize_cache_entries", "Entries in the symbolizer's caches.", ("cache",))
        caches = {**self._source.symbolizer.cache_sizes(), **self._source.processes.sizes()}
        for cache, size in sorted(caches.items()):
            sizes.add_metric([cache], size)
        yield from (hits, misses, errors, frames, processes, jit, sources, sizes)
        yield from self._python_names()

    def _python_names(self) -> Iterator[Metric]:
        stats = self._source.symbolizer.python.stats
        frames = _counter(
            "symbolize_python_frames", "Python frames, by whether their code object was read.", ("result",)
        )
        frames.add_metric(["resolved"], stats.frames_resolved)
        frames.add_metric(["unresolved"], stats.frames_unresolved)
        stacks = _counter(
            "symbolize_python_stacks",
            "Samples with Python frames, by how they merged with the native stack.",
            ("outcome",),
        )
        for outcome, count in _known(stats.stacks, MergeOutcome):
            stacks.add_metric([outcome], count)
        yield from (frames, stacks)
        if self._source.jvm is not None:
            requests = _counter(
                "symbolize_jvm_perf_map_requests", "Perf map requests to JVMs, by outcome.", ("outcome",)
            )
            for outcome, count in _known(self._source.jvm.outcomes, Outcome):
                requests.add_metric([outcome], count)
            yield requests

    def _python(self) -> Iterator[Metric]:
        inspector = self._source.python_inspector
        if inspector is None:
            return  # python.enabled is off, or the walker is not loaded: nothing is inspected
        processes = _gauge("python_processes", "Inspected processes, by their current Python state.", ("state",))
        for state, count in sorted(inspector.states().items()):
            processes.add_metric([state], count)
        states = (state.value for state in PythonState)
        inspections = _counter_by(
            "python_inspections", "Process inspections, by the state found.", "state", inspector.inspected, states
        )
        fallbacks = _counter_by(
            "python_thread_map_fallbacks",
            "Python processes walked through the thread map, by reason.",
            "reason",
            inspector.fallbacks,
            FALLBACK_REASONS,
        )
        unmapped = _counter_by(
            "python_tasks_unmapped",
            "Threads of inspected Python processes whose own pid namespace's tid was not read, by reason.",
            "reason",
            inspector.task_skips,
            TASK_SKIP_REASONS,
        )
        retries = _counter_by(
            "python_inspection_retries",
            "Inspections whose verdict is not final (a runtime not ready yet, a read torn by the process's"
            " churn): inspected again, by reason.",
            "reason",
            inspector.retried,
            RETRY_REASONS,
        )
        yield from (processes, inspections, fallbacks, unmapped, retries)
        codes = self._source.python_codes
        if codes is None:
            return
        stats = codes.cache.stats
        entries = _gauge("python_code_cache_entries", "Code objects cached, read from live Python processes.")
        entries.add_metric([], stats.entries)
        failed = _counter_by(
            "python_code_reads_failed",
            "Code object reads that failed, by reason.",
            "reason",
            stats.failures,
            CodeErrorReason,
        )
        yield from (entries, failed)

    def _export(self) -> Iterator[Metric]:
        reporter = self._source.reporter
        profiles = _counter("export_profiles", "Profiles handed to each sink, by outcome.", ("sink", "outcome"))
        intervals = _counter("report_intervals", "Intervals reported, by outcome.", ("outcome",))
        if reporter is not None:
            intervals.add_metric(["reported"], reporter.intervals - reporter.empty_intervals)
            intervals.add_metric(["empty"], reporter.empty_intervals)
            for name, count in sorted(reporter.exported.items()):
                profiles.add_metric([name, "ok"], count)
            for name, count in sorted(reporter.failed.items()):
                profiles.add_metric([name, "failed"], count)
        yield from (intervals, profiles)
        for sink in self._source.sinks:
            if isinstance(sink, FileSink):
                yield from _file_metrics(sink)
            elif isinstance(sink, OtlpSink):
                yield from self._otlp_metrics(sink)

    def _otlp_metrics(self, sink: OtlpSink) -> Iterator[Metric]:
        snapshot = sink.counters.snapshot()
        families = {
            REQUESTS: _counter("export_otlp_requests", "OTLP export requests, by outcome.", ("outcome",)),
            RETRIES: _counter("export_otlp_retries", "Retried OTLP attempts, by gRPC status.", ("code",)),
            DROPPED: _counter("export_otlp_dropped_batches", "OTLP requests dropped, by reason.", ("reason",)),
            SPOOL_ERRORS: _counter("export_otlp_spool_errors", "Spool I/O errors, by operation.", ("operation",)),
        }
        rejected = _counter("export_otlp_rejected_profiles", "Profiles the receiver rejected (partial success).")
        rejected.add_metric([], sum(v for (name, _), v in snapshot.items() if name == REJECTED_PROFILES))
        for (name, label), value in sorted(snapshot.items()):
            if name in families:
                families[name].add_metric([label], value)
        depth = _gauge("export_otlp_queue_depth", "OTLP requests waiting to be delivered.")
        depth.add_metric([], sink.queue_depth)
        spool = _gauge("export_otlp_spool_bytes", "Bytes of OTLP requests waiting on disk.")
        spool.add_metric([], sink.spool_bytes)
        self._latency.observe(sink.counters.drain_latencies())
        latency = HistogramMetricFamily(f"{PREFIX}_export_otlp_latency_seconds", "Latency of OTLP export calls.")
        latency.add_metric([], self._latency.buckets(), self._latency.total)
        yield from (*families.values(), rejected, depth, spool, latency)


def _file_metrics(sink: FileSink) -> Iterator[Metric]:
    written = _counter("export_files_written", "Profile files written.")
    written.add_metric([], sink.files_written)
    size = _counter("export_files_written_bytes", "Bytes of profile files written (compressed).")
    size.add_metric([], sink.bytes_written)
    deleted = _counter("export_files_deleted", "Profile files deleted by retention.")
    deleted.add_metric([], sink.files_deleted)
    evicted = _counter("export_files_evicted", "Own oldest profile files deleted to write a new one on a full disk.")
    evicted.add_metric([], sink.files_evicted)
    interrupted = _counter(
        "export_files_interrupted", "Profile files a previous run was killed while writing, deleted at start-up."
    )
    interrupted.add_metric([], sink.interrupted_writes)
    errors = _counter("export_files_errors", "File sink errors.")
    errors.add_metric([], sink.errors)
    yield from (written, size, deleted, evicted, interrupted, errors)


def _bcc_version() -> str:
    try:
        from bcc.version import __version__ as version
    except ImportError:
        return "unknown"
    return str(version)


def make_registry(source: MetricsSource) -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    AgentCollector(source, registry=registry)
    return registry
