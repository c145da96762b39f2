"""Tests for the CPU probe's perf-buffer callback (`agent.probes.cpu` through `BpfProbe.open_buffer`):
records in, events out to `emit`, with the reader's counts."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import pytest

from agent.probes.bpf_probe import StackCopyPlan
from agent.probes.cpu import CpuProbe
from agent.probes.events import StackEvent
from agent.probes.records import STACK_EVENT_HEADER_SIZE, StackEventRecord
from agent.types import EMPTY_STACK, Stack, StackStatus
from tests.support.config import profiling

PROFILING = profiling("cpu")
PERIOD = round(1e9 / 19)
USER = (0x401000, 0x402000, 0x403000)


class CapturingTable:
    def __init__(self, bpf: CapturingBpf, name: str) -> None:
        self._bpf, self._name = bpf, name

    def open_perf_buffer(self, callback: Callable[[int, int, int], None], **options: Any) -> None:
        self._bpf.callbacks[self._name] = callback
        self._bpf.options[self._name] = options


class CapturingBpf:
    def __init__(self) -> None:
        self.callbacks: dict[str, Callable[[int, int, int], None]] = {}
        self.options: dict[str, dict[str, Any]] = {}

    def __getitem__(self, name: bytes) -> CapturingTable:
        return CapturingTable(self, name.decode())


def record(timestamp_ns: int, comm: bytes = b"worker", user_len: int = len(USER)) -> ctypes.Array[ctypes.c_char]:
    r = StackEventRecord(timestamp_ns=timestamp_ns, pid=50, tid=51, cpu=1, kernel_stack_len=-14)
    r.user_stack_len = user_len
    for i, address in enumerate(USER):
        r.ips[i] = address
    r.comm = comm
    sent = bytes(r)[: STACK_EVENT_HEADER_SIZE + 8 * len(USER)] + b"\xa5\xa5\xa5\xa5"  # perf's padding
    return ctypes.create_string_buffer(sent, len(sent))


def test_samples_are_decoded_worth_one_period_and_emitted() -> None:
    emitted: list[object] = []
    probe = CpuProbe(PROFILING, emitted.append)
    probe._bpf = CapturingBpf()
    probe.open_event_buffers()
    on_record = probe._bpf.callbacks["cpu_samples"]
    for timestamp, comm in ((10, b"worker"), (20, b"worker"), (30, b"renamed")):
        buffer = record(timestamp, comm)
        on_record(1, ctypes.addressof(buffer), len(buffer))
    first, second, renamed = emitted
    assert isinstance(first, StackEvent) and isinstance(second, StackEvent) and isinstance(renamed, StackEvent)
    assert first == StackEvent(
        "cpu", 10, 50, 51, 1, False, "worker", EMPTY_STACK, Stack(StackStatus.OK, USER), (1, PERIOD), None,
        first.identity,
    )  # fmt: skip
    assert second == first._replace(timestamp_ns=20)
    assert second.identity is first.identity  # the second was a cache hit
    assert renamed.comm == "renamed" and renamed.identity != first.identity
    assert probe.stats.received == 3 and probe.stats.malformed == 0
    assert probe.stacks.status_counts == {"OK": 3}


def test_malformed_records_are_counted_and_not_emitted() -> None:
    emitted: list[object] = []
    probe = CpuProbe(PROFILING, emitted.append)
    probe._bpf = CapturingBpf()
    probe.open_event_buffers()
    on_record = probe._bpf.callbacks["cpu_samples"]
    bad = record(10, user_len=200)  # more frames than bpf_get_stack can give
    for _ in range(2):
        on_record(0, ctypes.addressof(bad), len(bad))
    short = record(10)
    on_record(0, ctypes.addressof(short), STACK_EVENT_HEADER_SIZE - 8)
    assert emitted == []
    assert probe.stats.malformed == 3 and probe.stats.received == 0


def test_a_failing_unwind_stage_is_counted_and_never_escapes_the_callback(caplog: pytest.LogCaptureFixture) -> None:
    """An exception raised into a ctypes callback is only printed, and its record lost uncounted."""

    def unwind(pid: int, copy: object, frame_pointer_stack: Stack) -> Stack:
        raise RuntimeError("a bug in the unwinder")

    emitted: list[object] = []
    probe = CpuProbe(PROFILING, emitted.append, StackCopyPlan(512, unwind))
    probe._bpf = CapturingBpf()
    probe.open_event_buffers()
    r = StackEventRecord(timestamp_ns=1, pid=50, tid=51, cpu=1, kernel_stack_len=0, user_stack_len=0)
    r.user_sp, r.user_stack_base, r.user_stack_bytes = 0x1010, 0x1000, 512
    sent = bytes(r) + b"\0" * 512
    buffer = ctypes.create_string_buffer(sent, len(sent))
    for _ in range(3):
        probe._bpf.callbacks["cpu_samples"](0, ctypes.addressof(buffer), len(buffer))
    assert emitted == [] and (probe.stats.malformed, probe.stats.received) == (3, 0)
    failures = [r for r in caplog.records if "decoding a record failed" in r.getMessage()]
    assert len(failures) == 2 and failures[0].exc_info is not None  # the 1st and 2nd, then the 4th, ...


def test_records_with_a_stack_copy_get_a_buffer_sized_for_them(monkeypatch: Any) -> None:
    """An 8 KiB stack copy makes records ~10 KiB: the samples buffer grows (2 CPUs: 2 MiB each) and a
    wakeup batch fills at most half of it; without a copy the configured geometry is kept."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    plain = CpuProbe(PROFILING, lambda _: None)
    plain._bpf = CapturingBpf()
    plain.open_event_buffers()
    options = plain._bpf.options["cpu_samples"]
    assert (options["page_cnt"], options["wakeup_events"]) == (64, 19)
    copying = CpuProbe(PROFILING, lambda _: None, StackCopyPlan(8192))
    copying._bpf = CapturingBpf()
    copying.open_event_buffers()
    options = copying._bpf.options["cpu_samples"]
    assert (options["page_cnt"], options["wakeup_events"]) == (512, 19)
