"""Symbolize stage: its configuration section, `symbolize`: caches, process lifetimes, JVM perf maps.

Declared once per field (see `agent.settings`); `agent.config` loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from agent.process.registry import DEFAULT_TTL_INTERVALS
from agent.settings import parse_bool, ranged_float, ranged_int, setting


@dataclass(frozen=True, slots=True)
class SymbolizeConfig:
    SECTION: ClassVar[str] = "symbolize"

    elf_cache_size: int = setting(128, ranged_int(1, 100_000), "ELF symbol tables kept in memory.")
    # The registry (agent.process) is built from this section and owns the default.
    process_ttl_intervals: int = setting(
        DEFAULT_TTL_INTERVALS,
        ranged_int(1, 10_000),
        "Forget a process's captured mappings after this many intervals without samples.",
    )
    jvm_perf_map: bool = setting(
        False,
        parse_bool,
        "Ask HotSpot JVMs (JDK 17+) whose JIT code shows up unnamed to write /tmp/perf-PID.map "
        "(jcmd PID Compiler.perfmap, sent through the attach socket): needs the agent to run as root or as "
        "the JVM's user; the JVM gets a SIGQUIT to start its attach listener, as with jcmd.",
    )
    jvm_perf_map_interval_s: float = setting(
        60.0,
        ranged_float(5.0, 86400.0),
        "Ask each JVM at most this often (the map covers only code compiled by then).",
    )
