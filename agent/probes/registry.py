"""Probes stage: the profilers the agent knows, by the name `--profilers` uses, built with their config."""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.errors import ConfigError
from agent.preflight import task_regs_unavailable
from agent.probes.alloc import AllocProbe
from agent.probes.bpf_probe import BpfProbe, Emit
from agent.probes.cpu import CpuProbe
from agent.probes.offcpu import OffCpuProbe
from agent.probes.settings import ProbesConfig

logger = logging.getLogger(__name__)

PROBES: dict[str, Callable[[ProbesConfig, Emit], BpfProbe]] = {
    "cpu": lambda config, emit: CpuProbe(config.profiling, emit),
    "offcpu": lambda config, emit: OffCpuProbe(config.profiling, emit, config.offcpu),
    "alloc": lambda config, emit: AllocProbe(config.profiling, emit, config.alloc),
}


# Uprobe programs get the user registers as their context; the others read them from the task.
_CONTEXT_HAS_USER_REGS = frozenset({"alloc"})


def make_probes(config: ProbesConfig, emit: Emit) -> list[BpfProbe]:
    probes = []
    unavailable = task_regs_unavailable()
    for name in config.profiling.profilers:
        probe = PROBES[name](config, emit)
        probe.user_stack_bytes = config.unwind.copy_bytes(name)
        if probe.user_stack_bytes and unavailable and name not in _CONTEXT_HAS_USER_REGS:
            if getattr(config.unwind, name) == "dwarf":
                raise ConfigError(f"unwind.{name}", f"dwarf needs the task's user registers: {unavailable}")
            logger.warning("unwind.%s: DWARF unwinding is unavailable (%s): walking frame pointers", name, unavailable)
            probe.user_stack_bytes = 0
        probes.append(probe)
    return probes
