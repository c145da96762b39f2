"""Perf-buffer geometry for records with a user stack copy (agent.probes.geometry)."""

from __future__ import annotations

from agent.probes.geometry import MAX_COPY_PAGES, MIN_COPY_PAGES, PAGE_BYTES, page_count, sized_for_records

RECORD = 10_328  # header and every slot of ips (2,136 bytes) plus an 8 KiB stack copy


def test_page_count_rounds_up_to_a_power_of_two() -> None:
    assert [page_count(n) for n in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]


def test_few_cpus_get_the_largest_buffers() -> None:
    """2 CPUs: 2 MiB each (~200 records), and a 19-record batch is kept."""
    assert sized_for_records(64, 19, RECORD, cpus=2) == (MAX_COPY_PAGES, 19)


def test_many_cpus_share_the_memory() -> None:
    """64 CPUs: 256 KiB each; a one-second batch at 99 Hz would not fit in half of that, so it shrinks."""
    pages, wakeup = sized_for_records(64, 99, RECORD, cpus=64)
    assert pages == MIN_COPY_PAGES
    assert wakeup == MIN_COPY_PAGES * PAGE_BYTES // (2 * RECORD)
    assert 2 * wakeup * RECORD <= pages * PAGE_BYTES


def test_a_larger_configured_buffer_is_kept() -> None:
    assert sized_for_records(1024, 16, RECORD, cpus=2) == (1024, 16)
    assert sized_for_records(64, 1, RECORD, cpus=2)[1] == 1
