"""Tests of `Symbolizer` marker frames, timestamps and process info (snapshot lifecycle: test_process_registry)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.aggregate.types import AggregatedSample, IntervalProfile, SampleKey
from agent.process.registry import ProcessRegistry
from agent.symbolize.markers import status_marker
from agent.symbolize.symbolizer import Symbolizer
from agent.symbolize.types import FrameKind, ProcessInfo
from agent.types import EMPTY_STACK, ProfileSpec, Stack, StackStatus, ValueType

BASE = 0x555555554000
SPEC = ProfileSpec("cpu", (ValueType("samples", "count"),), ValueType("cpu", "nanoseconds"), 10_000_000)
KALLSYMS = "ffffffff81000000 T _stext\nffffffff81000100 T do_syscall_64\n"
KERNEL = Stack(StackStatus.OK, (0xFFFFFFFF81000110, 0xFFFFFFFF81000010))


def agg(
    pid: int, user: Stack = EMPTY_STACK, kernel: Stack = EMPTY_STACK, tid: int | None = None, name: str = "worker"
) -> AggregatedSample:
    key = SampleKey(pid=pid, tid=pid if tid is None else tid, cpu=3, kernel=kernel, user=user)
    return AggregatedSample(key=key, thread_name=name, values=(2, 20), timestamps_mono_ns=(1_100, 1_900))


def interval(*samples: AggregatedSample) -> IntervalProfile:
    return IntervalProfile(SPEC, 1_000, 2_000, 1_700_000_000_000_000_000, samples)


@pytest.fixture
def symbolizer(fake_proc: Path) -> Symbolizer:
    (fake_proc / "kallsyms").write_text(KALLSYMS)
    return Symbolizer(ProcessRegistry(fake_proc, ttl_intervals=2))


def names(symbolizer: Symbolizer, sample: AggregatedSample) -> list[tuple[FrameKind, str]]:
    return [(f.kind, f.function) for f in symbolizer.symbolize(interval(sample)).samples[0].frames]


@pytest.mark.parametrize(
    ("status", "kernel_marker", "user_marker"),
    [
        (StackStatus.MISSING, "[missing kernel stack]", "[missing user stack]"),
        (StackStatus.ERROR, "[kernel stack error]", "[user stack error]"),
    ],
)
def test_failed_stack_becomes_one_marker_frame(
    symbolizer: Symbolizer, status: StackStatus, kernel_marker: str, user_marker: str
) -> None:
    failed = Stack(status, ())
    assert names(symbolizer, agg(0, kernel=failed)) == [(FrameKind.MARKER, kernel_marker)]
    assert names(symbolizer, agg(0, kernel=KERNEL, user=failed)) == [
        (FrameKind.KERNEL, "do_syscall_64"),
        (FrameKind.KERNEL, "_stext"),
        (FrameKind.MARKER, user_marker),
    ]
    both = names(symbolizer, agg(0, kernel=failed, user=failed))
    assert both == [(FrameKind.MARKER, kernel_marker), (FrameKind.MARKER, user_marker)]


@pytest.mark.parametrize("side", ["kernel", "user"])
def test_every_lost_stack_status_has_a_marker(side: str) -> None:
    # A status added without a marker would make its samples vanish from the stack silently.
    for status in StackStatus:
        frame = status_marker(status, side)
        if status in (StackStatus.OK, StackStatus.NOT_COLLECTED):
            assert frame is None, status
        else:
            assert frame is not None and frame.kind is FrameKind.MARKER, status
            assert side in frame.function, status


def test_truncated_stack_keeps_its_frames_and_appends_a_marker_at_the_root(symbolizer: Symbolizer) -> None:
    truncated = Stack(StackStatus.TRUNCATED, KERNEL.addresses)
    assert names(symbolizer, agg(0, kernel=truncated)) == [
        (FrameKind.KERNEL, "do_syscall_64"),
        (FrameKind.KERNEL, "_stext"),
        (FrameKind.MARKER, "[truncated kernel stack]"),
    ]
    truncated_user = Stack(StackStatus.TRUNCATED, (0x10, 0x20))
    assert names(symbolizer, agg(0, user=truncated_user)) == [
        (FrameKind.NATIVE, ""),
        (FrameKind.NATIVE, ""),
        (FrameKind.MARKER, "[truncated user stack]"),
    ]


@pytest.mark.parametrize(
    ("kernel", "user"),
    [(EMPTY_STACK, EMPTY_STACK), (Stack(StackStatus.OK, ()), EMPTY_STACK), (EMPTY_STACK, Stack(StackStatus.OK, ()))],
)
def test_no_stack_at_all_gives_one_no_stack_marker(symbolizer: Symbolizer, kernel: Stack, user: Stack) -> None:
    assert names(symbolizer, agg(0, kernel=kernel, user=user)) == [(FrameKind.MARKER, "[no stack]")]


def test_not_collected_user_stack_adds_no_frame(symbolizer: Symbolizer) -> None:
    assert names(symbolizer, agg(0, kernel=KERNEL)) == [
        (FrameKind.KERNEL, "do_syscall_64"),
        (FrameKind.KERNEL, "_stext"),
    ]


def test_sample_fields_timestamps_and_interval_times(symbolizer: Symbolizer) -> None:
    profile = symbolizer.symbolize(interval(agg(0, kernel=KERNEL, tid=0, name="swapper/3")))
    offset = 1_700_000_000_000_000_000
    assert profile.spec is SPEC
    assert profile.start_unix_ns == 1_000 + offset
    assert profile.duration_ns == 1_000
    sample = profile.samples[0]
    assert (sample.pid, sample.tid, sample.cpu, sample.thread_name) == (0, 0, 3, "swapper/3")
    assert sample.values == (2, 20)
    assert sample.timestamps_unix_ns == (1_100 + offset, 1_900 + offset)
    assert dict(profile.processes) == {0: ProcessInfo(0, "swapper/3", "")}


def test_unknown_pid_is_counted_and_described_from_its_main_thread(symbolizer: Symbolizer) -> None:
    samples = (agg(777, user=Stack(StackStatus.OK, (0x1234,)), tid=778, name="helper"), agg(777, name="main-thread"))
    profile = symbolizer.symbolize(interval(*samples))
    frame = profile.samples[0].frames[0]
    assert (frame.kind, frame.function, frame.address, frame.mapping) == (FrameKind.NATIVE, "", 0x1234, None)
    assert profile.processes[777] == ProcessInfo(777, "main-thread", "")
    assert symbolizer.processes.stats.vanished == 1
    assert symbolizer.stats.frames_unsymbolized == 1


def test_pprof_addresses_keep_a_zero_return_address_at_zero() -> None:
    from agent.symbolize.markers import pprof_addresses

    # Seen from the kernel: a thread's outermost frame can hold 0; minus one would be -1, which no
    # uint64 address field can hold (it once cost a whole interval's profile).
    assert pprof_addresses((0x401000, 0x402005, 0)) == [0x401000, 0x402004, 0]
    assert pprof_addresses((0,)) == [0]
