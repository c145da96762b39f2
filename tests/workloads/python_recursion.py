"""A known Python stack for the BPF walker's tests, for any CPython 3.10+.

Usage: python3 python_recursion.py DEPTH SECONDS [PHASES]
Prints one JSON line describing itself, then waits for one byte on stdin and runs each phase (default
spin,nap) for SECONDS under recurse x DEPTH -> main: spin burns CPU, nap blocks in time.sleep (10 ms at
a time), grow allocates 1 MiB bytearrays (through malloc: large objects bypass pymalloc).
What it prints, as the thread itself sees it:
- pthread (pthread_self), fs (arch_prctl(ARCH_GET_FS)): the TLS base the walker reads from the kernel;
- tstate (PyThreadState_Get) and tls_offsets: every 8-byte-aligned offset from the TLS base, within
  glibc's struct pthread, that holds the tstate (the autoTSSkey slot is one of them);
- runtime: the address of _PyRuntime and its first bytes in hex (3.13+: the debug offsets);
- codes: id(f.__code__) for each of its functions, and code_headers: each one's first CODE_HEADER_BYTES
  bytes in hex (what the walker's fingerprint hashes is among them); version: sys.version_info[:2].
"""

import ctypes
import json
import sys
import time
from collections.abc import Callable

ARCH_GET_FS = 0x1003
SYS_ARCH_PRCTL = 158  # x86-64
PTHREAD_SEARCH_BYTES = 0x800  # inside glibc's struct pthread (over 2 KiB) on every release since 2.28
RUNTIME_BYTES = 1024
CODE_HEADER_BYTES = 160  # past every version's fingerprint window (PythonLayout.code_fingerprint + 64)


def spin(deadline: float) -> int:
    total = 0
    while time.thread_time() < deadline:
        for i in range(2000):
            total += i * i
    return total


def nap(deadline: float) -> None:
    while time.monotonic() < deadline:
        time.sleep(0.01)


def grow(deadline: float) -> int:
    total = 0
    while time.monotonic() < deadline:
        total += len(bytearray(1 << 20))
    return total


def recurse(depth: int, leaf: Callable[[float], object], deadline: float) -> object:
    if depth == 0:
        return leaf(deadline)
    return recurse(depth - 1, leaf, deadline)


def describe() -> dict[str, object]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.pthread_self.restype = ctypes.c_ulong
    pthread = libc.pthread_self()
    fs = ctypes.c_ulong()
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_FS, ctypes.byref(fs)) != 0:
        raise OSError(ctypes.get_errno(), "arch_prctl(ARCH_GET_FS)")
    api = ctypes.pythonapi
    api.PyThreadState_Get.restype = ctypes.c_void_p
    tstate = api.PyThreadState_Get()
    block = ctypes.string_at(pthread, PTHREAD_SEARCH_BYTES)
    needle = tstate.to_bytes(8, "little")
    offsets = [at for at in range(0, len(block) - 7, 8) if block[at : at + 8] == needle]
    runtime = ctypes.addressof(ctypes.c_char.in_dll(api, "_PyRuntime"))
    functions = (spin, nap, grow, recurse, main)
    return {
        "pthread": pthread,
        "fs": fs.value,
        "tstate": tstate,
        "tls_offsets": offsets,
        "runtime": runtime,
        "runtime_bytes": ctypes.string_at(runtime, RUNTIME_BYTES).hex(),
        "codes": {f.__name__: id(f.__code__) for f in functions},
        "code_headers": {f.__name__: ctypes.string_at(id(f.__code__), CODE_HEADER_BYTES).hex() for f in functions},
        "version": list(sys.version_info[:2]),
    }


def main() -> None:
    depth, seconds = int(sys.argv[1]), float(sys.argv[2])
    print(json.dumps(describe()), flush=True)
    sys.stdin.read(1)
    phases = sys.argv[3].split(",") if len(sys.argv) > 3 else ["spin", "nap"]
    for phase in phases:
        clock = time.thread_time if phase == "spin" else time.monotonic
        recurse(depth, {"spin": spin, "nap": nap, "grow": grow}[phase], clock() + seconds)


if __name__ == "__main__":
    main()
