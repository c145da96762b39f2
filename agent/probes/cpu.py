"""Probes stage: the CPU profiler (`bpf/agent.bpf.c`, section PROFILE_CPU).

Attaches a sampling perf event to every online CPU (hardware cycles where a PMU exists, else the
software cpu-clock, as `agent.features` found: the choice is logged once and reported as
`attach_method`) and reads the `cpu_samples` perf buffer with batched wakeups. Every sample stands
for one period of CPU time. With `unwind.cpu = auto|dwarf` each record's user stack copy is unwound
by the decoder, inside the perf-buffer callback on the reader thread.
"""

from __future__ import annotations

from agent.errors import BpfAttachError
from agent.features import (
    PERF_COUNT_HW_CPU_CYCLES,
    PERF_COUNT_SW_CPU_CLOCK,
    PERF_TYPE_HARDWARE,
    PERF_TYPE_SOFTWARE,
    KernelFeatures,
    kernel_features,
)
from agent.probes.bpf_probe import FRAME_POINTERS, BpfProbe, Emit, StackCopyPlan
from agent.probes.events import StackEventDecoder
from agent.probes.settings import ProfilingConfig
from agent.types import ProfileSpec, ValueType

EVENT_SOURCES = (
    (PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES, "hardware cpu-cycles"),
    (PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK, "software cpu-clock"),
)
# Wake the reader about once a second per busy CPU: each wake-up and the hand-off to the pipeline
# cost far more than decoding (measured at 19 Hz: ~72 us of CPU per event when waking per sample);
# new processes are announced through their own buffer, which wakes at once, and the reader drains
# partial batches at every interval end.
WAKEUPS_PER_SECOND = 1


def cpu_profile_spec(frequency_hz: int) -> ProfileSpec:
    return ProfileSpec(
        name="cpu",
        sample_types=(ValueType("samples", "count"), ValueType("cpu", "nanoseconds")),
        period_type=ValueType("cpu", "nanoseconds"),
        period=round(1e9 / frequency_hz),
    )


class CpuProbe(BpfProbe):
    name = "cpu"

    _attached: tuple[int, int] | None = None

    def __init__(
        self,
        config: ProfilingConfig,
        emit: Emit,
        stacks: StackCopyPlan = FRAME_POINTERS,
        features: KernelFeatures | None = None,
    ) -> None:
        super().__init__(config, emit, stacks)
        self._features = features

    @property
    def spec(self) -> ProfileSpec:
        return cpu_profile_spec(self._config.frequency_hz)

    def parameters(self) -> dict[str, float]:
        return {"frequency_hz": self._config.frequency_hz}

    def open_event_buffers(self) -> None:
        values = (1, self.spec.period)  # every sample stands for one period of CPU time
        decode = StackEventDecoder(self.name, self.stacks, values, unwind=self.unwind_copy).decode
        wakeup = max(1, self._config.frequency_hz // WAKEUPS_PER_SECOND)
        self.open_buffer(self.samples_buffer, decode, self._config.perf_buffer_pages, wakeup, stack_records=True)

    def attach_events(self) -> None:
        errors = []
        # Ask the kernel first: a failed BCC attach prints a bare perf_event_open error to stderr.
        features = self._features or kernel_features()
        sources = EVENT_SOURCES if features.hardware_cycles else EVENT_SOURCES[1:]
        for ev_type, ev_config, label in sources:
            try:
                self._bpf.attach_perf_event(
                    ev_type=ev_type,
                    ev_config=ev_config,
                    fn_name=b"on_cpu_sample",
                    sample_freq=self._config.frequency_hz,
                )
            except Exception as e:  # bcc raises bare Exception; the next source may work
                errors.append(f"{label}: {e}")
                continue
            self._attached = (ev_type, ev_config)
            self.attach_method = f"{label} at {self._config.frequency_hz} Hz per CPU"
            return
        raise BpfAttachError("could not attach the CPU sampling perf event: " + "; ".join(errors))

    def detach_events(self) -> None:
        if self._attached is not None:
            ev_type, ev_config = self._attached
            self._attached = None
            self._bpf.detach_perf_event(ev_type=ev_type, ev_config=ev_config)
