"""Compile the C workloads in tests/workloads with frame pointers (Debian's libc has none of its own), and C
programs a test writes itself; read a binary's GNU build ID and a process's CPU time."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

WORKLOADS = Path(__file__).resolve().parent.parent / "workloads"


def compile_workload(name: str, out_dir: Path, *extra: str) -> Path:
    binary = out_dir / name
    source = WORKLOADS / f"{name}.c"
    subprocess.run(
        ["gcc", "-O1", "-g", "-fno-omit-frame-pointer", "-pthread", "-o", str(binary), str(source), *extra],
        check=True,
    )
    return binary


def compile_c(source: str, out_dir: Path, name: str, *flags: str) -> Path:
    """`source` (C text) built as `out_dir/name` with a SHA-1 build ID, frame pointers and `flags`."""
    (out_dir / f"{name}.c").write_text(source)
    binary = out_dir / name
    command = ["gcc", "-fno-omit-frame-pointer", "-Wl,--build-id=sha1", *flags, "-o", str(binary)]
    subprocess.run([*command, str(out_dir / f"{name}.c")], check=True, timeout=120)
    return binary


def gnu_build_id(path: Path) -> str:
    """The binary's GNU build ID as readelf prints it."""
    notes = subprocess.run(["readelf", "-n", str(path)], check=True, capture_output=True, text=True).stdout
    match = re.search(r"Build ID: ([0-9a-f]+)", notes)
    assert match is not None, f"{path} has no GNU build ID"
    return match.group(1)


def cpu_seconds(pid: int) -> float:
    """The user and system CPU time of a live process so far, from /proc/PID/stat (in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
