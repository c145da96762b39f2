"""Samples from before an exec (#17): a non-PIE program burns 2 CPU seconds in `func_pre_only`, then
execs another non-PIE program that burns 2 in `post_exec_only`. Both are linked at 0x400000, so the
same addresses mean different functions in the two images, and the two phases fall in one reported
interval. Seen before: the first phase's samples named `post_exec_only` < main (the new image's
names, and the new image's comm). Each sample must be named and labelled from the image it ran in."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.support.agent import STARTUP_TIMEOUT_S, start_agent, wait_for_log
from tests.support.profiles import read_all, samples_of
from tests.support.stats import binomial_tolerance
from tests.support.workloads import compile_c

pytestmark = pytest.mark.bpf

PROGRAM = r"""
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
volatile unsigned long sink;
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
__attribute__((noinline)) void FUNCTION(double seconds) {
    double end = now() + seconds;
    while (now() < end) for (int i = 0; i < 10000; i++) sink += i;
}
int main(int argc, char **argv) {
    FUNCTION(atof(argv[1]));
    if (argc > 2) execv(argv[2], (char *[]){argv[2], argv[1], 0});
    return 0;
}
"""


def _build(tmp_path: Path, function: str) -> Path:
    return compile_c(PROGRAM.replace("FUNCTION", function), tmp_path, function, "-O0", "-no-pie")


def test_samples_before_an_exec_keep_the_old_images_names(tmp_path: Path) -> None:
    before, after = _build(tmp_path, "func_pre_only"), _build(tmp_path, "post_exec_only")
    out, log = tmp_path / "profiles", tmp_path / "agent.log"
    agent = start_agent(out, "--frequency", "99", "--interval", "30", log_path=log)
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        workload = subprocess.Popen([str(before), "2", str(after)])
        assert workload.wait(timeout=60) == 0
        time.sleep(0.5)
    finally:
        agent.terminate()  # the final, partial interval holds both phases
        agent.wait(timeout=60)
    assert agent.returncode == 0, log.read_text()[-3000:]
    mine = samples_of(read_all(out), workload.pid)
    weight = {
        name: sum(s.values[0] for s in mine if s.functions and s.functions[0] == name)
        for name in ("func_pre_only", "post_exec_only")
    }
    # Labelled as the program each ran in: the binaries are named after their functions. Before: every
    # sample had the new image's comm.
    comms = {(s.functions[0], s.strings.get("comm")) for s in mine if s.functions and s.functions[0] in weight}
    assert comms == {("func_pre_only", "func_pre_only"), ("post_exec_only", "post_exec_only")}, comms
    named = weight["func_pre_only"] + weight["post_exec_only"]
    # Each phase burns 2 CPU seconds (its thread's clock) in its function: half of the named samples are
    # each one's, within 4 binomial standard errors. Before: {func_pre_only: 0, post_exec_only: 350}.
    assert named >= 40, (weight, sum(s.values[0] for s in mine))
    share = weight["func_pre_only"] / named
    assert abs(share - 0.5) <= binomial_tolerance(0.5, named), (weight, share)
