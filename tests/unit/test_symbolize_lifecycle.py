"""Tests of `Symbolizer` marker frames, timestamps, process info and snapshot lifecycle (TTL, exec, refresh)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent.aggregate.types import AggregatedSample, IntervalProfile, SampleKey
from agent.symbolize import processes
from agent.symbolize.markers import status_marker
from agent.symbolize.proc_maps import ProcessMaps
from agent.symbolize.symbolizer import Symbolizer
from agent.symbolize.types import FrameKind, ProcessInfo
from agent.types import EMPTY_STACK, ProfileSpec, Stack, StackStatus, ValueType
from tests.support.fixture_types import AddFakeProcess, MapsFor, NmFunctions

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
    return Symbolizer(proc_root=fake_proc, process_ttl_intervals=2)


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
    assert symbolizer.stats.processes_vanished == 1
    assert symbolizer.stats.frames_unsymbolized == 1


def test_observe_is_idempotent_and_unseen_snapshots_expire(
    symbolizer: Symbolizer, add_fake_process: AddFakeProcess
) -> None:
    pid_dir = add_fake_process(10, [])
    add_fake_process(11, [])
    symbolizer.observe_process(10)
    (pid_dir / "maps").unlink()  # a second observation must not read /proc again
    symbolizer.observe_process(10)
    symbolizer.observe_process(11)
    assert symbolizer.stats.processes_captured == 2
    assert symbolizer.cache_sizes()["processes"] == 2
    symbolizer.symbolize(interval(agg(10)))
    symbolizer.symbolize(interval(agg(10)))  # pid 11 unseen for 2 intervals: expired
    assert symbolizer.cache_sizes()["processes"] == 1
    symbolizer.symbolize(interval())
    symbolizer.symbolize(interval())
    assert symbolizer.cache_sizes()["processes"] == 0
    assert symbolizer.stats.processes_expired == 2


def test_on_exec_makes_the_next_observation_recapture(
    symbolizer: Symbolizer, add_fake_process: AddFakeProcess, fake_proc: Path
) -> None:
    add_fake_process(20, [], comm="sh")
    symbolizer.observe_process(20)
    (fake_proc / "20" / "comm").write_text("python3\n")
    symbolizer.observe_process(20)
    assert symbolizer.symbolize(interval(agg(20))).processes[20].comm == "sh"
    symbolizer.on_exec(20)
    symbolizer.observe_process(20)
    assert symbolizer.symbolize(interval(agg(20))).processes[20].comm == "python3"


def test_vanished_and_unreadable_pids_do_not_raise(symbolizer: Symbolizer, add_fake_process: AddFakeProcess) -> None:
    symbolizer.observe_process(4242)
    symbolizer.observe_process(0)
    pid_dir = add_fake_process(30, [])
    (pid_dir / "maps").unlink()
    (pid_dir / "maps").mkdir()  # reading a directory fails with an OSError other than "not found"
    symbolizer.observe_process(30)
    assert symbolizer.stats.processes_vanished == 1
    assert symbolizer.stats.errors["proc_unreadable"] == 1
    assert symbolizer.cache_sizes()["processes"] == 0


def test_code_mapped_after_the_snapshot_triggers_one_refresh(
    symbolizer: Symbolizer,
    add_fake_process: AddFakeProcess,
    symbolize_binaries: dict[str, Path],
    maps_for: MapsFor,
    nm_functions: NmFunctions,
    fake_proc: Path,
) -> None:
    lib = symbolize_binaries["stripped_lib"]
    add_fake_process(40, [])
    symbolizer.observe_process(40)
    (fake_proc / "40" / "maps").write_text("".join(line + "\n" for line in maps_for(lib, BASE)))  # dlopen()
    address = BASE + nm_functions(lib)["outer_c"][0]
    stacks = [agg(40, user=Stack(StackStatus.OK, (address,))), agg(40, user=Stack(StackStatus.OK, (0x10,)), tid=41)]
    profile = symbolizer.symbolize(interval(*stacks))
    assert profile.samples[0].frames[0].function == "outer_c"
    assert profile.samples[1].frames[0].mapping is None
    assert symbolizer.stats.processes_refreshed == 1


def test_symbolize_does_not_wait_for_a_capture_in_progress(
    symbolizer: Symbolizer, add_fake_process: AddFakeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_fake_process(50, [], comm="slow")
    entered, release, reported = threading.Event(), threading.Event(), threading.Event()
    real_read = processes.read_process_maps

    def slow_read(proc_root: Path, pid: int) -> ProcessMaps:
        entered.set()
        release.wait(10)
        return real_read(proc_root, pid)

    monkeypatch.setattr(processes, "read_process_maps", slow_read)
    observer = threading.Thread(target=symbolizer.observe_process, args=(50,))
    observer.start()

    def report() -> None:
        symbolizer.symbolize(interval(agg(60)))
        reported.set()

    reporter = threading.Thread(target=report)
    try:
        assert entered.wait(10)
        reporter.start()
        # The event thread is inside its /proc read; the report thread must not queue behind it.
        assert reported.wait(5), "symbolize waited for another thread's /proc read"
    finally:
        release.set()
        observer.join(10)
        reporter.join(10)
    assert symbolizer.symbolize(interval(agg(50))).processes[50].comm == "slow"


def test_pprof_addresses_keep_a_zero_return_address_at_zero() -> None:
    from agent.symbolize.markers import pprof_addresses

    # Seen from the kernel: a thread's outermost frame can hold 0; minus one would be -1, which no
    # uint64 address field can hold (it once cost a whole interval's profile).
    assert pprof_addresses((0x401000, 0x402005, 0)) == [0x401000, 0x402004, 0]
    assert pprof_addresses((0,)) == [0]
