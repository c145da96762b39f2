"""Probes stage: perf-buffer size and wakeup batch for records that carry a user stack copy.

A record with a stack copy for DWARF unwinding is the copy (8 KiB by default) and a few hundred bytes
of header and frames instead of those few hundred bytes alone (the copy follows the last filled frame:
see `records.stack_record_size`), so a buffer sized in pages for the small records holds some thirty
times fewer of them: a burst of allocations or blocks, arriving before the adaptive sampler reacts,
would overflow it. Buffers for such records
get COPY_BUFFER_BYTES per profiler, spread over the CPUs (each CPU has its own buffer), within
[MIN_COPY_PAGES, MAX_COPY_PAGES] per CPU: 2 MiB per CPU on this 2-CPU VM, 256 KiB on a 64-CPU host,
where each CPU's share of the events is smaller. The wakeup batch then fills at most half a buffer.
"""

from __future__ import annotations

PAGE_BYTES = 4096
COPY_BUFFER_BYTES = 16 << 20
MIN_COPY_PAGES = 64  # 256 KiB per CPU
MAX_COPY_PAGES = 512  # 2 MiB per CPU


def page_count(pages: int) -> int:
    """BCC needs a power of two."""
    return 1 << max(0, (pages - 1).bit_length())


def sized_for_records(pages: int, wakeup_events: int, record_bytes: int, cpus: int) -> tuple[int, int]:
    """(pages, wakeup_events) per CPU for records of up to `record_bytes`; `pages` never shrinks below
    what was configured, and one wakeup batch fills at most half of the buffer."""
    share = page_count(COPY_BUFFER_BYTES // max(1, cpus) // PAGE_BYTES)
    pages = max(page_count(pages), min(max(share, MIN_COPY_PAGES), MAX_COPY_PAGES))
    wakeup_events = max(1, min(wakeup_events, pages * PAGE_BYTES // (2 * record_bytes)))
    return pages, wakeup_events
