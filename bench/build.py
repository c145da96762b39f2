"""Benchmark set-up: the C workloads, compiled with frame pointers, and the host tools the scenarios run.

Workloads are built into `build/bench/` from `bench/workloads/*.c` and from the tests' own workloads
(`tests/workloads/*.c`, the ones with a known truth). `ensure_tools` installs what is missing with apt:
`time` (GNU time, for `/usr/bin/time -v`) and `bpfcc-tools` (BCC's profile, memleak, offcputime).
`build_otel_profiler` builds the peer of the side-by-side scenario from the Go module proxy.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build" / "bench"
BENCH_WORKLOADS = Path(__file__).resolve().parent / "workloads"
TEST_WORKLOADS = REPO / "tests" / "workloads"
CFLAGS = ("-O2", "-g", "-fno-omit-frame-pointer", "-pthread")
TEST_CFLAGS = ("-O1", "-g", "-fno-omit-frame-pointer", "-pthread")  # as tests/support/workloads.py
LIBRARIES = ("ingest_driver",)  # built as shared objects, loaded with ctypes
TEST_PROGRAMS = ("cpu_split", "offcpu_split", "alloc_sites", "frameless_leaf", "exec_storm")
# Debian package -> a file it installs that the benchmarks run.
TOOLS = {
    "time": "/usr/bin/time",
    "bpfcc-tools": "/usr/sbin/profile-bpfcc",
}
OTEL_PROFILER_BUILD = Path(__file__).resolve().parent / "peers" / "build-otel-ebpf-profiler.sh"
OTEL_PROFILER = REPO / "build" / "otel-ebpf-profiler" / "ebpf-profiler"
BCC_PROFILE = "/usr/sbin/profile-bpfcc"
PY_SPY = REPO / ".venv" / "bin" / "py-spy"  # names the agent's threads in the per-thread breakdowns
BCC_MEMLEAK = "/usr/sbin/memleak-bpfcc"
BCC_OFFCPUTIME = "/usr/sbin/offcputime-bpfcc"


def ensure_tools() -> list[str]:
    """Install the missing Debian packages; returns the names installed (empty when all were there)."""
    missing = [package for package, path in TOOLS.items() if not os.access(path, os.X_OK)]
    if not missing:
        return []
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"missing {', '.join(missing)} and no apt-get to install them")
    logger.warning("installing %s with apt-get (add them to `make setup`)", " ".join(missing))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    return missing


def build_otel_profiler() -> Path:
    """The OpenTelemetry eBPF profiler's standalone binary, built when missing or stale (Go, minutes)."""
    subprocess.run([str(OTEL_PROFILER_BUILD)], check=True)
    return OTEL_PROFILER


def _compile(source: Path, output: Path, flags: tuple[str, ...], shared: bool = False) -> Path:
    if output.exists() and output.stat().st_mtime >= source.stat().st_mtime:
        return output
    extra = ["-shared", "-fPIC"] if shared else []
    subprocess.run(["gcc", *flags, *extra, "-o", str(output), str(source)], check=True)
    return output


def build_workloads() -> dict[str, Path]:
    """Compile every workload (only when its source is newer); name -> binary or shared object."""
    BUILD.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}
    for source in sorted(BENCH_WORKLOADS.glob("*.c")):
        name = source.stem
        if name in LIBRARIES:
            built[name] = _compile(source, BUILD / f"lib{name}.so", CFLAGS, shared=True)
        else:
            built[name] = _compile(source, BUILD / name, CFLAGS)
    for name in TEST_PROGRAMS:
        source = TEST_WORKLOADS / f"{name}.c"
        if source.exists():
            built[name] = _compile(source, BUILD / name, TEST_CFLAGS)
    return built
