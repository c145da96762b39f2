"""Symbolize stage: the counters the symbolizer keeps for the metrics stage to read.

This module owns `SymbolizerStats` and the `ErrorReason` labels. Counters only ever grow; the
metrics collector reads them at scrape time. Counters touched by `observe_process` (the event thread)
are updated under the process registry's lock; the rest are only written by the thread calling
`symbolize`.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field


class ErrorReason(enum.StrEnum):
    """Why a file, process or the kernel symbol table could not be used (the `reason` label)."""

    ELF_UNREADABLE = "elf_unreadable"
    ELF_NOT_ELF = "elf_not_elf"
    ELF_MALFORMED = "elf_malformed"
    # Neither /proc/PID/root/<path> nor the host path holds the file the process mapped (gone, replaced).
    ELF_UNREACHABLE = "elf_unreachable"
    # The file backing an executable mapping could not be stat'ed when the process was captured.
    ELF_NO_IDENTITY = "elf_no_identity"
    # The mapping's file offset lies in no PT_LOAD segment, so no load bias can be derived.
    ELF_NO_SEGMENT = "elf_no_segment"
    PROC_UNREADABLE = "proc_unreadable"  # /proc/PID/maps exists but could not be read (permissions, I/O)
    KALLSYMS_UNREADABLE = "kallsyms_unreadable"
    KALLSYMS_RESTRICTED = "kallsyms_restricted"  # all addresses are zero: kernel.kptr_restrict hides them


@dataclass(slots=True)
class SymbolizerStats:
    elf_cache_hits: int = 0
    elf_cache_misses: int = 0
    elf_tables_loaded: int = 0
    frames_symbolized: int = 0  # frames given a function name (kernel and native), counted per sample
    frames_unsymbolized: int = 0  # kernel and native frames left with only mapping and address
    processes_captured: int = 0  # /proc/PID snapshots taken, including refreshes
    processes_vanished: int = 0  # pids gone before they could be captured
    processes_refreshed: int = 0  # snapshots retaken because an address fell outside every mapping
    processes_expired: int = 0  # snapshots dropped after `process_ttl_intervals` intervals unseen
    kallsyms_loads: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # by `ErrorReason`
