"""Which probes the agent builds, and how their user stacks are unwound (agent.probes.registry)."""

from __future__ import annotations

import pytest

from agent.config import load_config
from agent.errors import ConfigError
from agent.probes import registry


def probes_with(monkeypatch: pytest.MonkeyPatch, unavailable: str, **unwind: str) -> dict[str, int]:
    monkeypatch.setattr(registry, "task_regs_unavailable", lambda: unavailable)
    environ = {f"PROFILING_AGENT_UNWIND_{name.upper()}": mode for name, mode in unwind.items()}
    config = load_config(environ={"PROFILING_AGENT_PROFILING_PROFILERS": "cpu,offcpu,alloc", **environ})
    return {probe.name: probe.user_stack_bytes for probe in registry.make_probes(config, lambda _: None)}


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
