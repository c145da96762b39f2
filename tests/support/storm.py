"""What counts as a named sample of `tests/workloads/exec_storm.c`'s children, for the exec-storm test
and the bench scenario alike.

A child spends its CPU in `storm_work` (its own binary) calling libc's exported `rand_r`. A sample is
*named* when `storm_work` is on its stack (the executable's frames were unwound and named) and, if its
leaf is in libc, that leaf is `rand_r` (libc's were too). A sample taken before `storm_work` can be on
the stack, in the kernel only (the exec, the exit) or in the dynamic loader only (its start-up, which
executes `cpuid`, slow under a hypervisor), is *startup*: no name of the child's code could be right
there. Anything else (frames with no mapping, a stack that misses `storm_work`) is *unnamed*.
"""

from __future__ import annotations

from collections.abc import Iterable

from tests.support.profiles import ReadSample

COMM = "exec_storm"
LIBC = "libc.so.6"
KINDS = ("named", "unnamed", "startup")


def classify(sample: ReadSample) -> str:
    files = [m.rsplit("/", 1)[-1] for m in sample.mappings]
    if "storm_work" in sample.functions:
        leaf_in_libc = bool(files) and files[0] == LIBC
        return "named" if not leaf_in_libc or sample.functions[0] == "rand_r" else "unnamed"
    user = [(f, m) for f, m in zip(sample.functions, files, strict=True) if not m.startswith("[kernel")]
    if all(m.startswith("ld-linux") or f.startswith("[truncated") for f, m in user):
        return "startup"
    return "unnamed"


def children_samples(samples: Iterable[ReadSample], driver: int) -> dict[str, int]:
    """CPU samples of the storm's children (comm exec_storm, not the driver's pid), by kind."""
    counts = dict.fromkeys(KINDS, 0)
    for sample in samples:
        if sample.strings.get("comm") == COMM and sample.numeric.get("pid") != driver:
            counts[classify(sample)] += sample.values[0]
    return counts
