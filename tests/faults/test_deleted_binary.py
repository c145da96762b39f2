"""A binary deleted while it runs (#17): every package upgrade does this to long-running processes.

The agent reads the unlinked file through /proc/PID/map_files: its functions are named, its mapping
keeps its build ID (so a backend can symbolize it again later), and the stacks are whole (main under
the leaf, unwound through the same file's frame pointers and CFI).
"""

from __future__ import annotations

import gzip
import subprocess
import time
from pathlib import Path

import pytest

from agent._proto import profile_pb2
from tests.support.agent import STARTUP_TIMEOUT_S, start_agent, wait_for_log
from tests.support.profiles import read_all, samples_of
from tests.support.workloads import compile_c, gnu_build_id

pytestmark = pytest.mark.bpf

SOURCE = r"""
#include <stdlib.h>
#include <time.h>
volatile unsigned long sink;
__attribute__((noinline)) void deleted_leaf(void) { for (int i = 0; i < 100000; i++) sink += i; }
__attribute__((noinline)) void deleted_caller(void) { deleted_leaf(); }
int main(int argc, char **argv) {
    double seconds = atof(argv[1]);
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do { deleted_caller(); clock_gettime(CLOCK_MONOTONIC, &now); }
    while ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 < seconds);
    return 0;
}
"""


def test_a_binary_deleted_while_it_runs_is_named_with_its_build_id(tmp_path: Path) -> None:
    binary = compile_c(SOURCE, tmp_path, "deleted-workload", "-O0", "-g")
    build_id = gnu_build_id(binary)
    out, log = tmp_path / "profiles", tmp_path / "agent.log"
    agent = start_agent(out, "--frequency", "99", "--interval", "1", log_path=log)
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        workload = subprocess.Popen([str(binary), "4"])
        time.sleep(0.3)
        # The upgrade: the running process keeps the inode, and its path names nothing. The intervals
        # reported while it runs reach the file through /proc/PID/map_files.
        binary.unlink()
        assert workload.wait(timeout=60) == 0
        time.sleep(1.5)
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    assert agent.returncode == 0, log.read_text()
    mine = samples_of(read_all(out), workload.pid)
    total = sum(s.values[0] for s in mine)
    assert total >= 20, total  # 4 CPU seconds at 99 Hz, a third of it even beside a CPU hog
    named = sum(s.values[0] for s in mine if s.functions[:3] == ("deleted_leaf", "deleted_caller", "main"))
    # Nearly every sample is in the loop; a few are in clock_gettime (the vDSO) or the start-up.
    assert named >= 0.8 * total, (named, total, [s.functions[:4] for s in mine[:5]])
    mappings = []
    for path in sorted(out.glob("cpu-*.pb.gz")):
        profile = profile_pb2.Profile()
        profile.ParseFromString(gzip.decompress(path.read_bytes()))
        strings = profile.string_table
        mappings += [(strings[m.filename], strings[m.build_id]) for m in profile.mapping]
    # The path as the snapshot saw it (" (deleted)" when it was taken after the unlink), with its build ID.
    assert any(name.startswith(str(binary)) and found == build_id for name, found in mappings), [
        m for m in mappings if "deleted" in m[0]
    ]
