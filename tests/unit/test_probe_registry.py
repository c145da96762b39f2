"""Which probes the agent builds, and how their user stacks are unwound (agent.probes.registry)."""

from __future__ import annotations

import pytest

from agent.aggregate.types import Stack
from agent.config import load_config
from agent.errors import ConfigError
from agent.features import KernelFeatures
from agent.probes import registry
from agent.probes.events import UserStackCopy


def probes_with(monkeypatch: pytest.MonkeyPatch, unavailable: str, **unwind: str) -> dict[str, int]:
    features = KernelFeatures(
        hardware_cycles=False, kprobes=False, switch_symbol=None, task_regs_unavailable=unavailable
    )
    environ = {f"PROFILING_AGENT_UNWIND_{name.upper()}": mode for name, mode in unwind.items()}
    config = load_config(environ={"PROFILING_AGENT_PROFILING_PROFILERS": "cpu,offcpu,alloc", **environ})
    sizes = registry.stack_copy_bytes(config, features)
    probes = registry.make_probes(config, lambda _: None, sizes, unwind_copy, features)
    # Built with their plan: the unwind stage only where there is a copy and it is unwound in the reader.
    for probe in probes:
        expected = unwind_copy if probe.user_stack_bytes and probe.unwinds_in_reader else None
        assert probe.unwind_copy is expected, probe.name
    return {probe.name: probe.user_stack_bytes for probe in probes}


def unwind_copy(pid: int, copy: UserStackCopy, frame_pointer_stack: Stack) -> Stack:
    return frame_pointer_stack


def test_cpu_and_offcpu_copy_the_user_stack_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto for CPU and off-CPU; allocations walk frame pointers unless asked (their samples come in bursts)."""
    assert probes_with(monkeypatch, "") == {"cpu": 8192, "offcpu": 8192, "alloc": 0}
    assert probes_with(monkeypatch, "", alloc="auto") == {"cpu": 8192, "offcpu": 8192, "alloc": 8192}


def test_fp_copies_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert probes_with(monkeypatch, "", cpu="fp", offcpu="fp", alloc="fp") == {"cpu": 0, "offcpu": 0, "alloc": 0}


def test_auto_falls_back_to_frame_pointers_where_registers_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel < 5.15 or no BTF: CPU and off-CPU walk frame pointers; uprobes still have the registers."""
    unavailable = "kernel 5.10 is older than 5.15"
    assert probes_with(monkeypatch, unavailable, alloc="auto") == {"cpu": 0, "offcpu": 0, "alloc": 8192}


def test_dwarf_refuses_to_start_where_registers_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"unwind\.offcpu.*older than 5\.15"):
        probes_with(monkeypatch, "kernel 5.10 is older than 5.15", offcpu="dwarf")
