"""The metrics collector over a stand-in daemon, and docs/metrics.md kept in step with it."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from agent.daemon import RELOAD_OUTCOMES
from agent.export.files import FileSink
from agent.export.otlp.config import OtlpConfig
from agent.export.otlp.sink import OtlpSink
from agent.export.otlp.stats import REQUESTS
from agent.flow.report import Reporter
from agent.metrics import AgentCollector, make_registry
from agent.probes.bpf_probe import ReaderStats
from agent.probes.offcpu import OffCpuProbe
from agent.probes.program import ProbeProgram
from agent.probes.stacks import StackDecoder
from agent.process.python.code_cache import CodeCache
from agent.process.python.inspect import Interpreter, NotWalkable, PythonInspector
from agent.process.python.proc import PythonState
from agent.process.python.runtime import CodeResolver
from agent.process.python.threads import MemoryReader
from agent.process.registry import ProcessRegistry
from agent.sampling.keep import KeepSampler
from agent.symbolize.jvm import JvmPerfMapRequester
from agent.symbolize.symbolizer import Symbolizer
from agent.unwind.unwinder import Unwinder
from tests.support.config import profiling

CATALOGUE = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def fake_source(spool_dir: str = "/tmp/profiling-agent-test-spool") -> Any:
    stacks = StackDecoder()
    stacks.status_counts.update({"OK": 5, "MISSING": 1})
    probe = SimpleNamespace(
        name="cpu",
        attach_method="software cpu-clock at 19 Hz per CPU",
        stats=ReaderStats(received=42, malformed=1, lost={"samples": 3}),
        stacks=stacks,
        loss_labels=lambda: ("samples",),
    )
    otlp = OtlpSink(OtlpConfig(enabled=True, insecure=True, spool_dir=spool_dir))
    files = FileSink(Path(spool_dir).parent / "profiles", max_files=10, max_bytes=0)
    otlp.counters.inc(REQUESTS, "success", 4)
    otlp.counters.observe_latency(0.02)
    reporter = SimpleNamespace(intervals=3, empty_intervals=1, exported=Counter(files=2), failed=Counter(otlp=1))
    pipeline = SimpleNamespace(filtered=7, unknown_items=0, last_rates={"cpu": 38.0})
    program = SimpleNamespace(
        stats=ReaderStats(received=3, malformed=0, lost={"proc_events": 1}), process_events=Counter(new=2, exec=1)
    )
    processes = ProcessRegistry()
    python = PythonInspector(_not_python)
    python.inspect(1)
    return SimpleNamespace(
        python_inspector=python,
        python_codes=CodeResolver(CodeCache(8), python),
        probes=[probe],
        program=program,
        processes=processes,
        symbolizer=Symbolizer(processes),
        unwinder=Unwinder(),
        jvm=JvmPerfMapRequester(60.0),
        reporter=reporter,
        pipeline=pipeline,
        sinks=[files, otlp],
        reloads=Counter(applied=1),
        keep=KeepSampler(profilers=("cpu",)),
        queues={"events": _Queue(2), "intervals": _Queue(0)},
        sampling_parameters={("cpu", "frequency_hz"): 19.0},
    )


def _not_python(pid: int, memory: MemoryReader) -> Interpreter:
    raise NotWalkable(PythonState.NOT_PYTHON, "no_runtime")


class _Queue:
    def __init__(self, dropped: int) -> None:
        self.dropped = dropped

    def __len__(self) -> int:
        return 1


def exposition(tmp_path: Path) -> str:
    registry = CollectorRegistry()
    registry.register(AgentCollector(fake_source(str(tmp_path / "spool"))))
    return generate_latest(registry).decode()


def test_series_carry_the_stage_counters(tmp_path: Path) -> None:
    text = exposition(tmp_path)
    assert 'profiling_agent_probe_events_received_total{profiler="cpu"} 42.0' in text
    assert 'profiling_agent_probe_events_lost_total{buffer="samples",profiler="cpu"} 3.0' in text
    assert 'profiling_agent_probe_stacks_total{profiler="cpu",status="missing"} 1.0' in text
    assert 'profiling_agent_probe_events_lost_total{buffer="proc_events",profiler="process"} 1.0' in text
    assert 'profiling_agent_probe_process_events_total{kind="new"} 2.0' in text
    assert 'profiling_agent_pipeline_events_dropped_total{reason="filtered"} 7.0' in text
    assert 'profiling_agent_pipeline_events_dropped_total{reason="events_queue_full"} 2.0' in text
    assert 'profiling_agent_export_otlp_requests_total{outcome="success"} 4.0' in text
    assert 'profiling_agent_export_otlp_latency_seconds_bucket{le="0.025"} 1.0' in text
    assert 'profiling_agent_export_profiles_total{outcome="failed",sink="otlp"} 1.0' in text
    assert 'profiling_agent_config_reloads_total{outcome="applied"} 1.0' in text
    assert 'profiling_agent_sampling_parameter{parameter="frequency_hz",profiler="cpu"} 19.0' in text
    assert 'profiling_agent_python_processes{state="not_python"} 1.0' in text
    assert 'profiling_agent_python_processes{state="enabled"} 0.0' in text
    assert 'profiling_agent_python_inspections_total{state="not_python"} 1.0' in text


def test_registry_adds_the_standard_process_collector(tmp_path: Path) -> None:
    text = generate_latest(make_registry(fake_source(str(tmp_path / "spool")))).decode()
    assert "process_resident_memory_bytes" in text
    assert "profiling_agent_build_info{" in text


def test_docs_metrics_lists_every_series_and_no_other(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    registry.register(AgentCollector(fake_source(str(tmp_path / "spool"))))
    emitted = {family.name + ("_total" if family.type == "counter" else "") for family in registry.collect()}
    documented = set(re.findall(r"^\| `(profiling_agent_[a-z_]+)`", CATALOGUE.read_text(), re.M))
    assert documented == emitted, f"missing from docs: {emitted - documented}; stale in docs: {documented - emitted}"


def test_counters_with_known_labels_are_exported_at_zero_before_anything_happens(tmp_path: Path) -> None:
    """What an alert needs: every labelled counter whose labels are known at start-up exists at 0."""
    probe = OffCpuProbe(profiling("offcpu"), lambda _: None)
    otlp = OtlpSink(OtlpConfig(enabled=True, insecure=True, spool_dir=str(tmp_path / "spool")))
    files = FileSink(tmp_path / "profiles", max_files=10, max_bytes=0)
    processes = ProcessRegistry()
    source = SimpleNamespace(
        probes=[probe],
        program=ProbeProgram(profiling("offcpu"), [probe], lambda _: None),
        processes=processes,
        symbolizer=Symbolizer(processes),
        unwinder=Unwinder(),
        jvm=JvmPerfMapRequester(60.0),
        reporter=Reporter(Symbolizer(processes), [files, otlp]),
        pipeline=SimpleNamespace(filtered=0, unknown_items=0, last_rates={}),
        python_inspector=PythonInspector(_not_python),
        python_codes=CodeResolver(CodeCache(8), PythonInspector(_not_python)),
        sinks=[files, otlp],
        reloads=Counter(dict.fromkeys(RELOAD_OUTCOMES, 0)),
        keep=KeepSampler(profilers=("offcpu",)),
        queues={"events": _Queue(0), "intervals": _Queue(0)},
        sampling_parameters={},
    )
    registry = CollectorRegistry()
    AgentCollector(source, registry=registry)
    text = generate_latest(registry).decode()
    expected = [
        'probe_events_lost_total{buffer="offcpu_samples",profiler="offcpu"} 0.0',
        'probe_events_lost_total{buffer="stacks_evicted",profiler="offcpu"} 0.0',
        'probe_events_lost_total{buffer="blocked_map_full",profiler="offcpu"} 0.0',
        'probe_events_lost_total{buffer="proc_events",profiler="process"} 0.0',
        'probe_stacks_total{profiler="offcpu",status="truncated"} 0.0',
        'probe_process_events_total{kind="new"} 0.0',
        'pipeline_events_dropped_total{reason="events_queue_full"} 0.0',
        'sampling_events_dropped_total{profiler="offcpu"} 0.0',
        'unwind_stacks_total{outcome="truncated"} 0.0',
        'symbolize_errors_total{reason="elf_unreadable"} 0.0',
        'symbolize_errors_total{reason="proc_unreadable"} 0.0',
        'symbolize_symbol_tables_total{source="minidebuginfo"} 0.0',
        'symbolize_jvm_perf_map_requests_total{outcome="refused"} 0.0',
        'symbolize_python_frames_total{result="unresolved"} 0.0',
        'symbolize_python_stacks_total{outcome="extra_python"} 0.0',
        'symbolize_python_stacks_total{outcome="no_thread_state"} 0.0',
        'export_profiles_total{outcome="failed",sink="otlp"} 0.0',
        'export_profiles_total{outcome="failed",sink="files"} 0.0',
        'export_otlp_requests_total{outcome="rejected"} 0.0',
        'export_otlp_dropped_batches_total{reason="spool_full"} 0.0',
        'export_otlp_retries_total{code="UNAVAILABLE"} 0.0',
        'export_otlp_spool_errors_total{operation="write"} 0.0',
        'config_reloads_total{outcome="invalid"} 0.0',
        'python_processes{state="validation_failed"} 0.0',
        'python_inspections_total{state="enabled"} 0.0',
        'python_thread_map_fallbacks_total{reason="tss_mismatch"} 0.0',
        'python_code_reads_failed_total{reason="not_code"} 0.0',
    ]
    missing = [line for line in expected if f"profiling_agent_{line}" not in text]
    assert not missing, missing
