"""The JDKs on this host, and Java test programs: compiled with javac, run until they print "ready",
and their line number tables as `javap -l` prints them (the independent truth for the method reader).

tests/workloads/java/Lines.java: `near` has lines 4 and 5 (one-byte entries of the compressed table),
`far` lines 8 and 40 (a jump of 32 lines: an escaped entry); `main` calls both, prints "ready" and
sleeps. Its lines are what the tests check, so the file has no header comment.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

JAVA_WORKLOADS = Path(__file__).resolve().parent.parent / "workloads" / "java"
_ALL = sorted(Path("/usr/lib/jvm").glob("*/bin/java")) if Path("/usr/lib/jvm").is_dir() else []
# One per distinct libjvm.so: Debian installs one JDK under several names.
JDKS = list({os.path.realpath(java.parent.parent / "lib/server/libjvm.so"): java for java in _ALL}.values())


def require_jdks() -> None:
    """CI's machines have OpenJDK 17 and Temurin 25: there, fewer is a failure, elsewhere a skip."""
    if len(JDKS) >= 2:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI needs OpenJDK 17 and Temurin 25 under /usr/lib/jvm, found {JDKS}")
    pytest.skip(f"fewer than two JDKs under /usr/lib/jvm: {JDKS}")


def compile_java(name: str, out_dir: Path) -> Path:
    """javac (the oldest JDK's, for class files every JDK here runs) of tests/workloads/java/NAME.java."""
    require_jdks()
    javac = JDKS[0].parent / "javac"
    subprocess.run(
        [str(javac), "--release", "11", "-d", str(out_dir), str(JAVA_WORKLOADS / f"{name}.java")],
        check=True,
        timeout=300,
    )
    return out_dir


@contextmanager
def running(java: Path, classpath: Path, main: str) -> Iterator[subprocess.Popen[str]]:
    """The program running under `java` until it has printed "ready"; killed after."""
    process = subprocess.Popen(
        [str(java), "-Xmx32m", "-XX:+UseSerialGC", "-cp", str(classpath), main], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        yield process
    finally:
        process.kill()
        process.wait()


def javap_lines(classpath: Path, name: str) -> dict[str, list[tuple[int, int]]]:
    """Each method's (start bci, line) pairs, by method name, from `javap -l`."""
    javap = JDKS[0].parent / "javap"
    text = subprocess.run(
        [str(javap), "-l", "-cp", str(classpath), name], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    tables: dict[str, list[tuple[int, int]]] = {}
    current = None
    for line in text.splitlines():
        declared = re.match(r"\s+(?:[\w.\[\]<>$]+\s+)*([\w$<>]+)\(.*\)[^;]*;$", line)
        if declared:
            current = tables.setdefault(declared.group(1), [])
            continue
        entry = re.match(r"\s+line (\d+): (\d+)$", line)
        if entry and current is not None:
            current.append((int(entry.group(2)), int(entry.group(1))))
    return tables
