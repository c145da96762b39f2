"""Probes stage: the profilers the agent knows, by the name `--profilers` uses, built with their config.

Decides once, from the unwind config and the kernel's features (`agent.features`), how many bytes of
user stack each profiler copies (`stack_copy_bytes`), and builds each probe with its `StackCopyPlan`:
those bytes and, for profilers that unwind in the reader, the unwind stage's callable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from agent.errors import ConfigError
from agent.features import KernelFeatures, kernel_features
from agent.probes.alloc import AllocProbe
from agent.probes.bpf_probe import BpfProbe, Emit, StackCopyPlan
from agent.probes.cpu import CpuProbe
from agent.probes.events import UnwindCopy
from agent.probes.offcpu import OffCpuProbe
from agent.probes.settings import ProbesConfig

logger = logging.getLogger(__name__)

Factory = Callable[[ProbesConfig, Emit, StackCopyPlan, KernelFeatures], BpfProbe]
PROBES: dict[str, Factory] = {
    "cpu": lambda config, emit, stacks, features: CpuProbe(config.profiling, emit, stacks, features),
    "offcpu": lambda config, emit, stacks, features: OffCpuProbe(
        config.profiling, emit, config.offcpu, stacks, features
    ),
    "alloc": lambda config, emit, stacks, features: AllocProbe(config.profiling, emit, config.alloc, stacks),
}

PROBE_TYPES: dict[str, type[BpfProbe]] = {"cpu": CpuProbe, "offcpu": OffCpuProbe, "alloc": AllocProbe}
# Uprobe programs get the user registers as their context; the others read them from the task.
_CONTEXT_HAS_USER_REGS = frozenset({"alloc"})


def stack_copy_bytes(config: ProbesConfig, features: KernelFeatures | None = None) -> dict[str, int]:
    """User stack bytes each enabled profiler copies per record (0: frame pointers only). ConfigError
    when `dwarf` is asked for where the kernel cannot give the task's user registers."""
    unavailable = (features or kernel_features()).task_regs_unavailable
    sizes = {}
    for name in config.profiling.profilers:
        size = config.unwind.copy_bytes(name)
        if size and unavailable and name not in _CONTEXT_HAS_USER_REGS:
            if getattr(config.unwind, name) == "dwarf":
                raise ConfigError(f"unwind.{name}", f"dwarf needs the task's user registers: {unavailable}")
            logger.warning("unwind.%s: DWARF unwinding is unavailable (%s): walking frame pointers", name, unavailable)
            size = 0
        sizes[name] = size
    return sizes


def make_probes(
    config: ProbesConfig,
    emit: Emit,
    copy_bytes: Mapping[str, int],
    unwind: UnwindCopy | None = None,
    features: KernelFeatures | None = None,
) -> list[BpfProbe]:
    """The enabled profilers; `copy_bytes` from `stack_copy_bytes`, `unwind` the unwind stage (needed when
    any profiler copies stacks and unwinds in the reader; without it the pipeline unwinds every copy)."""
    features = features or kernel_features()
    probes = []
    for name in config.profiling.profilers:
        size = copy_bytes[name]
        in_reader = PROBE_TYPES[name].unwinds_in_reader
        probes.append(PROBES[name](config, emit, StackCopyPlan(size, unwind if size and in_reader else None), features))
    return probes
