"""Symbolize stage: the counters the symbolizer keeps for the metrics stage to read.

This module owns `SymbolizerStats` and the `ErrorReason` labels. Counters only ever grow; the
metrics collector reads them at scrape time. Counters touched from the pipeline thread (a perf map caught
up with when a process is first seen) are updated under the perf-map store's lock; the rest are only
written by the thread calling `symbolize`. The process registry keeps its own (`ProcessStats`).
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field


class ErrorReason(enum.StrEnum):
    """Why a file, a perf map or the kernel symbol table could not be used (the `reason` label)."""

    ELF_UNREADABLE = "elf_unreadable"
    ELF_NOT_ELF = "elf_not_elf"
    ELF_MALFORMED = "elf_malformed"
    # Neither /proc/PID/root/<path> nor the host path holds the file the process mapped (gone, replaced).
    ELF_UNREACHABLE = "elf_unreachable"
    # The file backing an executable mapping could not be stat'ed when the process was captured.
    ELF_NO_IDENTITY = "elf_no_identity"
    # The mapping's file offset lies in no PT_LOAD segment, so no load bias can be derived.
    ELF_NO_SEGMENT = "elf_no_segment"
    # A file at a debug-file location whose build id or CRC32 is not the binary's: another build's file.
    DEBUG_FILE_MISMATCH = "debug_file_mismatch"
    DEBUG_FILE_UNUSABLE = "debug_file_unusable"  # a matching location, but unreadable or malformed
    MINIDEBUGINFO_UNUSABLE = "minidebuginfo_unusable"  # .gnu_debugdata that is not xz or holds no valid ELF
    PERF_MAP_UNREADABLE = "perf_map_unreadable"  # /tmp/perf-PID.map exists but could not be read
    PERF_MAP_MALFORMED = "perf_map_malformed"  # counted per line that is not `START SIZE name`
    PERF_MAP_FULL = "perf_map_full"  # a read whose entries did not all fit in the perf-map budget
    KALLSYMS_UNREADABLE = "kallsyms_unreadable"
    KALLSYMS_RESTRICTED = "kallsyms_restricted"  # all addresses are zero: kernel.kptr_restrict hides them


@dataclass(slots=True)
class SymbolizerStats:
    elf_cache_hits: int = 0
    elf_cache_misses: int = 0
    elf_tables_loaded: int = 0
    frames_symbolized: int = 0  # frames given a function name (kernel and native), counted per sample
    frames_unsymbolized: int = 0  # kernel and native frames left with only mapping and address
    kallsyms_loads: int = 0
    perf_map_hits: int = 0  # JIT addresses (per distinct address and call) named from a perf map
    perf_map_misses: int = 0  # JIT addresses no perf map entry covers (or the process has none)
    perf_map_reads: int = 0  # reads of a perf map that found new bytes (initial or appended)
    perf_map_entries_dropped: int = 0  # entries left out because the perf-map budget was full
    symbol_sources: Counter[str] = field(default_factory=Counter)  # ELF tables loaded, by `SymbolSource`
    errors: Counter[str] = field(default_factory=Counter)  # by `ErrorReason`
