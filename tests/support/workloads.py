"""Compile the C workloads in tests/workloads with frame pointers (Debian's libc has none of its own)."""

from __future__ import annotations

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
