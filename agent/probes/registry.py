"""Probes stage: the profilers the agent knows, by the name `--profilers` uses, built with their config."""

from __future__ import annotations

from collections.abc import Callable

from agent.config import AgentConfig
from agent.probes.alloc import AllocProbe
from agent.probes.bpf_probe import BpfProbe, Emit
from agent.probes.cpu import CpuProbe
from agent.probes.offcpu import OffCpuProbe

PROBES: dict[str, Callable[[AgentConfig, Emit], BpfProbe]] = {
    "cpu": lambda config, emit: CpuProbe(config.profiling, emit),
    "offcpu": lambda config, emit: OffCpuProbe(config.profiling, emit, config.offcpu),
    "alloc": lambda config, emit: AllocProbe(config.profiling, emit, config.alloc),
}


def make_probes(config: AgentConfig, emit: Emit) -> list[BpfProbe]:
    probes = []
    for name in config.profiling.profilers:
        probe = PROBES[name](config, emit)
        probe.user_stack_bytes = config.unwind.copy_bytes(name)
        probes.append(probe)
    return probes
