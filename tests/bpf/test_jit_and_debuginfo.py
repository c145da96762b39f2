"""JIT code named from perf maps, and stripped binaries named from debug files, by the real agent.

- A C program copies a tiny function's machine code into an anonymous RWX mapping twice, writes
  `/tmp/perf-<pid>.map` naming the first copy, spins in it, appends a line naming the second copy
  `jit_spin`, spins there and exits: both names must appear, the second only being readable after the
  process has gone (from the host's /tmp, as the same file). The same program in its own pid
  namespace writes `perf-1.map`, which the agent must find through the process's NSpid.
- Node with `--perf-basic-prof` names its JavaScript functions (skipped when node is not installed).
- A stripped program whose `--only-keep-debug` file is installed under the real
  `/usr/lib/debug/.build-id/`, and one carrying MiniDebugInfo, are named down to their static functions.
"""

from __future__ import annotations

import lzma
import platform
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.agent import STARTUP_TIMEOUT_S, start_agent, wait_for_log
from tests.support.profiles import ReadSample, read_all, samples_of

pytestmark = pytest.mark.bpf
x86_64_only = pytest.mark.skipif(platform.machine() != "x86_64", reason="the JIT workload copies x86-64 machine code")

JIT_C = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

typedef void (*fn_t)(void);
/* push %rbp; mov %rsp,%rbp; mov $0x40000,%ecx; 1: dec %ecx; jnz 1b; pop %rbp; ret */
static const unsigned char body[] = {0x55, 0x48, 0x89, 0xe5, 0xb9, 0x00, 0x00, 0x04, 0x00,
                                     0xff, 0xc9, 0x75, 0xfc, 0x5d, 0xc3};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) static void run_for(fn_t fn, double seconds) {
    double end = now() + seconds;
    while (seconds < 0 || now() < end)
        for (int i = 0; i < 100; i++) fn();
}

int main(int argc, char **argv) {
    double warm = atof(argv[1]), spin = atof(argv[2]);  /* spin < 0: forever */
    unsigned char *code = mmap(NULL, 8192, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (code == MAP_FAILED) { perror("mmap"); return 1; }
    memcpy(code, body, sizeof body);
    memcpy(code + 4096, body, sizeof body);
    char path[64];
    snprintf(path, sizeof path, "/tmp/perf-%d.map", getpid());
    FILE *map = fopen(path, "w");
    if (!map) { perror(path); return 1; }
    fprintf(map, "%lx %zx jit_warm up\n", (unsigned long)code, sizeof body);
    fflush(map);
    run_for((fn_t)code, warm);
    fprintf(map, "%lx %zx jit_spin\n", (unsigned long)(code + 4096), sizeof body);
    fflush(map);
    run_for((fn_t)(code + 4096), spin);
    return 0;
}
"""

DEBUG_C = r"""
#include <stdlib.h>
#include <time.h>
volatile unsigned long sink;
static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}
static __attribute__((noinline)) void local_hot(void) { for (unsigned long i = 0; i < 200000; i++) sink += i; }
static __attribute__((noinline)) void local_caller(double seconds) {
    double end = now() + seconds;
    while (now() < end) local_hot();
}
int main(int argc, char **argv) { local_caller(atof(argv[1])); return 0; }
"""

NODE_JS = """
function hotLoopForProfiling(n) { let s = 0; for (let i = 0; i < n; i++) s = (s + i * i) % 1000003; return s; }
const end = Date.now() + Number(process.argv[2]) * 1000;
let total = 0;
while (Date.now() < end) total += hotLoopForProfiling(200000);
console.log(total > 0 ? 'done' : 'done.');
"""


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout


def compile_c(source: str, out: Path, name: str) -> Path:
    (out / f"{name}.c").write_text(source)
    binary = out / name
    flags = ("-O0", "-g", "-fno-omit-frame-pointer", "-Wl,--build-id=sha1")  # -O0: leaves get a frame too
    run("gcc", *flags, "-o", binary, out / f"{name}.c")
    return binary


def profile(
    tmp_path: Path, workload: Callable[[], list[int]], interval: str = "3", env: dict[str, str] | None = None
) -> dict[int, list[ReadSample]]:
    """Run `workload` (which starts processes, waits for them and returns their pids) under the agent;
    returns each pid's samples."""
    out, log = tmp_path / "profiles", tmp_path / "agent.log"
    agent = start_agent(out, "--frequency", "99", "--interval", interval, log_path=log, env=env)
    try:
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        time.sleep(0.5)
        pids = workload()
        time.sleep(1.0)
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    assert agent.returncode == 0, log.read_text()
    samples = read_all(out)
    return {pid: samples_of(samples, pid) for pid in pids}


def leaf_share(samples: list[ReadSample], function: str) -> float:
    total = sum(s.values[0] for s in samples)
    return sum(s.values[0] for s in samples if s.functions and s.functions[0] == function) / max(total, 1)


def top_stacks(samples: list[ReadSample], depth: int = 3, count: int = 8) -> list[tuple[int, tuple[str, ...]]]:
    """The heaviest stacks (their leaf end), for failure messages."""
    weights: Counter[tuple[str, ...]] = Counter()
    for sample in samples:
        weights[sample.functions[:depth]] += sample.values[0]
    return [(weight, stack) for stack, weight in weights.most_common(count)]


@pytest.fixture
def perf_maps_to_remove() -> Iterator[list[Path]]:
    paths: list[Path] = []
    yield paths
    for path in paths:
        path.unlink(missing_ok=True)


@x86_64_only
def test_jit_code_is_named_from_a_perf_map_that_grew_until_the_process_exited(
    tmp_path: Path, perf_maps_to_remove: list[Path]
) -> None:
    binary = compile_c(JIT_C, tmp_path, "jit_workload")

    def workload() -> list[int]:
        proc = subprocess.Popen([binary, "1.5", "2.5"])
        perf_maps_to_remove.append(Path(f"/tmp/perf-{proc.pid}.map"))
        assert proc.wait(timeout=30) == 0
        return [proc.pid]

    # One long interval: it ends after the process has exited, with jit_spin appended after any read.
    (samples,) = profile(tmp_path, workload, interval="8").values()
    assert samples, "no samples of the JIT workload"
    warm, spin = leaf_share(samples, "jit_warm up"), leaf_share(samples, "jit_spin")
    assert warm > 0.2 and spin > 0.3, (warm, spin, top_stacks(samples))
    assert any(s.functions[:3] == ("jit_spin", "run_for", "main") for s in samples)


@x86_64_only
@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is needed for a pid namespace")
def test_jit_process_in_its_own_pid_namespace_is_named_through_its_nspid(
    tmp_path: Path, perf_maps_to_remove: list[Path]
) -> None:
    if Path("/tmp/perf-1.map").exists():
        pytest.skip("/tmp/perf-1.map already exists; it is not this test's to overwrite")
    binary = compile_c(JIT_C, tmp_path, "jit_in_pidns")
    perf_maps_to_remove.append(Path("/tmp/perf-1.map"))  # pid 1 of its namespace; /tmp is the host's

    def workload() -> list[int]:
        argv = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", str(binary), "0.5", "-1"]
        proc = subprocess.Popen(argv)
        try:
            time.sleep(4.5)  # alive past one interval end: no host fallback for another namespace
            children = run("pgrep", "-P", str(proc.pid)).split()
            assert children, "the namespaced workload is not running"
            return [int(children[0])]
        finally:
            proc.kill()  # unshare ignores SIGTERM while it waits; --kill-child takes its child down with it
            proc.wait(timeout=10)

    (samples,) = profile(tmp_path, workload).values()
    assert samples, "no samples of the namespaced JIT workload"
    assert leaf_share(samples, "jit_spin") > 0.3, top_stacks(samples)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (make setup does not install it)")
def test_node_perf_basic_prof_names_javascript_functions(tmp_path: Path, perf_maps_to_remove: list[Path]) -> None:
    script = tmp_path / "hot.js"
    script.write_text(NODE_JS)

    def workload() -> list[int]:
        # cwd: with --perf-basic-prof, V8 also writes an isolate-*-v8.log into the working directory.
        proc = subprocess.Popen(
            ["node", "--perf-basic-prof", str(script), "4"], stdout=subprocess.DEVNULL, cwd=tmp_path
        )
        perf_maps_to_remove.append(Path(f"/tmp/perf-{proc.pid}.map"))
        assert proc.wait(timeout=60) == 0
        return [proc.pid]

    (samples,) = profile(tmp_path, workload).values()
    total = sum(s.values[0] for s in samples)
    hot = sum(s.values[0] for s in samples if any("hotLoopForProfiling" in f for f in s.functions))
    assert total and hot / total > 0.5, (hot, total, top_stacks(samples))


JAVA_SOURCE = """
public class Hot {
    static long work(long n) {
        long x = 1;
        for (long i = 0; i < n; i++) x = x * 6364136223846793005L + 1442695040888963407L;
        return x;
    }
    public static void main(String[] args) {
        long end = System.nanoTime() + (long) (Double.parseDouble(args[0]) * 1e9), sink = 0;
        while (System.nanoTime() < end) sink += work(100000) ^ sink;
        System.out.println(sink & 1);
    }
}
"""


@pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed (make setup does not install it)")
def test_jvm_is_asked_for_its_perf_map(tmp_path: Path, perf_maps_to_remove: list[Path]) -> None:
    """With symbolize.jvm_perf_map, a JVM whose JIT code comes up unnamed is asked (through its attach
    socket, as jcmd PID Compiler.perfmap) to write /tmp/perf-PID.map, and its Java methods get names."""
    source = tmp_path / "Hot.java"
    source.write_text(JAVA_SOURCE)

    def workload() -> list[int]:
        proc = subprocess.Popen(["java", str(source), "8"], stdout=subprocess.DEVNULL, cwd=tmp_path)
        perf_maps_to_remove.append(Path(f"/tmp/perf-{proc.pid}.map"))
        assert proc.wait(timeout=120) == 0
        return [proc.pid]

    env = {"PROFILING_AGENT_SYMBOLIZE_JVM_PERF_MAP": "true", "PROFILING_AGENT_SYMBOLIZE_JVM_PERF_MAP_INTERVAL_S": "5"}
    (samples,) = profile(tmp_path, workload, interval="2", env=env).values()
    total = sum(s.values[0] for s in samples)
    named = sum(s.values[0] for s in samples if s.functions and "Hot.work" in s.functions[0])
    assert total and named / total > 0.3, (named, total, top_stacks(samples))
    log = (tmp_path / "agent.log").read_text()
    assert "Traceback" not in log, log


def build_id_of(path: Path) -> str:
    match = re.search(r"Build ID: ([0-9a-f]+)", run("readelf", "-n", path))
    assert match is not None
    return match.group(1)


def with_minidebuginfo(full: Path, out: Path) -> Path:
    """Fedora's recipe: the function symbols .dynsym lacks, as an xz'd ELF in .gnu_debugdata."""
    dynsyms = {line.split()[0] for line in run("nm", "-D", "--format=posix", "--defined-only", full).splitlines()}
    keep = [
        parts[0]
        for parts in (line.split() for line in run("nm", "--format=posix", "--defined-only", full).splitlines())
        if parts[1] in ("T", "t") and parts[0] not in dynsyms
    ]
    (out / "keep").write_text("".join(f"{name}\n" for name in sorted(keep)))
    run("objcopy", "--only-keep-debug", full, out / "mini.debug")
    run(
        "objcopy",
        "-S",
        "--remove-section",
        ".comment",
        f"--keep-symbols={out / 'keep'}",
        out / "mini.debug",
        out / "mini",
    )
    (out / "mini.xz").write_bytes(lzma.compress((out / "mini").read_bytes()))
    binary = out / "debug_mini"
    run("strip", "--strip-all", "-o", binary, full)
    run("objcopy", f"--add-section=.gnu_debugdata={out / 'mini.xz'}", binary)
    return binary


@pytest.fixture
def installed_debug_file(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(stripped binary, its debug file installed under /usr/lib/debug/.build-id/), removed afterwards."""
    full = compile_c(DEBUG_C, tmp_path, "debug_full")
    stripped = tmp_path / "debug_stripped"
    run("strip", "--strip-all", "-o", stripped, full)
    build_id = build_id_of(stripped)
    target = Path("/usr/lib/debug/.build-id") / build_id[:2] / f"{build_id[2:]}.debug"
    created = [d for d in (target.parent.parent.parent, target.parent.parent, target.parent) if not d.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    run("objcopy", "--only-keep-debug", full, target)
    try:
        yield stripped, full
    finally:
        target.unlink(missing_ok=True)
        for directory in reversed(created):
            shutil.rmtree(directory, ignore_errors=True)


def test_stripped_binaries_are_named_from_build_id_debug_files_and_minidebuginfo(
    tmp_path: Path, installed_debug_file: tuple[Path, Path]
) -> None:
    stripped, full = installed_debug_file
    mini = with_minidebuginfo(full, tmp_path)
    assert "local_hot" not in run("nm", "-D", "--defined-only", stripped)

    def workload() -> list[int]:
        procs = [subprocess.Popen([binary, "3"]) for binary in (stripped, mini)]
        assert [proc.wait(timeout=30) for proc in procs] == [0, 0]
        return [proc.pid for proc in procs]

    by_pid = profile(tmp_path, workload)
    for binary, pid_samples in zip((stripped, mini), by_pid.values(), strict=True):
        assert pid_samples, f"no samples of {binary.name}"
        assert leaf_share(pid_samples, "local_hot") > 0.8, (binary.name, leaf_share(pid_samples, "local_hot"))
        assert any(s.functions[:3] == ("local_hot", "local_caller", "main") for s in pid_samples), [
            s.functions for s in pid_samples[:5]
        ]
