"""Tolerances for the statistical assertions of the privileged tests, derived from sample counts.

A profile is a sample: a share, a count or an estimated total read from it differs from the
workload's measured truth by sampling error that shrinks with the number of samples. A fixed bound
("within 3 points") sits at a different number of standard errors in every run, and one that sits
at 1.4 sigma fails one run in six. Every bound here is `sigmas` standard errors (4 by default: a
run fails about once in 16,000 by chance), computed from the count the run actually produced, so a
slow, busy machine that gets fewer samples gets a wider bound and never a flake.
"""

from __future__ import annotations

import math

SIGMAS = 4.0


def binomial_tolerance(p: float, n: float, sigmas: float = SIGMAS) -> float:
    """`sigmas` standard errors of a share whose true value is `p`, estimated from `n` samples."""
    if n <= 0:
        raise ValueError(f"a share estimated from {n} samples has no tolerance")
    p = min(max(p, 0.0), 1.0)
    return sigmas * math.sqrt(p * (1 - p) / n)


def poisson_tolerance(expected: float, sigmas: float = SIGMAS) -> float:
    """`sigmas` standard errors of a count whose expected value is `expected` (Poisson: variance =
    mean). Timer-driven samples of a process that shares the CPUs are binomial at each tick, whose
    variance is smaller: this bounds them too."""
    if expected < 0:
        raise ValueError(f"a count cannot be expected to be {expected}")
    return sigmas * math.sqrt(expected)


def sampled_bytes_tolerance(true_bytes: float, mean_bytes: float, sigmas: float = SIGMAS) -> float:
    """`sigmas` standard errors of an estimate of `true_bytes` from allocations sampled by bytes with a
    mean sampling distance of `mean_bytes` (each allocation of s bytes kept with probability
    1 - exp(-s/R), weighted by its inverse). Each allocation adds s^2 exp(-x)/(1 - exp(-x)) to the
    variance, x = s/R, which is at most s * R because x/(e^x - 1) <= 1: the variance of the estimate
    is at most R * true_bytes, whatever the sizes."""
    if true_bytes < 0 or mean_bytes <= 0:
        raise ValueError(f"no tolerance for {true_bytes} bytes sampled every {mean_bytes}")
    return sigmas * math.sqrt(mean_bytes * true_bytes)
