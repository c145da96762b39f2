"""Process filters at work: `agent.metadata.selector.ProcessSelector` on a fake /proc, and the pipeline using it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.aggregate.types import IntervalProfile
from agent.flow.pipeline import Pipeline
from agent.metadata.filters import ProcessFilter
from agent.metadata.process import ProcessMetadata
from agent.metadata.selector import ProcessSelector
from agent.probes.events import IntervalMark, ProcessEvent, ProcessEventKind, StackEvent
from agent.types import EMPTY_STACK, ProfileSpec, Stack, StackStatus, ValueType

FIXTURES = Path(__file__).parent / "fixtures" / "cgroup"
SPEC = ProfileSpec("cpu", (ValueType("samples", "count"),), ValueType("cpu", "nanoseconds"), 10_000_000)
USER = Stack(StackStatus.OK, (0x401000, 0x402000))
NGINX, REDIS, BASH, GONE = 10, 20, 30, 99


def make_process(
    proc: Path, pid: int, comm: str, exe: str | None, cgroup: str, start_time: int = 4242, replace: bool = False
) -> None:
    pid_dir = proc / str(pid)
    pid_dir.mkdir(exist_ok=replace)
    stat = f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 1 0 0 0 1 1 0 0 20 0 1 0 {start_time} 2194 11 0"
    (pid_dir / "stat").write_text(stat + "\n")
    (pid_dir / "comm").write_text(comm + "\n")
    (pid_dir / "cmdline").write_bytes(b"")
    (pid_dir / "cgroup").write_text(cgroup)
    if replace:
        (pid_dir / "exe").unlink(missing_ok=True)
    if exe is not None:
        (pid_dir / "exe").symlink_to(exe)


@pytest.fixture
def proc(fake_proc: Path) -> Path:
    make_process(fake_proc, NGINX, "nginx", "/usr/sbin/nginx", "0::/system.slice/nginx.service\n")
    make_process(
        fake_proc, REDIS, "redis-server", "/usr/bin/redis-server", (FIXTURES / "docker-v2-systemd.txt").read_text()
    )
    make_process(fake_proc, BASH, "bash", "/usr/bin/bash", "0::/user.slice/user-1000.slice/session-3.scope\n")
    return fake_proc


def reads(metadata: ProcessMetadata) -> int:
    """How many times the reader looked at /proc (every read starts with /proc/PID/stat)."""
    stats = metadata.stats
    return stats.cache_hits + stats.cache_misses + stats.vanished


def admitted(selector: ProcessSelector, *pids: int) -> set[int]:
    return {pid for pid in pids if selector.admits(pid)}


def test_no_pattern_admits_everything_without_reading_proc(proc: Path) -> None:
    metadata = ProcessMetadata(proc)
    selector = ProcessSelector(ProcessFilter(), metadata)
    assert admitted(selector, NGINX, REDIS, BASH, GONE) == {NGINX, REDIS, BASH, GONE}
    assert selector.admits_kernel_thread("kworker/0:1")
    selector.forget(NGINX)
    assert reads(metadata) == 0 and len(metadata) == 0
    assert (selector.admitted, selector.rejected, selector.events_filtered, len(selector)) == (0, 0, 0, 0)


@pytest.mark.parametrize(
    ("process_filter", "expected"),
    [
        (ProcessFilter(include_exe=("nginx",)), {NGINX}),  # a bare name matches the file name
        (ProcessFilter(include_exe=("/usr/bin/*",)), {REDIS, BASH}),  # a path matches the full path
        (ProcessFilter(exclude_exe=("bash",)), {NGINX, REDIS}),
        (ProcessFilter(include_comm=("redis-*",)), {REDIS}),
        (ProcessFilter(exclude_comm=("nginx", "bash")), {REDIS}),
        (ProcessFilter(include_unit=("*.service",)), {NGINX}),
        (ProcessFilter(exclude_unit=("session-*.scope",)), {NGINX, REDIS}),
        (ProcessFilter(include_cgroup=("/system.slice/docker-*",)), {REDIS}),
        (ProcessFilter(exclude_cgroup=("/user.slice/*",)), {NGINX, REDIS}),
        (ProcessFilter(include_unit=("*.service",), include_comm=("bash",)), {NGINX, BASH}),  # any include
        (ProcessFilter(include_exe=("/usr/*",), exclude_comm=("redis-server",)), {NGINX, BASH}),  # exclude wins
    ],
)
def test_include_and_exclude_patterns(proc: Path, process_filter: ProcessFilter, expected: set[int]) -> None:
    selector = ProcessSelector(process_filter, ProcessMetadata(proc))
    assert admitted(selector, NGINX, REDIS, BASH) == expected
    assert (selector.admitted, selector.rejected) == (len(expected), 3 - len(expected))


def test_decisions_are_cached_per_pid_and_every_no_is_counted(proc: Path) -> None:
    metadata = ProcessMetadata(proc)
    selector = ProcessSelector(ProcessFilter(include_comm=("nginx",)), metadata)
    for _ in range(5):
        assert selector.admits(NGINX)
        assert not selector.admits(BASH)
    assert reads(metadata) == 2  # one per process, not one per event
    assert (selector.admitted, selector.rejected, selector.events_filtered) == (1, 1, 5)


def test_known_rejected_answers_from_the_decisions_only(proc: Path) -> None:
    """What the reader asks before unwinding: never reads /proc, never counts, forgets with the decision."""
    metadata = ProcessMetadata(proc)
    selector = ProcessSelector(ProcessFilter(include_comm=("nginx",)), metadata)
    assert not selector.known_rejected(BASH) and reads(metadata) == 0  # not decided yet
    assert not selector.admits(BASH) and selector.admits(NGINX)
    assert selector.known_rejected(BASH) and not selector.known_rejected(NGINX)
    assert (reads(metadata), selector.events_filtered) == (2, 1)
    selector.forget(BASH)
    assert not selector.known_rejected(BASH)


@pytest.mark.parametrize(
    ("process_filter", "admits"),
    [
        (ProcessFilter(exclude_comm=("nginx",)), True),
        (ProcessFilter(exclude_unit=("*",), exclude_cgroup=("/*",)), True),
        (ProcessFilter(include_comm=("*",)), False),
        (ProcessFilter(include_unit=("*",), exclude_exe=("x",)), False),
    ],
)
def test_a_vanished_process_is_admitted_only_without_include_patterns(
    proc: Path, process_filter: ProcessFilter, admits: bool
) -> None:
    metadata = ProcessMetadata(proc)
    selector = ProcessSelector(process_filter, metadata)
    assert selector.admits(GONE) is admits
    assert metadata.stats.vanished == 1


def test_forget_decides_a_new_process_under_the_same_pid_afresh(proc: Path) -> None:
    selector = ProcessSelector(ProcessFilter(include_exe=("python3*",)), ProcessMetadata(proc))
    assert not selector.admits(BASH)
    # The pid is reused by a new process (a new start time): the pipeline forgets on its NEW event.
    make_process(proc, BASH, "python3", "/usr/bin/python3.11", "0::/system.slice/app.service\n", 9999, replace=True)
    assert not selector.admits(BASH)  # still the cached decision
    selector.forget(BASH)
    assert selector.admits(BASH)
    assert (selector.admitted, selector.rejected) == (1, 1)


def test_forget_after_exec_sees_the_new_executable(proc: Path) -> None:
    selector = ProcessSelector(ProcessFilter(include_exe=("python3*",)), ProcessMetadata(proc))
    assert not selector.admits(BASH)
    make_process(
        proc, BASH, "python3", "/usr/bin/python3.11", "0::/user.slice/user-1000.slice/session-3.scope\n", replace=True
    )
    selector.forget(BASH)  # the EXEC event
    assert selector.admits(BASH)


def test_forget_also_drops_the_readers_cached_labels_when_it_can(proc: Path) -> None:
    class ForgettingMetadata(ProcessMetadata):
        def __init__(self, proc_root: Path) -> None:
            super().__init__(proc_root)
            self.forgotten: list[int] = []

        def forget(self, pid: int) -> None:
            self.forgotten.append(pid)

    metadata = ForgettingMetadata(proc)
    selector = ProcessSelector(ProcessFilter(include_comm=("nginx",)), metadata)
    selector.forget(NGINX)
    assert metadata.forgotten == [NGINX]


def test_the_decision_cache_is_bounded(proc: Path) -> None:
    metadata = ProcessMetadata(proc)
    selector = ProcessSelector(ProcessFilter(exclude_comm=("bash",)), metadata, cache_size=2)
    assert admitted(selector, NGINX, REDIS, BASH) == {NGINX, REDIS}
    assert len(selector) == 2 and selector.cache_evictions == 1
    assert selector.admits(REDIS)  # recently used: still cached
    before = reads(metadata)
    assert selector.admits(NGINX)  # the least recently used went first: decided (and read) again
    assert reads(metadata) == before + 1
    assert selector.admitted == 3
    with pytest.raises(ValueError, match="cache_size"):
        ProcessSelector(ProcessFilter(), metadata, cache_size=0)


def test_set_filter_replaces_the_filter_and_every_decision(proc: Path) -> None:
    selector = ProcessSelector(ProcessFilter(include_comm=("nginx",)), ProcessMetadata(proc))
    assert admitted(selector, NGINX, BASH) == {NGINX}
    new = ProcessFilter(include_comm=("bash",))
    selector.set_filter(new)
    assert selector.filter is new
    assert admitted(selector, NGINX, BASH) == {BASH}


@pytest.mark.parametrize(
    ("process_filter", "kworker", "ksoftirqd"),
    [
        (ProcessFilter(), True, True),
        (ProcessFilter(exclude_exe=("nginx",)), True, True),
        (ProcessFilter(exclude_comm=("kworker/*",)), False, True),
        (ProcessFilter(include_comm=("*",)), False, False),  # include patterns never name kernel threads
        (ProcessFilter(include_unit=("nginx.service",)), False, False),
    ],
)
def test_kernel_threads_are_decided_by_name_without_reading_proc(
    proc: Path, process_filter: ProcessFilter, kworker: bool, ksoftirqd: bool
) -> None:
    metadata = ProcessMetadata(proc)
    selector = ProcessSelector(process_filter, metadata)
    assert selector.admits_kernel_thread("kworker/0:1") is kworker
    assert selector.admits_kernel_thread("ksoftirqd/0") is ksoftirqd
    assert reads(metadata) == 0
    assert selector.events_filtered == [kworker, ksoftirqd].count(False)


# The pipeline with a selector


class RecordingObserver:
    def __init__(self) -> None:
        self.observed: list[int] = []

    def observe_process(self, pid: int) -> None:
        self.observed.append(pid)


class SpySelector:
    def __init__(self, selector: ProcessSelector) -> None:
        self.selector = selector
        self.forgotten: list[int] = []

    def admits(self, pid: int) -> bool:
        return self.selector.admits(pid)

    def admits_kernel_thread(self, comm: str) -> bool:
        return self.selector.admits_kernel_thread(comm)

    def forget(self, pid: int) -> None:
        self.forgotten.append(pid)
        self.selector.forget(pid)


# Events are stamped before the pipeline exists, so each interval starts at T0 and lasts 2 s.
T0 = time.monotonic_ns()


def stack_event(pid: int, comm: str = "worker", kernel_thread: bool = False) -> StackEvent:
    return StackEvent(
        profiler="cpu",
        timestamp_ns=T0,
        pid=pid,
        tid=pid,
        cpu=0,
        kernel_thread=kernel_thread,
        comm=comm,
        kernel=EMPTY_STACK,
        user=EMPTY_STACK if kernel_thread else USER,
        values=(1,),
    )


def run_pipeline(
    events: list[object], selector: SpySelector | None
) -> tuple[Pipeline, RecordingObserver, IntervalProfile]:
    observer = RecordingObserver()
    delivered: list[IntervalProfile] = []
    pipeline = Pipeline({"cpu": SPEC}, observer, delivered.append, selector)
    for event in events:
        pipeline.handle(event)
    assert pipeline.handle(IntervalMark(T0 + 2_000_000_000, final=True))
    (interval,) = delivered
    return pipeline, observer, interval


def test_pipeline_drops_and_counts_events_of_rejected_processes(proc: Path) -> None:
    selector = SpySelector(ProcessSelector(ProcessFilter(include_unit=("nginx.service",)), ProcessMetadata(proc)))
    events: list[object] = [stack_event(NGINX), stack_event(BASH), stack_event(REDIS), stack_event(NGINX)]
    events += [stack_event(BASH), stack_event(7, comm="kworker/0:1", kernel_thread=True)]
    pipeline, observer, interval = run_pipeline(events, selector)
    assert {s.key.pid for s in interval.samples} == {NGINX}
    assert sum(s.values[0] for s in interval.samples) == 2
    assert pipeline.filtered == 4
    assert selector.selector.events_filtered == 4
    assert observer.observed == [NGINX]  # rejected processes are never observed
    assert pipeline.last_rates == {"cpu": 3.0}  # 6 events received in 2 s, filtered ones included


def test_pipeline_process_events_make_the_selector_forget(proc: Path) -> None:
    selector = SpySelector(ProcessSelector(ProcessFilter(include_exe=("nginx",)), ProcessMetadata(proc)))
    events: list[object] = [
        ProcessEvent(1, NGINX, ProcessEventKind.NEW),
        ProcessEvent(2, BASH, ProcessEventKind.NEW),
        stack_event(NGINX),
        stack_event(BASH),
        ProcessEvent(3, BASH, ProcessEventKind.EXEC),
    ]
    pipeline, observer, interval = run_pipeline(events, selector)
    assert selector.forgotten == [NGINX, BASH, BASH]
    assert observer.observed == [NGINX]  # the rejected NEW process is not observed
    assert [s.key.pid for s in interval.samples] == [NGINX]
    assert pipeline.filtered == 1


def test_pipeline_without_selector_keeps_everything(proc: Path) -> None:
    events: list[object] = [
        ProcessEvent(1, BASH, ProcessEventKind.NEW),
        stack_event(BASH),
        stack_event(7, comm="kworker/0:1", kernel_thread=True),
    ]
    pipeline, observer, interval = run_pipeline(events, None)
    assert {s.key.pid for s in interval.samples} == {BASH, 7}
    assert pipeline.filtered == 0
    assert observer.observed == [BASH]
