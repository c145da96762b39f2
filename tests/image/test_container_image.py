"""The container image (#16): `make image` builds it here with no registry, and the agent in it, run
as the DaemonSet runs it (the host's PID namespace, the DaemonSet's host mounts, a read-only root),
writes CPU profiles of a host process with that process's functions named.

The mounts are read from deploy/kubernetes/daemonset.yaml, so the test also proves that the set the
DaemonSet mounts is enough. podman runs it with --privileged, the simplest equivalent of the
DaemonSet's capability list on a host where root itself lacks some of them (this VM's root has no
CAP_SYS_RESOURCE).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import agent
from tests.support.agent import REPO
from tests.support.otlp_backends import wait_until
from tests.support.profiles import read_all, samples_of
from tests.support.stats import poisson_tolerance
from tests.support.workloads import compile_c, cpu_seconds

pytestmark = pytest.mark.bpf

IMAGE = f"localhost/profiling-agent:{agent.__version__}"
BUILD_TIMEOUT_S = 1200  # a fresh host: mmdebstrap fetches and unpacks ~150 packages first
BURNER = r"""
#include <time.h>
volatile unsigned long sink;
__attribute__((noinline)) void image_test_burn(void) { for (int i = 0; i < 100000; i++) sink += i; }
int main(void) { for (;;) image_test_burn(); }
"""


def _daemonset_mounts() -> list[str]:
    """`-v host:container[:ro]` for every hostPath volume the DaemonSet mounts."""
    manifest: dict[str, Any] = yaml.safe_load((REPO / "deploy/kubernetes/daemonset.yaml").read_text())
    pod = manifest["spec"]["template"]["spec"]
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    (container,) = pod["containers"]
    mounts = []
    for mount in container["volumeMounts"]:
        if mount["name"] in host_paths:
            suffix = ":ro" if mount.get("readOnly") else ""
            mounts += ["-v", f"{host_paths[mount['name']]}:{mount['mountPath']}{suffix}"]
    return mounts


def _podman_limits() -> list[str]:
    """The rlimits deploy/image/build.sh gives podman, for the same reasons (see there), as it also
    runs it with runc."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nofile = 1 << 20 if nofile == resource.RLIM_INFINITY else nofile
    nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc, 32768)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def test_make_image_builds_offline_and_the_agent_in_it_profiles_the_host(tmp_path: Path) -> None:
    build = subprocess.run(
        ["make", "--no-print-directory", "image"], cwd=REPO, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert shutil.which("podman"), "make image installs podman"

    burner = subprocess.Popen([str(compile_c(BURNER, tmp_path, "image_burner", "-O1"))])
    out = tmp_path / "profiles"
    out.mkdir()
    name = f"profiling-agent-test-{os.getpid()}"
    run = [
        "podman", "--runtime", "runc", "run", *_podman_limits(), "--rm", "--name", name,
        "--privileged", "--pid=host", "--read-only",
        *_daemonset_mounts(), "-v", f"{out}:/var/lib/profiling-agent",
        IMAGE, "run", "--output-dir", "/var/lib/profiling-agent", "--interval", "2",
    ]  # fmt: skip
    log = tmp_path / "container.log"
    with log.open("wb") as sink:
        container = subprocess.Popen(run, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "profiling started" in log.read_text() or container.poll() is not None, 300, "start-up")
        assert container.poll() is None, log.read_text()
        burned_before = cpu_seconds(burner.pid)
        wait_until(lambda: len(list(out.glob("cpu-*.pb.gz"))) >= 3, 120, "three profiles written")
        burned = cpu_seconds(burner.pid) - burned_before
        time.sleep(0.1)
    finally:
        burner.kill()
        burner.wait()
        subprocess.run(["podman", "kill", "--signal", "TERM", name], capture_output=True, timeout=60)
        try:
            container.wait(timeout=60)
        except subprocess.TimeoutExpired:
            container.send_signal(signal.SIGKILL)
            container.wait()
    assert container.returncode == 0, log.read_text()[-3000:]

    # The burner, a host process, seen from the container with its function and comm, and its binary
    # (on the host's file system, read through /proc/PID/root) as its mapping.
    mine = samples_of(read_all(out), burner.pid)
    assert mine, log.read_text()[-3000:]
    counts = sum(s.values[0] for s in mine)
    named = sum(s.values[0] for s in mine if s.functions and s.functions[0] == "image_test_burn")
    assert all(s.strings.get("comm") == "image_burner" for s in mine)
    assert any(m.endswith("image_burner") for s in mine for m in s.mappings)
    # It spends all its time in image_test_burn but for the loop around the call: at least 90% of its
    # samples (the bound of #16 for names). And the profiles hold at least the samples of the CPU time
    # it got while three profiles were written, at 19 Hz, less 4 Poisson standard errors (they also
    # hold those until it was killed: the bound is one-sided).
    assert named >= 0.9 * counts, (named, counts)
    expected = 19 * burned
    assert counts >= expected - poisson_tolerance(expected), (counts, burned)
