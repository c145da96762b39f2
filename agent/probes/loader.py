"""Probes stage: compiles and loads the C program in `bpf/` through BCC.

Owns locating the sources (relative to this package, never bcc's argv[0]-relative lookup), the
cflags that parameterise them (which profilers are compiled in, and their sizes), wrapping bcc's bare
`Exception`s into `BpfLoadError`, and the `--dump-bpf` output. Nothing is templated with string
replacement: parameters are -D flags.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.errors import BpfLoadError

logger = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent.parent.parent / "bpf"


def bpf_source(name: str) -> Path:
    path = BPF_DIR / f"{name}.bpf.c"
    if not path.is_file():
        raise BpfLoadError(f"BPF source {path} is missing (is the agent installed completely?)")
    return path


def cflags(defines: Mapping[str, int | str]) -> list[str]:
    return [f"-I{BPF_DIR}", *(f"-D{key}={value}" for key, value in sorted(defines.items()))]


# The headers the programs include (from bpf/), printed by --dump-bpf before the program itself.
HEADERS = ("common.h", "alloc_math.h")


def dump_program(name: str, defines: Mapping[str, int | str]) -> str:
    """The exact source files and flags BCC is given, for `--dump-bpf`."""
    parts = [f"// program: {name}", f"// cflags: {' '.join(cflags(defines))}"]
    for path in (*(BPF_DIR / header for header in HEADERS), bpf_source(name)):
        parts += [f"// ---- {path} ----", path.read_text(encoding="utf-8")]
    return "\n".join(parts)


def load_program(name: str, defines: Mapping[str, int | str]) -> Any:
    """Compile and load one program; returns the `bcc.BPF` object."""
    try:
        from bcc import BPF
    except ImportError as e:
        raise BpfLoadError(
            "the BCC Python bindings are not importable; install the distribution package (Debian: "
            "python3-bpfcc) and run the agent from a venv made with --system-site-packages (`make setup`)"
        ) from e
    source = bpf_source(name)
    flags = cflags(defines)
    logger.debug("compiling %s with %s", source, flags)
    try:
        return BPF(src_file=str(source).encode(), cflags=flags)
    except Exception as e:  # bcc raises bare Exception for compile and load failures
        raise BpfLoadError(
            f"could not compile/load {source.name}: {e} (run `profiling-agent check` for the host's readiness)"
        ) from e


# The compiler's code (LLVM, clang, libbcc) stays resident after the programs are loaded although the
# agent seldom runs it again: about 75 MB of file-backed text on Debian's LLVM 14.
_COMPILER_LIBRARIES = ("libLLVM", "libclang", "libbcc")
MADV_DONTNEED = 4


def release_compiler_memory(maps: Path = Path("/proc/self/maps")) -> None:
    """Hand the memory the compiler used back to the OS (measured here: 183 MB -> 39 MB resident).

    `malloc_trim` returns the freed heap. The compiler libraries' text is then dropped from the page
    tables with MADV_DONTNEED: only their `r-xp` mappings, which are never written (relocated and RELRO
    pages are `r--p`/`rw-p` and must keep their private copies), so any later use just faults the pages
    back in from the file.
    """
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    with contextlib.suppress(OSError, AttributeError):
        libc.malloc_trim(0)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    try:
        lines = maps.read_text().splitlines()
    except OSError as e:
        logger.debug("cannot read %s: %s", maps, e)
        return
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[1] != "r-xp" or not any(lib in fields[5] for lib in _COMPILER_LIBRARIES):
            continue
        start, end = (int(address, 16) for address in fields[0].split("-"))
        if libc.madvise(start, end - start, MADV_DONTNEED) != 0:
            logger.debug("madvise(%s) failed: %s", fields[5], os.strerror(ctypes.get_errno()))
