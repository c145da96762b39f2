"""The profiling section the probe tests build their probes with (one literal, varied per test with
`dataclasses.replace`), so that every probe test starts from the same explicit values."""

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
