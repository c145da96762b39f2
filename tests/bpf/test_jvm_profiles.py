"""Java methods in CPU profiles, without flags or signals (#15, interpreted frames): a JVM run with
`-Xint` (every method interpreted, no -XX:+PreserveFramePointer, no perf map) under the real agent, on
every JDK here. The main thread splits its CPU 3:1 between CpuSplit.hotA and CpuSplit.hotB, as the
JVM's own per-thread CPU clock measured (tests/workloads/java/CpuSplit.java).

Compiled frames are not named yet: these runs interpret everything.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.agent import STARTUP_TIMEOUT_S, start_agent, wait_for_log
from tests.support.jvm import JDKS, compile_java
from tests.support.profiles import read_pprof, samples_of
from tests.support.stats import binomial_tolerance

pytestmark = pytest.mark.bpf

SECONDS = 6
FREQUENCY = 99


@pytest.fixture(scope="module")
def classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_java("CpuSplit", tmp_path_factory.mktemp("classes"))


@pytest.mark.parametrize("java", JDKS, ids=lambda java: java.parent.parent.name)
def test_interpreted_java_methods_are_named_with_lines_in_their_true_split(
    java: Path, classes: Path, tmp_path: Path
) -> None:
    workload = subprocess.Popen(
        [str(java), "-Xint", "-Xmx64m", "-XX:+UseSerialGC", "-cp", str(classes), "CpuSplit", str(SECONDS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, log = tmp_path / "profiles", tmp_path / "agent.log"
    agent = start_agent(
        out, "--profilers", "cpu", "--frequency", str(FREQUENCY), "--interval", "30", "--pid", str(workload.pid),
        log_path=log,
    )  # fmt: skip
    try:
        assert workload.stdout is not None and workload.stdout.readline().strip() == "ready"
        wait_for_log(log, "profiling started", STARTUP_TIMEOUT_S, agent)
        assert workload.stdin is not None
        workload.stdin.write("\n")
        workload.stdin.flush()
        output = workload.communicate(timeout=120)[0]
        assert workload.returncode == 0, output
        time.sleep(0.5)
    finally:
        workload.kill()
        agent.terminate()
        agent.wait(timeout=60)
    text = log.read_text()
    assert agent.returncode == 0, text
    assert f"pid {workload.pid}: HotSpot" in text, text
    truth = {name: float(value) for name, value in re.findall(r"([ab])=([0-9.Ee-]+)", output)}
    expected_a = truth["a"] / (truth["a"] + truth["b"])

    samples = [s for path in sorted(out.glob("cpu-*.pb.gz")) for s in samples_of(read_pprof(path)[1], workload.pid)]
    burning = [s for s in samples if any(f.startswith("CpuSplit.hot") for f in s.functions)]
    main_thread = [s for s in samples if "CpuSplit.main" in s.functions or s in burning]
    a = sum(s.values[0] for s in burning if "CpuSplit.hotA" in s.functions)
    b = sum(s.values[0] for s in burning if "CpuSplit.hotB" in s.functions)
    named = a + b
    # The main thread burns for SECONDS at 99 Hz: hundreds of samples. Of the main thread's samples
    # (those under CpuSplit.main, or in a hot method), at least 90% are in a named hot method: it
    # spends all its time in them but for the loop and the clock reads around them.
    everything = sum(s.values[0] for s in samples)
    assert named >= 100, (named, everything, text[-2000:])
    main_samples = sum(s.values[0] for s in main_thread)
    assert named >= 0.9 * main_samples, (named, main_samples)
    # hotA's share of the named samples is the JVM's own measure of it, within 4 binomial standard
    # errors of that many samples.
    share = a / named
    assert abs(share - expected_a) <= binomial_tolerance(expected_a, named), (share, expected_a, truth)
    # Each Java frame has its file and a line of the method, and its callers reach main.
    profile, _ = read_pprof(sorted(out.glob("cpu-*.pb.gz"))[0])
    strings = profile.string_table
    functions = {strings[f.name]: f for f in profile.function}
    hot_a = functions["CpuSplit.hotA"]
    assert strings[hot_a.filename] == "CpuSplit.java" and strings[hot_a.system_name] == "hotA(I)V"
    lines = {line.line for loc in profile.location for line in loc.line if line.function_id == hot_a.id}
    assert lines and all(11 <= line <= 16 for line in lines), lines  # hotA's body
    reaching_main = sum(s.values[0] for s in burning if "CpuSplit.main" in s.functions)
    assert reaching_main >= 0.8 * named, (reaching_main, named)
