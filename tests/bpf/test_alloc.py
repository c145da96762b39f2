"""Allocation profiling end to end: the real agent, real uprobes, a workload with a known byte truth.

`alloc_sites` (tests/workloads) allocates known byte totals from known call sites and prints them.
Each test runs `profiling-agent run --profilers alloc` as a user would and reads the pprof files back.
The adaptive sampler is given budgets it never reaches, so R stays at its default (512 KiB) and the
tolerances below hold at that R: each site's share within 3 points, each estimated total within 10%.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.probes.alloc import DEFAULT_SAMPLE_BYTES
from tests.support.agent import STARTUP_TIMEOUT_S, free_port, start_agent, wait_for_log
from tests.support.profiles import ReadSample, read_all, read_pprof, samples_of
from tests.support.stats import binomial_tolerance, sampled_bytes_tolerance
from tests.support.workloads import compile_workload

pytestmark = pytest.mark.bpf
R = DEFAULT_SAMPLE_BYTES
SITES_MB = 4096  # ~8,000 samples at R = 512 KiB: share error ~0.5 points, total error ~1.1% (1 sigma)
LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")


@pytest.fixture(autouse=True)
def pinned_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Budgets the adaptive sampler never reaches: it leaves R at the configured default."""
    monkeypatch.setenv("PROFILING_AGENT_SAMPLING_MAX_EVENTS_PER_S", "10000000")
    monkeypatch.setenv("PROFILING_AGENT_SAMPLING_CPU_BUDGET_PERCENT", "100")


@pytest.fixture(scope="module")
def alloc_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_workload("alloc_sites", tmp_path_factory.mktemp("alloc_bin"))


class Agent:
    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.out = tmp_path / "profiles"
        self.log = tmp_path / "agent.log"
        self.metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
        address = self.metrics_url.removeprefix("http://").removesuffix("/metrics")
        self.proc = start_agent(
            self.out, "--profilers", "alloc", "--interval", "3", "--metrics-address", address, *args, log_path=self.log
        )

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        wait_for_log(self.log, text, timeout, self.proc)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a series' samples with these labels (0 when the series has none yet)."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_agent(tmp_path: Path, *args: str) -> Iterator[Agent]:
    agent = Agent(tmp_path, *args)
    try:
        agent.wait_for_log("profiling started", STARTUP_TIMEOUT_S)
        yield agent
    finally:
        agent.proc.terminate()
        agent.proc.wait(timeout=30)
    assert agent.proc.returncode == 0, agent.text()
    assert "alloc: sampling parameter" not in agent.text()  # R stayed at its default


class Workload:
    """`alloc_sites MODE AMOUNT wait`: started now, allocating once `go()` is called."""

    def __init__(self, binary: Path, mode: str, amount: float, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [str(binary), mode, str(amount), "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "ready\n"
        self.pid = self.proc.pid

    def go(self) -> dict[str, float]:
        """Let it allocate; returns the truth it prints at exit."""
        output, _ = self.proc.communicate("go\n", timeout=120)
        assert self.proc.returncode == 0
        return {name: float(value) for name, value in re.findall(r"(\w+)=([0-9.]+)", output)}


def space(samples: Sequence[ReadSample], function: str) -> float:
    """Estimated bytes allocated with `function` on the stack (alloc_space)."""
    return sum(s.values[1] for s in samples if function in s.functions)


def assert_sites_split(samples: list[ReadSample], truth: dict[str, float], mean: int = R) -> None:
    """The 3:1 split of `sites` mode, its total, and the call sites right after the allocator frame,
    sampled every `mean` bytes on average."""
    assert samples, "no allocation samples of the workload"
    big, small = space(samples, "alloc_big"), space(samples, "alloc_small")
    true_bytes = truth["alloc_big"] + truth["alloc_small"]
    true_big = truth["alloc_big"] / true_bytes
    # Seen once beside a CPU hog (whole-host mode, a workload started after the agent): samples of the
    # pid, none naming either site. Say what they held instead of dividing by zero.
    stacks = sorted({tuple(zip(s.functions[:6], s.mappings[:6], strict=True)) for s in samples})[:5]
    assert big + small > 0, ("neither call site is named in the workload's samples", len(samples), stacks)
    # Sampled by bytes, the estimate's variance is at most R x bytes (tests/support/stats.py): the share
    # is within 4 binomial standard errors of n = bytes / R samples (0.019 at the default R, 0.038 at
    # 2 MiB), and the total within 4 of its own standard errors (4.4% and 8.8%).
    assert abs(big / (big + small) - true_big) <= binomial_tolerance(true_big, true_bytes / mean), (big, small, truth)
    total = sum(s.values[1] for s in samples)
    assert abs(total - true_bytes) <= sampled_bytes_tolerance(true_bytes, mean), (total, truth)
    # The immediate caller is spliced in after the allocator: alloc_big -> malloc, and through the
    # helper alloc_small -> alloc_helper -> malloc (frame pointers alone would say main/alloc_small).
    callers: dict[tuple[str, ...], int] = {}
    for s in samples:
        callers[s.functions[1:3]] = callers.get(s.functions[1:3], 0) + s.values[1]
    assert callers.get(("alloc_big", "run_sites"), 0) >= 0.99 * big, callers
    assert callers.get(("alloc_helper", "alloc_small"), 0) >= 0.99 * small, callers


@pytest.mark.parametrize("unwind", ["fp", "auto"])
def test_call_sites_of_one_process_with_the_pid_filter(tmp_path: Path, alloc_sites: Path, unwind: str) -> None:
    """fp: the kernel splices the allocator's caller into a frame-pointer walk; auto: the records carry a
    stack copy, unwound with CFI from the allocator's entry. Both give the same sites and callers.

    The workload allocates 4 GiB in about a tenth of a second: ~8,000 samples at the default R, a burst
    no sampler can react to. Records of ~10 KiB (auto) overflow the perf buffers in such a burst (lost,
    and counted: why unwind.alloc defaults to fp), so auto samples every 2 MiB here: ~2,000 samples,
    still enough for the split and the total within the bounds below."""
    config = tmp_path / "agent.yaml"
    sample_bytes = "" if unwind == "fp" else "alloc:\n  sample_bytes: 2097152\n"
    config.write_text(f"unwind:\n  alloc: {unwind}\n{sample_bytes}")
    workload = Workload(alloc_sites, "sites", SITES_MB)
    with running_agent(tmp_path, "--config", str(config), "--pid", str(workload.pid)) as agent:
        assert "uprobes on 1 C library in 1 process" in agent.text()
        truth = workload.go()
        # Another process using the same libc does not take the uprobe trap (~1 us per call): with
        # --pid the uprobes are attached to the profiled process only.
        bystander = Workload(alloc_sites, "storm", 0.5).go()
        time.sleep(1.0)
        lost = agent.metric("profiling_agent_probe_events_lost_total", profiler="alloc")
    assert bystander["storm_calls"] / bystander["storm_seconds"] > 5e6, bystander
    samples = read_all(agent.out, "alloc")
    assert {s.numeric.get("pid") for s in samples} == {workload.pid}
    assert_sites_split(samples, truth, R if unwind == "fp" else 2097152)
    profile, _ = read_pprof(sorted(agent.out.glob("alloc-*.pb.gz"))[0])
    strings = profile.string_table
    assert [(strings[t.type], strings[t.unit]) for t in profile.sample_type] == [
        ("alloc_objects", "count"),
        ("alloc_space", "bytes"),
    ]
    assert (strings[profile.period_type.type], strings[profile.period_type.unit], profile.period) == (
        "space",
        "bytes",
        R if unwind == "fp" else 2097152,
    )
    assert lost == 0


def test_whole_host_profiles_processes_started_later_and_every_entry_point(tmp_path: Path, alloc_sites: Path) -> None:
    with running_agent(tmp_path) as agent:
        sites = Workload(alloc_sites, "sites", SITES_MB)
        sites_truth = sites.go()
        mixed = Workload(alloc_sites, "mixed", SITES_MB)
        mixed_truth = mixed.go()
        time.sleep(1.0)
        assert agent.metric("profiling_agent_probe_events_lost_total", profiler="alloc") == 0
    every = read_all(agent.out, "alloc")
    assert_sites_split(samples_of(every, sites.pid), sites_truth)
    # Each entry point counted once: glibc's realloc(NULL, n), posix_memalign and aligned_alloc call
    # malloc themselves, and that inner call must not count the bytes a second time.
    samples = samples_of(every, mixed.pid)
    for site, true_bytes in mixed_truth.items():
        estimate = space(samples, site) + (space(samples, "use_realloc_grow") if site == "use_realloc" else 0)
        # 4 standard errors of a byte-sampled estimate (at most 10% of each ~820 MB site at R = 512 KiB).
        assert abs(estimate - true_bytes) <= sampled_bytes_tolerance(true_bytes, R), (site, estimate, true_bytes)


def leaf_files(path: Path, pid: int) -> set[str]:
    """The files of the leaf (allocator) frames of `pid`'s samples in one pprof file."""
    profile, _ = read_pprof(path)
    strings = profile.string_table
    mappings = {m.id: strings[m.filename] for m in profile.mapping}
    locations = {loc.id: loc for loc in profile.location}
    files = set()
    for sample in profile.sample:
        if any(strings[label.key] == "pid" and label.num == pid for label in sample.label):
            files.add(mappings.get(locations[sample.location_id[0]].mapping_id, ""))
    return files


def test_a_copied_libc_is_found_attached_and_detached(tmp_path: Path, alloc_sites: Path) -> None:
    """A C library loaded from another path (as a container's own libc is) gets its own uprobes."""
    if not LIBC.exists():
        pytest.skip(f"{LIBC} is not this host's C library")
    copy = tmp_path / "lib" / "libc.so.6"
    copy.parent.mkdir()
    shutil.copy2(LIBC, copy)
    with running_agent(tmp_path) as agent:
        workload = Workload(alloc_sites, "sites", SITES_MB, env={"LD_LIBRARY_PATH": str(copy.parent)})
        assert str(copy) in Path(f"/proc/{workload.pid}/maps").read_text()
        agent.wait_for_log(f"alloc: attached to {copy} (found in pid {workload.pid})", timeout=15)
        truth = workload.go()
        agent.wait_for_log(f"alloc: detached from {copy}", timeout=15)  # no process maps it any more
    samples = samples_of(read_all(agent.out, "alloc"), workload.pid)
    assert_sites_split(samples, truth)
    files = set().union(*(leaf_files(path, workload.pid) for path in agent.out.glob("alloc-*.pb.gz")))
    assert files == {str(copy)}


def test_malloc_storm_loses_nothing_and_keeps_the_event_rate_bounded(tmp_path: Path, alloc_sites: Path) -> None:
    """Two threads calling malloc/free as fast as they can (~50M calls/s each without uprobes; the
    trap caps them near 1M/s on a 2-core VM): every sampled record arrives, the estimate holds, and
    the records stay near bytes/s / R however many calls there are."""
    workload = Workload(alloc_sites, "storm", 3)
    with running_agent(tmp_path, "--pid", str(workload.pid)) as agent:
        truth = workload.go()
        time.sleep(1.0)
        received = agent.metric("profiling_agent_probe_events_received_total", profiler="alloc")
        lost = agent.metric("profiling_agent_probe_events_lost_total", profiler="alloc")
        malformed = agent.metric("profiling_agent_probe_records_malformed_total", profiler="alloc")
        dropped = agent.metric("profiling_agent_pipeline_events_dropped_total", reason="events_queue_full")
    calls_per_s = truth["storm_calls"] / truth["storm_seconds"]
    assert calls_per_s > 2e5, truth  # a storm at what the trap allows
    assert (lost, malformed, dropped) == (0, 0, 0)
    expected = truth["storm_bytes"] / R
    # `received` also counts the exec announcements of the whole host: hence the slack.
    assert received <= 1.25 * expected + 100, (received, expected)  # bounded by R, not by the calls
    samples = samples_of(read_all(agent.out, "alloc"), workload.pid)
    estimate = space(samples, "storm_loop")
    assert abs(estimate - truth["storm_bytes"]) <= sampled_bytes_tolerance(truth["storm_bytes"], R), (estimate, truth)
    # The count of objects: each call of s bytes (16 to 1039, uniform) is kept with p ~ s/R and weighs
    # 1/p, so the estimate's variance is about calls x R x mean(1/s): 4 of its standard errors.
    mean_inverse_size = sum(1 / size for size in range(16, 1040)) / 1024
    objects_tolerance = 4 * math.sqrt(truth["storm_calls"] * R * mean_inverse_size)
    objects = sum(s.values[0] for s in samples if "storm_loop" in s.functions)
    assert abs(objects - truth["storm_calls"]) <= objects_tolerance, (objects, truth, objects_tolerance)


def _sampling_steps(log: str) -> list[int]:
    """The allocation sampler's R after each change, in order, from the agent's log."""
    return [int(after) for after in re.findall(r"alloc: sampling parameter \d+ -> (\d+)", log)]


def _relaxed(steps: list[int]) -> bool:
    return bool(steps) and steps[-1] < max(steps)


def test_adaptive_sampler_holds_the_event_budget_and_the_estimate(
    tmp_path: Path, alloc_sites: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storm far above a small budget: the sampler raises R until the records fit the budget,
    and the weighted estimate of the bytes still holds (each record carries the R it was kept under)."""
    budget = 100
    monkeypatch.setenv("PROFILING_AGENT_SAMPLING_MAX_EVENTS_PER_S", str(budget))
    workload = Workload(alloc_sites, "storm", 10)
    agent = Agent(tmp_path, "--pid", str(workload.pid))
    try:
        agent.wait_for_log("profiling started", STARTUP_TIMEOUT_S)
        truth = workload.go()
        # Once the storm is over the sampler relaxes R within a few adjustments (1 s each): wait for the
        # first step down after the highest R, rather than assume it comes within a fixed time (on a busy
        # host the storm's rate, and so R, may still be rising when it ends).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _relaxed(_sampling_steps(agent.text())):
            time.sleep(0.5)
        lost = agent.metric("profiling_agent_probe_events_lost_total", profiler="alloc")
    finally:
        agent.proc.terminate()
        agent.proc.wait(timeout=30)
    assert agent.proc.returncode == 0, agent.text()
    steps = _sampling_steps(agent.text())
    assert steps and steps[0] > R, agent.text()
    # The sampler raised R until the storm's records fit the budget (with the dead band's slack), then
    # relaxed it back towards the floor once the storm was over.
    bytes_per_s = truth["storm_bytes"] / truth["storm_seconds"]
    assert bytes_per_s / max(steps) <= 1.5 * budget, (bytes_per_s, steps)
    assert steps[-1] < max(steps)
    assert lost == 0
    samples = samples_of(read_all(agent.out, "alloc"), workload.pid)
    # Each record was kept under an R of at most max(steps): the estimate's variance is at most that R
    # times the bytes; 4 of its standard errors.
    estimate = space(samples, "storm_loop")
    tolerance = sampled_bytes_tolerance(truth["storm_bytes"], max(steps))
    assert abs(estimate - truth["storm_bytes"]) <= tolerance, (estimate, truth, tolerance)
