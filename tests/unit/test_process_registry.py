"""Tests of the process registry (`agent.process.registry`): capture on first sight, recapture after exec
and on refresh, expiry after the TTL, vanished and unreadable processes, and its threading. Most drive it
through a `Symbolizer`, which reads its snapshots and ends its intervals as the report thread does."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.aggregate.types import AggregatedSample, IntervalProfile, SampleKey
from agent.process import registry
from agent.process.maps import ProcessMaps
from agent.process.registry import ProcessRegistry
from agent.symbolize.symbolizer import Symbolizer
from agent.types import EMPTY_STACK, ProfileSpec, Stack, StackStatus, ValueType
from tests.support.fixture_types import AddFakeProcess, MapsFor, NmFunctions

BASE = 0x555555554000
SPEC = ProfileSpec("cpu", (ValueType("samples", "count"),), ValueType("cpu", "nanoseconds"), 10_000_000)


def agg(pid: int, user: Stack = EMPTY_STACK, tid: int | None = None) -> AggregatedSample:
    key = SampleKey(pid=pid, tid=pid if tid is None else tid, cpu=3, kernel=EMPTY_STACK, user=user)
    return AggregatedSample(key=key, thread_name="worker", values=(2, 20), timestamps_mono_ns=(1_100, 1_900))


def interval(*samples: AggregatedSample) -> IntervalProfile:
    return IntervalProfile(SPEC, 1_000, 2_000, 1_700_000_000_000_000_000, samples)


@pytest.fixture
def symbolizer(fake_proc: Path) -> Symbolizer:
    (fake_proc / "kallsyms").write_text("ffffffff81000000 T _stext\n")
    return Symbolizer(ProcessRegistry(fake_proc, ttl_intervals=2))


def test_observers_hear_of_each_observed_live_process(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    processes = ProcessRegistry(fake_proc)
    heard: list[int] = []
    processes.add_observer(heard.append)
    add_fake_process(10, [], comm="sh")
    processes.observe_process(10)
    processes.observe_process(10)  # already captured: still alive, still heard of
    processes.observe_process(4242)  # never captured: nothing to hear
    assert heard == [10, 10]
    snapshot = processes.snapshot(10)
    assert snapshot is not None and snapshot.maps.comm == "sh" and snapshot.maps is processes.get(10)
    assert processes.snapshot(4242) is None and processes.get(4242) is None
    assert processes.stats.captured == 1 and processes.stats.vanished == 1


def test_refresh_is_counted_only_when_it_captures(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    processes = ProcessRegistry(fake_proc)
    add_fake_process(12, [])
    first = processes.observe(12)
    refreshed = processes.refresh(12)
    assert first is not None and refreshed is not None and refreshed is not first
    assert (processes.stats.captured, processes.stats.refreshed) == (2, 1)
    assert processes.refresh(4243) is None
    assert processes.stats.refreshed == 1


def test_a_ttl_below_one_interval_is_refused(fake_proc: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ProcessRegistry(fake_proc, ttl_intervals=0)


def test_observe_is_idempotent_and_unseen_snapshots_expire(
    symbolizer: Symbolizer, add_fake_process: AddFakeProcess
) -> None:
    pid_dir = add_fake_process(10, [])
    add_fake_process(11, [])
    symbolizer.processes.observe_process(10)
    (pid_dir / "maps").unlink()  # a second observation must not read /proc again
    symbolizer.processes.observe_process(10)
    symbolizer.processes.observe_process(11)
    assert symbolizer.processes.stats.captured == 2
    assert symbolizer.processes.sizes()["processes"] == 2
    symbolizer.symbolize(interval(agg(10)))
    symbolizer.symbolize(interval(agg(10)))  # pid 11 unseen for 2 intervals: expired
    assert symbolizer.processes.sizes()["processes"] == 1
    symbolizer.symbolize(interval())
    symbolizer.symbolize(interval())
    assert symbolizer.processes.sizes()["processes"] == 0
    assert symbolizer.processes.stats.expired == 2


def test_on_exec_makes_the_next_observation_recapture(
    symbolizer: Symbolizer, add_fake_process: AddFakeProcess, fake_proc: Path
) -> None:
    add_fake_process(20, [], comm="sh")
    symbolizer.processes.observe_process(20)
    (fake_proc / "20" / "comm").write_text("python3\n")
    symbolizer.processes.observe_process(20)
    assert symbolizer.symbolize(interval(agg(20))).processes[20].comm == "sh"
    symbolizer.processes.on_exec(20)
    symbolizer.processes.observe_process(20)
    assert symbolizer.symbolize(interval(agg(20))).processes[20].comm == "python3"


def test_an_announcement_captures_at_once_and_an_exec_retires_first(
    fake_proc: Path, add_fake_process: AddFakeProcess
) -> None:
    """What the perf-reader thread does with each process event (seen without it: a 70 ms process that
    the busy pipeline thread reached only after it had exited, all its samples left unnamed)."""
    processes = ProcessRegistry(fake_proc)
    add_fake_process(21, [], comm="sh")
    processes.announced(21, time.monotonic_ns(), exec_=False)
    assert processes.stats.captured == 1 and (snapshot := processes.snapshot(21)) is not None
    assert snapshot.maps.comm == "sh"
    exec_ns = time.monotonic_ns()
    (fake_proc / "21" / "comm").write_text("python3\n")
    processes.announced(21, exec_ns, exec_=True)  # retires the image; the next first record captures
    assert processes.get(21) is None and processes.stats.captured == 1
    retired = processes.retired_at(21, exec_ns - 1)
    assert retired is not None and retired.maps.comm == "sh"
    processes.announced(21, time.monotonic_ns(), exec_=False)
    assert (current := processes.snapshot(21)) is not None and current.maps.comm == "python3"


def test_an_exec_read_after_the_new_image_was_captured_keeps_that_capture(
    fake_proc: Path, add_fake_process: AddFakeProcess
) -> None:
    """Each CPU has its own buffer: the new image's first record (another CPU) can be read before the
    exec's event. The snapshot it captured, read after the exec, is the new image's: it stays current."""
    processes = ProcessRegistry(fake_proc)
    add_fake_process(22, [], comm="sed")
    exec_ns = time.monotonic_ns()
    processes.announced(22, time.monotonic_ns(), exec_=False)
    processes.announced(22, exec_ns, exec_=True)
    assert (current := processes.snapshot(22)) is not None and current.maps.comm == "sed"
    assert processes.retired_at(22, exec_ns - 1) is None
    processes.on_exec(22, time.monotonic_ns())  # a later exec does retire it
    assert processes.get(22) is None


def test_vanished_and_unreadable_pids_do_not_raise(symbolizer: Symbolizer, add_fake_process: AddFakeProcess) -> None:
    symbolizer.processes.observe_process(4242)
    symbolizer.processes.observe_process(0)
    pid_dir = add_fake_process(30, [])
    (pid_dir / "maps").unlink()
    (pid_dir / "maps").mkdir()  # reading a directory fails with an OSError other than "not found"
    symbolizer.processes.observe_process(30)
    assert symbolizer.processes.stats.vanished == 1
    assert symbolizer.processes.stats.unreadable == 1
    assert symbolizer.processes.sizes()["processes"] == 0


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
    symbolizer.processes.observe_process(40)
    (fake_proc / "40" / "maps").write_text("".join(line + "\n" for line in maps_for(lib, BASE)))  # dlopen()
    address = BASE + nm_functions(lib)["outer_c"][0]
    stacks = [agg(40, user=Stack(StackStatus.OK, (address,))), agg(40, user=Stack(StackStatus.OK, (0x10,)), tid=41)]
    profile = symbolizer.symbolize(interval(*stacks))
    assert profile.samples[0].frames[0].function == "outer_c"
    assert profile.samples[1].frames[0].mapping is None
    assert symbolizer.processes.stats.refreshed == 1


def test_symbolize_does_not_wait_for_a_capture_in_progress(
    symbolizer: Symbolizer, add_fake_process: AddFakeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_fake_process(50, [], comm="slow")
    entered, release, reported = threading.Event(), threading.Event(), threading.Event()
    real_read = registry.read_process_maps

    def slow_read(proc_root: Path, pid: int) -> ProcessMaps:
        entered.set()
        release.wait(10)
        return real_read(proc_root, pid)

    monkeypatch.setattr(registry, "read_process_maps", slow_read)
    observer = threading.Thread(target=symbolizer.processes.observe_process, args=(50,))
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
