"""Probes stage: the off-CPU profiler (`bpf/agent.bpf.c`, section PROFILE_OFFCPU): where threads wait.

Hooks the scheduler with a kprobe on `finish_task_switch` where the kernel has kprobes, else with the
`sched:sched_switch` tracepoint (`offcpu.attach` can force either; the choice is a pure function of the
setting and the kernel's features from `agent.features`, logged once and reported as `attach_method`).
Each record is one block of at least `offcpu.min_block_us`, kept with probability 1/N in the kernel; it stands for N
blocks and N times its blocked nanoseconds, so totals stay unbiased whatever N the adaptive sampler
sets through `set_sample_every`. Blocks the kernel could not follow (its per-thread maps full) are read
from the program's `offcpu_lost_counts` at every drain and reported with the perf-buffer losses. With
`unwind.offcpu = auto|dwarf` each record's user stack copy is unwound by the decoder, inside the
perf-buffer callback on the reader thread.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

from agent.errors import BpfAttachError
from agent.features import KernelFeatures, kernel_features
from agent.probes.bpf_probe import FRAME_POINTERS, BpfProbe, Emit, StackCopyPlan
from agent.probes.events import RecordHeader, StackEventDecoder
from agent.probes.records import PARAM_MIN_BLOCK_NS, PARAM_SAMPLING, STACK_EVENT_SIZE
from agent.probes.settings import OffCpuConfig, ProfilingConfig
from agent.types import ProfileSpec, ValueType

logger = logging.getLogger(__name__)

DEFAULT_OFFCPU = OffCpuConfig()
# Blocked threads the kernel follows at once (`offcpu_start`: ~90 bytes each, preallocated: 1.4 MiB); more are
# counted as lost. On the tracepoint path their stacks wait in an LRU map of records (~4.1 KiB each with
# room for the Python frames, plus the user stack copy when unwinding with DWARF; preallocated): it gets
# STACK_MAP_BYTES, so 4096 entries with frame pointers only and ~1,380 with an 8 KiB stack copy. Beyond
# it the longest-idle threads lose their stacks (counted when they wake).
BLOCKED_ENTRIES = 16384
STACK_MAP_BYTES = 4096 * STACK_EVENT_SIZE
MIN_STACK_ENTRIES = 256
# Blocks are few (each lasts >= min_block_us): batch ~16 per wakeup; the reader drains partial
# batches at every interval end.
WAKEUP_EVENTS = 16
# bpf_get_prandom_u32() % N is biased by at most N / 2**32: negligible up to here.
MAX_SAMPLE_EVERY = 1 << 24
# The program's lost_counts, by index, as reported with the perf-buffer losses.
LOST_COUNTERS = ("blocked_map_full", "stacks_evicted")  # LOST_START_FULL, LOST_STACKS_EVICTED

ATTACH_MODES = ("auto", "kprobe", "tracepoint")
TRACEPOINT = "sched:sched_switch"


@dataclass(frozen=True, slots=True)
class AttachPlan:
    kprobe_symbol: str | None  # None: the sched:sched_switch tracepoint

    @property
    def description(self) -> str:
        if self.kprobe_symbol is None:
            return f"{TRACEPOINT} tracepoint"
        return f"kprobe {self.kprobe_symbol}"


def plan_attach(mode: str, kernel: KernelFeatures) -> AttachPlan:
    """`offcpu.attach` (auto | kprobe | tracepoint) against what the kernel offers."""
    if mode not in ATTACH_MODES:
        raise ValueError(f"offcpu.attach must be one of {', '.join(ATTACH_MODES)}, not {mode!r}")
    if mode == "tracepoint":
        return AttachPlan(None)
    if kernel.switch_kprobe:
        return AttachPlan(kernel.switch_kprobe)
    if mode == "auto":
        return AttachPlan(None)
    why = (
        "this kernel has no kprobes (CONFIG_KPROBES off, or tracefs not mounted)"
        if not kernel.kprobes
        else "finish_task_switch is not in /proc/kallsyms"
    )
    raise BpfAttachError(f"offcpu.attach is 'kprobe' but {why}; set offcpu.attach to auto or tracepoint")


def offcpu_profile_spec() -> ProfileSpec:
    # Values are already weighted estimates, so there is no sampling period: no period type and
    # period 0, as opentelemetry-ebpf-profiler sends off-CPU profiles (Pyroscope names them off_cpu).
    return ProfileSpec(
        name="offcpu",
        sample_types=(ValueType("events", "count"), ValueType("off_cpu", "nanoseconds")),
        period_type=ValueType("", ""),
        period=0,
    )


def offcpu_values(record: RecordHeader) -> tuple[float, float]:
    """A block kept with probability 1/N stands for N blocks and N times its blocked time."""
    weight = max(record.sampling, 1)
    return float(weight), float(weight * record.value)


class OffCpuProbe(BpfProbe):
    name = "offcpu"

    def __init__(
        self,
        config: ProfilingConfig,
        emit: Emit,
        offcpu: OffCpuConfig | None = None,
        stacks: StackCopyPlan = FRAME_POINTERS,
        features: KernelFeatures | None = None,
    ) -> None:
        super().__init__(config, emit, stacks)
        self._features = features
        self._offcpu = offcpu or DEFAULT_OFFCPU
        self._sample_every = 1
        self._plan: AttachPlan | None = None
        self._attached: AttachPlan | None = None

    @property
    def spec(self) -> ProfileSpec:
        return offcpu_profile_spec()

    @property
    def plan(self) -> AttachPlan:
        """The hook to use, decided once (BpfAttachError when `kprobe` is forced and impossible)."""
        if self._plan is None:
            self._plan = plan_attach(self._offcpu.attach, self._features or kernel_features())
        return self._plan

    def parameters(self) -> dict[str, float]:
        return {"sample_every": self._sample_every, "min_block_us": self._offcpu.min_block_us}

    adaptive = True  # the adaptive sampler steers N (its floor, 1, keeps every qualifying block)

    def set_sampling(self, value: int) -> None:
        self.set_sample_every(min(value, MAX_SAMPLE_EVERY))

    def set_sample_every(self, n: int) -> None:
        """Keep 1 in `n` blocks from now on (each kept one weighs `n`); takes effect at once if loaded."""
        if not 1 <= n <= MAX_SAMPLE_EVERY:
            raise ValueError(f"sample_every must be in [1, {MAX_SAMPLE_EVERY}], got {n}")
        self._sample_every = n
        if self._bpf is not None:
            self.write_param(PARAM_SAMPLING, n)

    @property
    def stack_entries(self) -> int:
        """Blocked threads whose stacks the tracepoint path keeps at once, within STACK_MAP_BYTES."""
        return max(MIN_STACK_ENTRIES, STACK_MAP_BYTES // (STACK_EVENT_SIZE + self.user_stack_bytes))

    def extra_defines(self) -> dict[str, int | str]:
        return {
            "USE_KPROBE": 0 if self.plan.kprobe_symbol is None else 1,
            "BLOCKED_ENTRIES": BLOCKED_ENTRIES,
            "STACK_ENTRIES": self.stack_entries,
        }

    def loaded(self, bpf: object) -> None:
        super().loaded(bpf)
        self.write_param(PARAM_SAMPLING, self._sample_every)
        self.write_param(PARAM_MIN_BLOCK_NS, self._offcpu.min_block_us * 1000)

    def open_event_buffers(self) -> None:
        decode = StackEventDecoder(self.name, self.stacks, offcpu_values, unwind=self.unwind_copy).decode
        self.open_buffer(self.samples_buffer, decode, self._config.perf_buffer_pages, WAKEUP_EVENTS, stack_records=True)

    def attach_events(self) -> None:
        plan = self.plan
        try:
            if plan.kprobe_symbol is None:
                self._bpf.attach_tracepoint(tp=TRACEPOINT.encode(), fn_name=b"on_sched_switch")
            else:
                self._bpf.attach_kprobe(event=plan.kprobe_symbol.encode(), fn_name=b"on_finish_task_switch")
        except Exception as e:  # bcc raises bare Exception
            raise BpfAttachError(f"could not attach the off-CPU program to the {plan.description}: {e}") from e
        self._attached = plan
        self.attach_method = plan.description

    def detach_events(self) -> None:
        plan, self._attached = self._attached, None
        if plan is None:
            return
        if plan.kprobe_symbol is None:
            self._bpf.detach_tracepoint(tp=TRACEPOINT.encode())
        else:
            self._bpf.detach_kprobe(event=plan.kprobe_symbol.encode())

    def loss_labels(self) -> tuple[str, ...]:
        return (*super().loss_labels(), *LOST_COUNTERS)

    def refresh(self) -> None:
        """Read the in-kernel loss counters every adjustment too, not only at interval ends: the adaptive
        sampler counts them as demand (`agent.sampling.adaptive`) and must see evictions within a tick."""
        self.drain()

    def drain(self) -> None:
        if self._bpf is None:
            return
        counts = self._bpf[b"offcpu_lost_counts"]
        for index, label in enumerate(LOST_COUNTERS):
            lost = counts[ctypes.c_int(index)].value
            if lost:
                self.stats.lost[label] = lost
