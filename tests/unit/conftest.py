"""Shared fixtures of the unit tests.

Symbolize stage: small C programs compiled with gcc into a session temp dir (PIE, non-PIE, stripped
shared library), the binutils truth about them (`nm`, `readelf`), and a factory for fake `/proc`
trees so the symbolizer runs without privileges.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.fixture_types import AddFakeProcess, LoadRow, MapsFor, NmFunctions, ReadelfLoads

# Functions are noinline and built at -O0 so they exist, in source order, with no alignment padding.
# zero_size_fn is assembly without a .size directive: an ELF symbol of size 0.
SYMBOLIZE_WORKLOAD_C = r"""
#include <stdlib.h>
volatile unsigned long sink;
__asm__(".text\n.globl zero_size_fn\n.type zero_size_fn, %function\nzero_size_fn:\n nop\n nop\n nop\n nop\n ret\n");
__attribute__((noinline)) void leaf_a(unsigned long n) { for (unsigned long i = 0; i < n; i++) sink += i; }
__attribute__((noinline)) void middle_b(unsigned long n) { leaf_a(n); sink ^= n; }
__attribute__((noinline)) void outer_c(unsigned long n) { middle_b(n); middle_b(n + 1); }
int main(int argc, char **argv) {
    unsigned long n = argc > 1 ? strtoul(argv[1], 0, 10) : 1000;
    do outer_c(n); while (argc > 2);  /* a second argument makes it spin forever */
    return 0;
}
"""

PAGE = 4096


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="session")
def symbolize_binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"pie", "nopie", "stripped_lib"} built from SYMBOLIZE_WORKLOAD_C with frame pointers and a build id."""
    if shutil.which("gcc") is None or shutil.which("nm") is None:
        pytest.skip("gcc and binutils are needed to build the symbolize test programs")
    out = tmp_path_factory.mktemp("symbolize_bin")
    src = out / "workload.c"
    src.write_text(SYMBOLIZE_WORKLOAD_C)
    common = ["gcc", "-O0", "-fno-omit-frame-pointer", "-fno-inline", "-Wl,--build-id=sha1"]
    binaries = {"pie": out / "workload_pie", "nopie": out / "workload_nopie", "stripped_lib": out / "libworkload.so"}
    _run(*common, "-fPIE", "-pie", "-o", str(binaries["pie"]), str(src))
    _run(*common, "-no-pie", "-o", str(binaries["nopie"]), str(src))
    unstripped = out / "libworkload_full.so"
    _run(*common, "-fPIC", "-shared", "-o", str(unstripped), str(src))
    _run("strip", "--strip-all", "-o", str(binaries["stripped_lib"]), str(unstripped))
    return binaries


@pytest.fixture(scope="session")
def nm_functions() -> NmFunctions:
    """read(path, weak=False) -> {name: (address, size)} of the defined text symbols `nm` lists.

    Uses `nm -D` when there is no .symtab. Weak symbols (`W`) are only included on request: nm shows
    weak data of no declared type (crt's `data_start`) as `W` too, while libc exports functions as `W`.
    """

    def read(path: Path, weak: bool = False) -> dict[str, tuple[int, int]]:
        types = "tTwW" if weak else "tT"
        listing = _run("nm", "--defined-only", "-S", str(path))
        if not listing.strip():
            listing = _run("nm", "-D", "--defined-only", "-S", str(path))
        functions: dict[str, tuple[int, int]] = {}
        for line in listing.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[2] in types:
                functions[parts[3].split("@")[0]] = (int(parts[0], 16), int(parts[1], 16))
            elif len(parts) == 3 and parts[1] in types:
                functions[parts[2].split("@")[0]] = (int(parts[0], 16), 0)
        return functions

    return read


@pytest.fixture(scope="session")
def readelf_loads() -> ReadelfLoads:
    """PT_LOAD rows of `readelf -lW`: (offset, vaddr, filesz, memsz, flags)."""

    def read(path: Path) -> list[LoadRow]:
        rows: list[LoadRow] = []
        for line in _run("readelf", "-lW", str(path)).splitlines():
            parts = line.split()
            if parts and parts[0] == "LOAD":
                flags = " ".join(parts[6:-1])
                rows.append((int(parts[1], 16), int(parts[2], 16), int(parts[4], 16), int(parts[5], 16), flags))
        return rows

    return read


@pytest.fixture(scope="session")
def maps_for(readelf_loads: ReadelfLoads) -> MapsFor:
    """/proc/PID/maps lines for `binary` loaded at `base` (0 for non-PIE), as the dynamic loader maps it."""

    def lines(binary: Path, base: int) -> list[str]:
        inode = os.stat(binary).st_ino
        result = []
        for offset, vaddr, filesz, _memsz, flags in readelf_loads(binary):
            start = base + (vaddr & ~(PAGE - 1))
            end = base + ((vaddr + filesz + PAGE - 1) & ~(PAGE - 1))
            perms = ("r" if "R" in flags else "-") + ("w" if "W" in flags else "-") + ("x" if "E" in flags else "-")
            file_offset = offset & ~(PAGE - 1)
            result.append(f"{start:x}-{end:x} {perms}p {file_offset:08x} fd:01 {inode} {binary}")
        return result

    return lines


@pytest.fixture
def fake_proc(tmp_path: Path) -> Path:
    """An empty directory standing for /proc."""
    root = tmp_path / "proc"
    root.mkdir()
    return root


@pytest.fixture
def add_fake_process(fake_proc: Path) -> AddFakeProcess:
    """add(pid, maps_lines, comm="prog", exe=None) -> fake_proc/PID, with `root` linked to the host's /."""

    def add(pid: int, maps_lines: list[str], comm: str = "prog", exe: Path | None = None) -> Path:
        pid_dir = fake_proc / str(pid)
        pid_dir.mkdir()
        (pid_dir / "maps").write_text("".join(line + "\n" for line in maps_lines))
        (pid_dir / "comm").write_text(comm + "\n")
        (pid_dir / "root").symlink_to("/")
        if exe is not None:
            (pid_dir / "exe").symlink_to(exe)
        return pid_dir

    return add
