"""Tests for the off-CPU probe (`agent.probes.offcpu`) without a kernel: what a record is worth, the
profile spec, the sampling parameters it writes, and the choice between the kprobe and the tracepoint.

A fake `bcc.BPF` stands in for the loaded program; the kernel's features come from fake trees.
"""

from __future__ import annotations

import ctypes
import dataclasses
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.errors import BpfAttachError
from agent.export.otlp.shapes import value_mapping
from agent.features import KernelFeatures, find_switch_symbol, kprobes_available, read_switch_symbol
from agent.probes import program
from agent.probes.bpf_probe import StackCopyPlan
from agent.probes.events import RecordHeader, StackEvent
from agent.probes.offcpu import (
    BLOCKED_ENTRIES,
    LOST_COUNTERS,
    MAX_SAMPLE_EVERY,
    MIN_STACK_ENTRIES,
    STACK_MAP_BYTES,
    WAKEUP_EVENTS,
    AttachPlan,
    OffCpuProbe,
    offcpu_profile_spec,
    offcpu_values,
    plan_attach,
)
from agent.probes.program import ProbeProgram
from agent.probes.records import PARAM_MIN_BLOCK_NS, PARAM_SAMPLING, STACK_EVENT_SIZE, StackEventRecord
from agent.probes.registry import PROBES
from agent.probes.settings import OffCpuConfig
from agent.types import StackStatus, ValueType
from tests.support.config import profiling

PROFILING = profiling("offcpu")
NO_KPROBES = KernelFeatures(hardware_cycles=False, kprobes=False, switch_symbol=None, task_regs_unavailable="")
KPROBES = KernelFeatures(
    hardware_cycles=False, kprobes=True, switch_symbol="finish_task_switch.isra.0", task_regs_unavailable=""
)
BPF_SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "agent.bpf.c"


def read_kernel_features(root: Path) -> tuple[bool, str | None]:
    """What the off-CPU hook depends on, read from a fake root as agent.features reads the real one."""
    kprobes = kprobes_available(root)
    return kprobes, read_switch_symbol(root) if kprobes else None


class FakeTable:
    def __init__(self) -> None:
        self.values: dict[int, int] = {}
        self.perf: tuple[Callable[[int, int, int], None], int, Callable[[int], None], int] | None = None

    def __setitem__(self, key: ctypes.c_int, value: ctypes.c_uint64) -> None:
        self.values[key.value] = value.value

    def __getitem__(self, key: ctypes.c_int) -> ctypes.c_uint64:
        return ctypes.c_uint64(self.values.get(key.value, 0))

    def open_perf_buffer(
        self,
        callback: Callable[[int, int, int], None],
        page_cnt: int,
        lost_cb: Callable[[int], None],
        wakeup_events: int,
    ) -> None:
        self.perf = (callback, page_cnt, lost_cb, wakeup_events)


class FakeBpf:
    """The parts of bcc.BPF the probe uses, recording every call."""

    def __init__(self, fail_attach: bool = False) -> None:
        self.tables: defaultdict[str, FakeTable] = defaultdict(FakeTable)
        self.calls: list[tuple[Any, ...]] = []
        self.perf_buffers: dict[int, int] = {}
        self._fail_attach = fail_attach

    def __getitem__(self, name: str | bytes) -> FakeTable:
        return self.tables[name.decode() if isinstance(name, bytes) else name]

    def attach_tracepoint(self, tp: bytes, fn_name: bytes) -> None:
        if self._fail_attach:
            raise Exception("Failed to attach BPF program")  # what bcc raises
        self.calls.append(("attach_tracepoint", tp, fn_name))

    def attach_kprobe(self, event: bytes, fn_name: bytes) -> None:
        if self._fail_attach:
            raise Exception("Failed to attach BPF program")
        self.calls.append(("attach_kprobe", event, fn_name))

    def detach_tracepoint(self, tp: bytes) -> None:
        self.calls.append(("detach_tracepoint", tp))

    def detach_kprobe(self, event: bytes) -> None:
        self.calls.append(("detach_kprobe", event))

    def perf_buffer_consume(self) -> None:
        self.calls.append(("consume",))

    def cleanup(self) -> None:
        self.calls.append(("cleanup",))


@dataclass
class Loaded:
    probe: OffCpuProbe
    bpf: FakeBpf
    defines: dict[str, int | str]
    emitted: list[object]


Load = Callable[..., Loaded]


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> Load:
    """A probe loaded into a FakeBpf, on a kernel with the given features."""

    def load(
        kernel: KernelFeatures = NO_KPROBES, offcpu_config: OffCpuConfig | None = None, fail_attach: bool = False
    ) -> Loaded:
        fake = FakeBpf(fail_attach)
        defines: dict[str, int | str] = {}

        def load_program(name: str, given: dict[str, int | str]) -> FakeBpf:
            assert name == "agent"
            defines.update(given)
            return fake

        monkeypatch.setattr(program, "load_program", load_program)
        emitted: list[object] = []
        probe = OffCpuProbe(PROFILING, emitted.append, offcpu_config, features=kernel)
        ProbeProgram(PROFILING, [probe], emitted.append).load()
        return Loaded(probe, fake, defines, emitted)

    return load


def record(value: int, sampling: int, user: tuple[int, ...] = (0x401000, 0x402000)) -> StackEventRecord:
    r = StackEventRecord(timestamp_ns=5, value=value, sampling=sampling, pid=10, tid=11, cpu=1)
    r.kernel_stack_len, r.user_stack_len = 0, len(user)
    for i, address in enumerate(user):
        r.ips[i] = address
    r.comm = b"waiter"
    return r


def header(r: StackEventRecord) -> RecordHeader:
    """The record's fixed part, as the decoder hands it to `offcpu_values`."""
    return RecordHeader._make(getattr(r, name) for name in RecordHeader._fields)


# --- what a record is worth -------------------------------------------------------------------------


def test_a_kept_block_stands_for_n_blocks_and_n_times_its_time() -> None:
    assert offcpu_values(header(record(value=2_500_000, sampling=1))) == (1.0, 2_500_000.0)
    assert offcpu_values(header(record(value=2_500_000, sampling=8))) == (8.0, 20_000_000.0)


def test_a_record_without_a_sampling_value_counts_once() -> None:
    assert offcpu_values(header(record(value=1_000_000, sampling=0))) == (1.0, 1_000_000.0)


def test_spec_names_events_and_off_cpu_time_without_a_period() -> None:
    spec = offcpu_profile_spec()
    assert spec.name == "offcpu"
    assert spec.sample_types == (ValueType("events", "count"), ValueType("off_cpu", "nanoseconds"))
    assert (spec.period_type, spec.period) == (ValueType("", ""), 0)
    mapping = value_mapping(spec)  # OTLP carries off_cpu/nanoseconds, with no period (Pyroscope: off_cpu)
    assert (mapping.sample_type, mapping.period_type, mapping.period) == (spec.sample_types[1], ValueType("", ""), 0)


def test_records_from_the_buffer_are_decoded_with_their_weights(loaded: Load) -> None:
    it = loaded()
    it.probe.open_event_buffers()
    perf = it.bpf.tables["offcpu_samples"].perf
    assert perf is not None
    callback, pages, _, wakeup = perf
    assert (pages, wakeup) == (PROFILING.perf_buffer_pages, WAKEUP_EVENTS)
    sent = record(value=3_000_000, sampling=4)
    callback(0, ctypes.addressof(sent), StackEventRecord.ips.offset + 2 * 8)
    [event] = it.emitted
    assert isinstance(event, StackEvent)
    assert (event.profiler, event.pid, event.tid, event.comm) == ("offcpu", 10, 11, "waiter")
    assert event.values == (4.0, 12_000_000.0)
    assert event.user.status is StackStatus.OK and event.user.addresses == (0x401000, 0x402000)


# --- parameters -------------------------------------------------------------------------------------


def test_parameters_start_at_one_in_one_and_the_configured_minimum() -> None:
    assert OffCpuProbe(PROFILING, lambda _: None).parameters() == {"sample_every": 1, "min_block_us": 1000}
    probe = OffCpuProbe(PROFILING, lambda _: None, OffCpuConfig(min_block_us=250, attach="auto"))
    assert probe.parameters() == {"sample_every": 1, "min_block_us": 250}


def test_load_writes_sampling_and_minimum_in_nanoseconds(loaded: Load) -> None:
    it = loaded(offcpu_config=OffCpuConfig(min_block_us=250, attach="auto"))
    fake, defines = it.bpf, it.defines
    assert fake.tables["offcpu_params"].values == {PARAM_SAMPLING: 1, PARAM_MIN_BLOCK_NS: 250_000}
    assert defines["USE_KPROBE"] == 0
    assert (defines["BLOCKED_ENTRIES"], defines["STACK_ENTRIES"]) == (BLOCKED_ENTRIES, 4096)
    assert defines["FILTER_PIDS"] == 0


def test_set_sample_every_before_load_is_written_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeBpf()
    monkeypatch.setattr(program, "load_program", lambda name, defines: fake)
    probe = OffCpuProbe(PROFILING, lambda _: None, features=NO_KPROBES)
    probe.set_sample_every(7)
    assert probe.parameters()["sample_every"] == 7
    ProbeProgram(PROFILING, [probe], lambda _: None).load()
    assert fake.tables["offcpu_params"].values[PARAM_SAMPLING] == 7


def test_set_sample_every_on_a_loaded_probe_takes_effect_at_once(loaded: Load) -> None:
    it = loaded()
    probe, fake = it.probe, it.bpf
    probe.set_sample_every(32)
    assert fake.tables["offcpu_params"].values[PARAM_SAMPLING] == 32
    assert probe.parameters() == {"sample_every": 32, "min_block_us": 1000}


@pytest.mark.parametrize("bad", [0, -1, MAX_SAMPLE_EVERY + 1])
def test_set_sample_every_rejects_values_out_of_range(loaded: Load, bad: int) -> None:
    it = loaded()
    probe, fake = it.probe, it.bpf
    with pytest.raises(ValueError, match="sample_every"):
        probe.set_sample_every(bad)
    assert fake.tables["offcpu_params"].values[PARAM_SAMPLING] == 1 and probe.parameters()["sample_every"] == 1


def test_drain_reports_blocks_the_kernel_could_not_follow(loaded: Load) -> None:
    it = loaded()
    probe, fake = it.probe, it.bpf
    drained = ProbeProgram(PROFILING, [probe], lambda _: None)
    drained.load()
    drained.read_kernel_counts()
    assert probe.stats.lost == {}
    fake.tables["offcpu_lost_counts"].values[1] = 3
    drained.read_kernel_counts()
    assert probe.stats.lost == {"stacks_evicted": 3}
    fake.tables["offcpu_lost_counts"].values.update({0: 2, 1: 5})  # the kernel's counters only grow
    drained.read_kernel_counts()
    assert probe.stats.lost == {"blocked_map_full": 2, "stacks_evicted": 5}


# --- choosing the hook ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "kernel", "expected"),
    [
        ("auto", KPROBES, AttachPlan("finish_task_switch.isra.0")),
        ("auto", NO_KPROBES, AttachPlan(None)),
        ("auto", dataclasses.replace(KPROBES, switch_symbol=None), AttachPlan(None)),
        ("kprobe", KPROBES, AttachPlan("finish_task_switch.isra.0")),
        ("tracepoint", KPROBES, AttachPlan(None)),
        ("tracepoint", NO_KPROBES, AttachPlan(None)),
    ],
)
def test_plan_attach(mode: str, kernel: KernelFeatures, expected: AttachPlan) -> None:
    assert plan_attach(mode, kernel) == expected


def test_forcing_a_kprobe_without_kprobes_is_an_attach_error() -> None:
    with pytest.raises(BpfAttachError, match=r"'kprobe' but this kernel has no kprobes.*auto or tracepoint"):
        plan_attach("kprobe", NO_KPROBES)
    with pytest.raises(BpfAttachError, match="finish_task_switch is not in /proc/kallsyms"):
        plan_attach("kprobe", dataclasses.replace(KPROBES, switch_symbol=None))


def test_an_unknown_mode_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="auto, kprobe, tracepoint"):
        plan_attach("fentry", KPROBES)


def test_plan_descriptions_name_the_hook() -> None:
    assert AttachPlan(None).description == "sched:sched_switch tracepoint"
    assert AttachPlan("finish_task_switch.isra.0").description == "kprobe finish_task_switch.isra.0"


def test_forced_kprobe_fails_at_load_when_the_kernel_has_none(loaded: Load) -> None:
    with pytest.raises(BpfAttachError, match="no kprobes"):
        loaded(NO_KPROBES, OffCpuConfig(min_block_us=1000, attach="kprobe"))


def test_find_switch_symbol_prefers_the_plain_name() -> None:
    lines = [
        "ffffffff813a2270 t __pfx_finish_task_switch.isra.0",
        "ffffffff813a2280 t finish_task_switch.isra.0",
        "ffffffff813a2300 t finish_task_switch",
    ]
    assert find_switch_symbol(lines) == "finish_task_switch"
    assert find_switch_symbol(lines[:2]) == "finish_task_switch.isra.0"


def test_find_switch_symbol_ignores_other_symbols() -> None:
    lines = [
        "ffffffff813a2270 t __pfx_finish_task_switch.isra.0",
        "ffffffff813a2290 t finish_task_switch.cold",
        "ffffffff823a2280 d finish_task_switch",  # data, not text
        "ffffffff813a2280 T finish_task_switch_hook [some_module]",
        "garbage",
    ]
    assert find_switch_symbol(lines) is None


def test_read_kernel_features_from_a_fake_root(tmp_path: Path) -> None:
    assert read_kernel_features(tmp_path) == (False, None)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/kallsyms").write_text("ffffffff813a2280 t finish_task_switch.isra.0\n")
    assert read_kernel_features(tmp_path) == (False, None)  # the symbol alone is not enough
    tracefs = tmp_path / "sys/kernel/tracing"
    tracefs.mkdir(parents=True)
    (tracefs / "kprobe_events").write_text("")
    assert read_kernel_features(tmp_path) == (True, "finish_task_switch.isra.0")


def test_the_kprobe_pmu_alone_means_kprobes(tmp_path: Path) -> None:
    pmu = tmp_path / "sys/bus/event_source/devices/kprobe"
    pmu.mkdir(parents=True)
    (pmu / "type").write_text("6\n")
    assert read_kernel_features(tmp_path) == (True, None)  # no kallsyms


# --- attaching --------------------------------------------------------------------------------------


def test_tracepoint_attach_and_detach(loaded: Load) -> None:
    it = loaded(NO_KPROBES)
    probe, fake = it.probe, it.bpf
    probe.attach()
    assert ("attach_tracepoint", b"sched:sched_switch", b"on_sched_switch") in fake.calls
    assert probe.attach_method == "sched:sched_switch tracepoint"
    probe.stop_sampling()
    probe.stop_sampling()  # a second stop detaches nothing
    assert fake.calls.count(("detach_tracepoint", b"sched:sched_switch")) == 1


def test_kprobe_attach_and_detach(loaded: Load) -> None:
    it = loaded(KPROBES)
    probe, fake, defines = it.probe, it.bpf, it.defines
    assert defines["USE_KPROBE"] == 1
    probe.attach()
    assert ("attach_kprobe", b"finish_task_switch.isra.0", b"on_finish_task_switch") in fake.calls
    assert probe.attach_method == "kprobe finish_task_switch.isra.0"
    probe.stop_sampling()
    fake.cleanup()
    assert ("detach_kprobe", b"finish_task_switch.isra.0") in fake.calls and fake.calls[-1] == ("cleanup",)


def test_a_failed_attach_is_a_bpf_attach_error(loaded: Load) -> None:
    probe = loaded(NO_KPROBES, fail_attach=True).probe
    with pytest.raises(BpfAttachError, match="sched:sched_switch tracepoint"):
        probe.attach()
    assert probe.attach_method == ""


def test_the_program_defines_what_the_probe_uses() -> None:
    source = BPF_SOURCE.read_text()
    indices = dict(re.findall(r"#define (LOST_\w+) (\d+)", source))
    assert (indices["LOST_START_FULL"], indices["LOST_STACKS_EVICTED"], indices["LOST_COUNT"]) == ("0", "1", "2")
    assert LOST_COUNTERS == ("blocked_map_full", "stacks_evicted")
    for name in ("int on_sched_switch(", "int on_finish_task_switch(", "offcpu_lost_counts", "BPF_ARRAY(offcpu_params"):
        assert name in source


def test_the_registry_builds_the_profiler_with_its_config() -> None:
    from agent.config import load_config

    config = load_config(environ={"PROFILING_AGENT_OFFCPU_MIN_BLOCK_US": "250"})
    probe = PROBES["offcpu"](config, lambda event: None, StackCopyPlan(), NO_KPROBES)
    assert isinstance(probe, OffCpuProbe)
    assert probe.parameters()["min_block_us"] == 250


def test_stack_map_keeps_its_memory_when_records_carry_a_stack_copy() -> None:
    probe = OffCpuProbe(PROFILING, lambda _: None, features=NO_KPROBES)
    assert probe.defines["OFFCPU_STACK_BYTES"] == 0
    probe = OffCpuProbe(PROFILING, lambda _: None, stacks=StackCopyPlan(8192), features=NO_KPROBES)
    entries = probe.defines["STACK_ENTRIES"]
    assert probe.defines["OFFCPU_STACK_BYTES"] == 8192
    # Fewer entries than with frame pointers only (4096), as many as the budget holds.
    assert isinstance(entries, int) and MIN_STACK_ENTRIES <= entries < STACK_MAP_BYTES // STACK_EVENT_SIZE
    assert (entries + 1) * (STACK_EVENT_SIZE + 8192) > STACK_MAP_BYTES
    assert entries * (STACK_EVENT_SIZE + 8192) <= STACK_MAP_BYTES
