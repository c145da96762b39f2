"""The arithmetic of the allocation profiler (`bpf/alloc_math.h`), compiled with gcc from its own source and checked.

The program marks its pure helpers (no BPF helpers, no maps): the exponential threshold drawn without
floats, the caller splice and the nested-call test. This module cuts that part out of the very file
BCC loads, builds it into a shared library and calls it through ctypes, then runs a seeded simulation
of the kernel's byte countdown with those draws to show that the Go/tcmalloc weight makes the
estimated totals unbiased.
"""

from __future__ import annotations

import ctypes
import math
import random
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.probes.alloc import MAX_SAMPLE_BYTES, alloc_weight
from agent.probes.records import MAX_STACK_DEPTH

ALLOC_BPF = Path(__file__).resolve().parents[2] / "bpf" / "alloc_math.h"
PURE = re.compile(r"/\* ---- begin: pure helpers.*?\*/(.*?)/\* ---- end: pure helpers ---- \*/", re.S)
HARNESS = r"""
#include <math.h>
typedef unsigned long long u64; typedef unsigned int u32; typedef long long s64;
#ifndef __always_inline /* glibc's <sys/cdefs.h> defines it as the kernel does */
#define __always_inline inline __attribute__((always_inline))
#endif
#define MAX_STACK_DEPTH %(depth)d
%(pure)s
u32 t_floor_log2(u64 v) { return floor_log2(v); }
u64 t_exp1_q16(u32 random) { return exp1_quantile_q16(random); }
s64 t_next_threshold(u32 random, u64 mean) { return next_threshold(random, mean); }
int t_is_nested(u64 sp, u64 ip, u64 ret, u64 osp, u64 oret, u64 slot)
{
    return is_nested_call(sp, ip, ret, osp, oret, slot);
}
u32 t_splice(u64 *ips, u32 n, u64 ret) { return splice_caller(ips, n, ret); }
/* The quantile against -ln(U) over u = offset, offset + stride, ...: max |error|, mean error, mean. */
void t_exp1_errors(u64 stride, u64 offset, double *max_error, double *mean_error, double *mean)
{
    double worst = 0, sum_error = 0, sum = 0;
    u64 n = 0;
    for (u64 u = offset; u < (1ULL << 32); u += stride, n++) {
        double exact = -log(((double)u + 1) / 4294967296.0);
        double error = exp1_quantile_q16((u32)u) / 65536.0 - exact;
        worst = fabs(error) > worst ? fabs(error) : worst;
        sum_error += error;
        sum += exact;
    }
    *max_error = worst; *mean_error = sum_error / n; *mean = sum / n;
}
"""

Draw = Callable[[int, int], int]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to compile bpf/alloc_math.h")
    match = PURE.search(ALLOC_BPF.read_text())
    assert match, "bpf/alloc_math.h lost its pure-helpers markers"
    out = tmp_path_factory.mktemp("alloc_kernel")
    (out / "pure.c").write_text(HARNESS % {"depth": MAX_STACK_DEPTH, "pure": match[1]})
    flags = ["-std=gnu11", "-O2", "-Wall", "-Werror", "-shared", "-fPIC"]
    build = subprocess.run(
        ["gcc", *flags, "-o", str(out / "pure.so"), str(out / "pure.c"), "-lm"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    lib = ctypes.CDLL(str(out / "pure.so"))
    u64, u32, s64 = ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int64
    lib.t_floor_log2.argtypes, lib.t_floor_log2.restype = [u64], u32
    lib.t_exp1_q16.argtypes, lib.t_exp1_q16.restype = [u32], u64
    lib.t_next_threshold.argtypes, lib.t_next_threshold.restype = [u32, u64], s64
    lib.t_is_nested.argtypes, lib.t_is_nested.restype = [u64] * 6, ctypes.c_int
    lib.t_splice.argtypes, lib.t_splice.restype = [ctypes.POINTER(u64), u32, u64], u32
    lib.t_exp1_errors.argtypes = [u64, u64, *[ctypes.POINTER(ctypes.c_double)] * 3]
    return lib


def test_floor_log2(kernel: ctypes.CDLL) -> None:
    for p in range(64):
        assert kernel.t_floor_log2(1 << p) == p
        assert kernel.t_floor_log2((1 << p) + (1 << p) // 3) == p
        assert kernel.t_floor_log2((2 << p) - 1) == p


def test_exponential_quantile_is_accurate_and_unbiased(kernel: ctypes.CDLL) -> None:
    worst, bias, mean = ctypes.c_double(), ctypes.c_double(), ctypes.c_double()
    stride = 4099  # about a million points spread over every binade
    kernel.t_exp1_errors(stride, stride // 2, ctypes.byref(worst), ctypes.byref(bias), ctypes.byref(mean))
    assert worst.value < 2e-5  # polynomial 1.7e-6 + Q16 truncation 1.5e-5
    assert -2e-5 < bias.value <= 0  # truncation only rounds down
    assert abs(mean.value - 1) < 1e-4  # the grid itself is a fair sample of Exp(1)
    # The ends: U = 1 gives 0, U = 2^-32 gives 32 ln 2 (the tail beyond has probability 2^-32).
    assert kernel.t_exp1_q16(0xFFFFFFFF) == 0
    assert abs(kernel.t_exp1_q16(0) / 65536 - 32 * math.log(2)) < 2e-5
    for u in (0x7FFFFFFF, 0x3FFFFFFF, 0x80000000, 12345):
        assert abs(kernel.t_exp1_q16(u) / 65536 + math.log((u + 1) / 2**32)) < 2e-5


def test_threshold_scales_with_the_mean_without_overflow(kernel: ctypes.CDLL) -> None:
    shift = re.search(r"#define MAX_MEAN \(1ULL << (\d+)\)", ALLOC_BPF.read_text())
    assert shift and 1 << int(shift[1]) == MAX_SAMPLE_BYTES  # the kernel clamps where user space refuses
    largest_mean = MAX_SAMPLE_BYTES
    top = kernel.t_next_threshold(0, largest_mean)
    assert top > 0 and abs(top / largest_mean - 32 * math.log(2)) < 1e-4
    assert kernel.t_next_threshold(0x7FFFFFFF, 512 * 1024) == (kernel.t_exp1_q16(0x7FFFFFFF) * 512 * 1024) >> 16
    assert kernel.t_next_threshold(0xFFFFFFFF, 1 << 20) == 0


def splice(kernel: ctypes.CDLL, walked: list[int], ret: int) -> list[int]:
    """Run splice_caller on a walk stored at ips[1..] as the program stores it."""
    ips = (ctypes.c_uint64 * (2 * MAX_STACK_DEPTH))(0xDEAD, *walked)
    n = kernel.t_splice(ips, len(walked), ret)
    return list(ips[:n])


def test_splice_puts_the_caller_after_the_leaf(kernel: ctypes.CDLL) -> None:
    malloc, caller, callers_caller, main = 0x7F00_0000_1000, 0x5500_0000_2000, 0x5500_0000_3000, 0x5500_0000_4000
    # Frame pointers skip the caller: the walk is malloc, callers_caller, main.
    assert splice(kernel, [malloc, callers_caller, main], caller) == [malloc, caller, callers_caller, main]
    # The kernel put it there already (6.13+, for entries it recognises): keep one copy.
    assert splice(kernel, [malloc, caller, callers_caller, main], caller) == [malloc, caller, callers_caller, main]
    assert splice(kernel, [malloc], caller) == [malloc, caller]
    assert splice(kernel, [malloc, callers_caller], 0) == [malloc, callers_caller]  # unreadable return address
    assert splice(kernel, [], caller) == []


def test_splice_stays_within_the_depth_limit(kernel: ctypes.CDLL) -> None:
    walked = list(range(0x1000, 0x1000 + MAX_STACK_DEPTH - 1))  # the most the program asks for
    spliced = splice(kernel, walked, 0x42)
    assert len(spliced) == MAX_STACK_DEPTH and spliced[:3] == [0x1000, 0x42, 0x1001]
    already = splice(kernel, [0x1000, 0x42, *walked[2:]], 0x42)
    assert len(already) == MAX_STACK_DEPTH - 1 and already[:3] == [0x1000, 0x42, 0x1002]


LIBC_MALLOC = 0x7F12_3456_7930
USER_RET = 0x5612_0000_1234  # the user's call site
OUTER_SP = 0x7FFD_0000_8000


# case -> (sp, ret, outer_sp, what the stack holds at outer_sp now, nested?)
NESTING_CASES = {
    "tail call from realloc(NULL, n): same sp, same return": (OUTER_SP, USER_RET, OUTER_SP, USER_RET, True),
    "call from posix_memalign's body": (OUTER_SP - 0x48, LIBC_MALLOC + 0x1950, OUTER_SP, USER_RET, True),
    "no outer call": (OUTER_SP - 0x48, LIBC_MALLOC + 0x1950, 0, 0, False),
    "outer call returned: its slot was overwritten": (OUTER_SP - 0x48, USER_RET + 8, OUTER_SP, USER_RET + 8, False),
    "next call from the same frame": (OUTER_SP, USER_RET + 0x20, OUTER_SP, USER_RET + 0x20, False),
    "deeper, but called from user code": (OUTER_SP - 0x48, USER_RET + 0x40, OUTER_SP, USER_RET, False),
    "above the outer call's frame": (OUTER_SP + 0x100, LIBC_MALLOC + 0x1950, OUTER_SP, USER_RET, False),
    "far deeper than any allocator's frames": (OUTER_SP - 0x20000, LIBC_MALLOC + 0x1950, OUTER_SP, USER_RET, False),
}


@pytest.mark.parametrize("case", NESTING_CASES)
def test_nested_calls(kernel: ctypes.CDLL, case: str) -> None:
    sp, ret, outer_sp, slot, nested = NESTING_CASES[case]
    outer_ret = USER_RET if outer_sp else 0
    assert kernel.t_is_nested(sp, LIBC_MALLOC, ret, outer_sp, outer_ret, slot) == int(nested)


def simulate(draw: Draw, sizes: list[int], mean: int, seed: int) -> list[bool]:
    """The kernel's per-thread countdown (on_alloc in bpf/agent.bpf.c): which allocations are sent."""
    rng = random.Random(seed)
    countdown = draw(rng.getrandbits(32), mean)
    sent = []
    for size in sizes:
        countdown -= size
        if countdown >= 0:
            sent.append(False)
            continue
        countdown = draw(rng.getrandbits(32), mean)
        sent.append(True)
    return sent


def test_weighted_samples_estimate_the_totals_without_bias(kernel: ctypes.CDLL) -> None:
    mean = 64 * 1024
    rng = random.Random(7)
    # Two call sites: one with small allocations far below R, one with sizes around and above it.
    sites = [
        ("small", rng.randint(1, 4096)) if rng.random() < 0.9 else ("large", rng.randint(1, 4 * mean))
        for _ in range(300_000)
    ]
    sizes = [size for _, size in sites]
    sent = simulate(kernel.t_next_threshold, sizes, mean, seed=11)
    for site in ("small", "large"):
        truth_bytes = sum(size for name, size in sites if name == site)
        truth_calls = sum(1 for name, _ in sites if name == site)
        kept = [size for (name, size), was_sent in zip(sites, sent, strict=True) if was_sent and name == site]
        estimate_bytes = sum(alloc_weight(size, mean) * size for size in kept)
        estimate_calls = sum(alloc_weight(size, mean) for size in kept)
        # Horvitz-Thompson variance: each allocation is kept independently with p = 1 - exp(-s/R).
        variance = sum(size * size * (1 / (1 - math.exp(-size / mean)) - 1) for name, size in sites if name == site)
        assert abs(estimate_bytes - truth_bytes) < 4 * math.sqrt(variance), (site, estimate_bytes, truth_bytes)
        assert abs(estimate_calls / truth_calls - 1) < 0.05, (site, estimate_calls, truth_calls)
        if site == "large":
            # Counting each sample as R bytes (no per-size weight) is visibly wrong for sizes near R.
            naive = len(kept) * mean
            assert abs(naive - truth_bytes) > 10 * math.sqrt(variance), (naive, truth_bytes)


def test_each_allocation_is_sent_with_the_exponential_probability(kernel: ctypes.CDLL) -> None:
    """Memorylessness: whatever came before, an allocation of s bytes is sent with p = 1 - exp(-s/R)."""
    mean = 1000
    sizes = [100, 1000, 3000] * 40_000
    sent = simulate(kernel.t_next_threshold, sizes, mean, seed=3)
    for offset, size in enumerate((100, 1000, 3000)):
        fraction = sum(sent[offset::3]) / 40_000
        p = 1 - math.exp(-size / mean)
        assert abs(fraction - p) < 4 * math.sqrt(p * (1 - p) / 40_000), (size, fraction, p)
