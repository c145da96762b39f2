"""The blocks `tests/workloads/offcpu_split.c` measured, and what the kernel can have recorded of them.

With OFFCPU_SPLIT_DURATIONS=FILE the workload writes one line per block: its function, its length as
clock_gettime measured it around the syscall, and whether the thread was also preempted meanwhile.
The off-CPU probe times the same block from switch-out to switch-in, which lies inside the measured
interval: so what it recorded is bounded from both sides by these measurements, with no sampling
error, however late a busy host wakes the sleepers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

# How much of a block the workload measures and the kernel does not, when the thread was not preempted
# meanwhile: clock_gettime and the syscall's entry before the switch-out, its exit and clock_gettime
# after the switch-in. A few us; interrupts can add more, and that is no preemption the workload can
# see (nor is steal by the hypervisor, which kernel_bounds takes from /proc/stat). 50 us was not
# enough beside a CPU hog with other tests running: of 55 short blocks measured at 1.05 ms or more,
# unpreempted, the kernel kept 54 (under its 1 ms minimum). 200 us. A preemption in that window adds
# run-queue time of any length: the workload flags those.
EDGE_NS = 200_000

# /proc/stat counts in USER_HZ ticks, and a difference of two readings can miss most of one.
STAT_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


class MeasuredBlock(NamedTuple):
    function: str  # "a" (wait_a) or "b" (wait_b)
    ns: int
    preempted: bool


class KernelBounds(NamedTuple):
    """What a probe with a minimum block length can have kept of some measured blocks: the count and
    the total blocked ns, each between a lower and an upper bound."""

    min_count: int
    max_count: int
    min_ns: int
    max_ns: int


def read_blocks(path: Path) -> list[MeasuredBlock]:
    """The workload's OFFCPU_SPLIT_DURATIONS file: "a|b <ns> <preempted 0|1>" lines."""
    blocks = []
    for line in path.read_text().splitlines():
        function, ns, preempted = line.split()
        blocks.append(MeasuredBlock(function, int(ns), preempted == "1"))
    return blocks


def stolen_ns() -> int:
    """The time the hypervisor has so far taken from this VM's CPUs while they had work to run: the
    steal column of /proc/stat, summed over the CPUs. Steal inside a block's edges (the thread is
    running, so no preemption is counted) lengthens the block as measured and not as the kernel saw it,
    by as much as the hypervisor took: a block stretched past a minimum by that was not kept."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    assert fields[0] == "cpu" and len(fields) > 8, fields
    return int(fields[8]) * STAT_TICK_NS


def kernel_bounds(
    blocks: list[MeasuredBlock],
    minimum_ns: int,
    function: str | None = None,
    threads: int = 1,
    stolen: int | None = None,
) -> KernelBounds:
    """Bounds on what the kernel kept of `blocks` (of one `function`, or all) with a `minimum_ns` minimum.

    The kernel's block is never longer than the measured one, so a block it kept was measured at least
    `minimum_ns` long, and holds at most what was measured. An unpreempted block is at most EDGE_NS
    shorter in the kernel, so one measured at least minimum_ns + EDGE_NS long was kept, with at least
    its measured length less EDGE_NS. The blocks in between, and the preempted ones, may go either way.
    Counting every block of the process (no `function`), the workload's `threads` also block outside
    wait_a and wait_b, unmeasured: at most once each on the lock for the totals, and its main thread
    once on each join: at most 2 * threads blocks, each shorter than the longest wait_a and wait_b pair
    (a join waits for another thread's last pair; the lock is held for three additions), which the upper
    bounds allow.

    `stolen` is the steal that stolen_ns() saw grow while the blocks were measured. It lowers the lower
    bounds as far as that much steal could, placed in the worst edges: a sure block measured e past
    minimum_ns + EDGE_NS is dropped when more than e of it was stolen, so the most dropped are the k of
    smallest e whose sum fits; and each stolen ns costs a kept block at most one ns, a dropped one at
    most e + minimum_ns. A block that steal stretched past the minimum is the common case of a short
    block kept, so on a VM those give no lower bound; long blocks lose little."""
    chosen = [b for b in blocks if function is None or b.function == function]
    possible = [b.ns for b in chosen if b.ns >= minimum_ns]
    sure = [b.ns for b in chosen if b.ns >= minimum_ns + EDGE_NS and not b.preempted]
    unmeasured = 2 * threads if function is None else 0
    longest_pair = 2 * max((b.ns for b in chosen), default=0)
    min_ns = sum(sure) - EDGE_NS * len(sure)
    dropped = 0
    if stolen is not None:
        budget = stolen + STAT_TICK_NS  # the tick a difference of two readings can miss
        for excess in sorted(ns - minimum_ns - EDGE_NS for ns in sure):
            if excess >= budget:
                break
            budget -= excess
            dropped += 1
        min_ns = max(0, min_ns - (stolen + STAT_TICK_NS) - dropped * minimum_ns)
    return KernelBounds(
        len(sure) - dropped,
        len(possible) + unmeasured,
        min_ns,
        sum(possible) + unmeasured * longest_pair,
    )
