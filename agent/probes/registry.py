"""Probes stage: the profilers the agent knows, by the name `--profilers` uses."""

from __future__ import annotations

from agent.config import ProfilingConfig
from agent.probes.bpf_probe import BpfProbe, Emit
from agent.probes.cpu import CpuProbe

PROBES: dict[str, type[BpfProbe]] = {
    "cpu": CpuProbe,
}


def make_probes(config: ProfilingConfig, emit: Emit) -> list[BpfProbe]:
    return [PROBES[name](config, emit) for name in config.profilers]
