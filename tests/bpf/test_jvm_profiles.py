"""Java methods in CPU profiles, without flags or signals (#15, interpreted frames): a JVM run with
`-Xint` (every method interpreted, no -XX:+PreserveFramePointer, no perf map) under the real agent, on
every JDK here. The main thread splits its CPU 3:1 between CpuSplit.hotA and CpuSplit.hotB, as the
JVM's own per-thread CPU clock measured (tests/workloads/java/CpuSplit.java).

Compiled frames are not named yet: these runs interpret everything.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.bpf.test_unwinding import profile
from tests.support.jvm import JDKS, compile_java
from tests.support.profiles import read_pprof
from tests.support.stats import binomial_tolerance

pytestmark = pytest.mark.bpf

SECONDS = 6


@pytest.fixture(scope="module")
def classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_java("CpuSplit", tmp_path_factory.mktemp("classes"))


@pytest.mark.parametrize("java", JDKS, ids=lambda java: java.parent.parent.name)
def test_interpreted_java_methods_are_named_with_lines_in_their_true_split(
    java: Path, classes: Path, tmp_path: Path
) -> None:
    command = [str(java), "-Xint", "-Xmx64m", "-XX:+UseSerialGC", "-cp", str(classes), "CpuSplit", str(SECONDS)]
    # Behind a gate, the agent attached to its pid at 99 Hz, as the unwinding tests run theirs.
    samples, output = profile(tmp_path, command, "cpu", "auto", SECONDS)
    assert samples, output
    pid = samples[0].numeric["pid"]
    out, text = tmp_path / "profiles-auto", (tmp_path / "agent-auto.log").read_text()
    assert f"pid {pid}: HotSpot" in text, text
    truth = {name: float(value) for name, value in re.findall(r"([ab])=([0-9.Ee-]+)", output)}
    expected_a = truth["a"] / (truth["a"] + truth["b"])

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
    written, _ = read_pprof(sorted(out.glob("cpu-*.pb.gz"))[0])
    strings = written.string_table
    functions = {strings[f.name]: f for f in written.function}
    hot_a = functions["CpuSplit.hotA"]
    assert strings[hot_a.filename] == "CpuSplit.java" and strings[hot_a.system_name] == "hotA(I)V"
    lines = {line.line for loc in written.location for line in loc.line if line.function_id == hot_a.id}
    assert lines and all(11 <= line <= 16 for line in lines), lines  # hotA's body
    reaching_main = sum(s.values[0] for s in burning if "CpuSplit.main" in s.functions)
    assert reaching_main >= 0.8 * named, (reaching_main, named)
