"""Config for tests: the profiling section the probe tests build their probes with (one literal, varied
per test with `dataclasses.replace`), so that every probe test starts from the same explicit values;
and `billion_laughs`, the alias-bomb config file the loader must refuse."""

from __future__ import annotations

import dataclasses

from agent.probes.settings import ProfilingConfig

PROFILING = ProfilingConfig(
    profilers=("cpu",),
    frequency_hz=19,
    interval_s=10.0,
    duration_s=0.0,
    pids=(),
    perf_buffer_pages=64,
    queue_size=65536,
)


def profiling(*profilers: str, **changes: object) -> ProfilingConfig:
    """PROFILING for `profilers`, with `changes` (e.g. queue_size=1024)."""
    return dataclasses.replace(PROFILING, profilers=profilers, **changes)  # type: ignore[arg-type]


def billion_laughs(levels: int) -> str:
    """430 bytes for 9 levels: each list holds nine aliases of the one before, 9^9 strings expanded."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{','.join([f'*l{level - 1}'] * 9)}]")
    return "\n".join(lines) + f"\nprofiling:\n  pids: *l{levels - 1}\n"
