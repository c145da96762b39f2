"""A known Python stack for the BPF walker's tests, for any CPython 3.10+.

Usage: python3 python_recursion.py DEPTH SECONDS
Prints one JSON line describing itself, then waits for one byte on stdin and runs
spin -> recurse x DEPTH -> main for SECONDS of CPU, then nap -> recurse x DEPTH -> main, blocking in
time.sleep (10 ms at a time) for as long again. What it prints, as the thread itself sees it:
- pthread (pthread_self), fs (arch_prctl(ARCH_GET_FS)): the TLS base the walker reads from the kernel;
- tstate (PyThreadState_Get) and tls_offsets: every 8-byte-aligned offset from the TLS base, within
  glibc's struct pthread, that holds the tstate (the autoTSSkey slot is one of them);
- runtime: the address of _PyRuntime and its first bytes in hex (3.13+: the debug offsets);
- codes: id(f.__code__) for each of its functions; version: sys.version_info[:2].
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


def spin(deadline: float) -> int:
    total = 0
    while time.thread_time() < deadline:
        for i in range(2000):
            total += i * i
    return total


def nap(deadline: float) -> None:
    while time.monotonic() < deadline:
        time.sleep(0.01)


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
    return {
        "pthread": pthread,
        "fs": fs.value,
        "tstate": tstate,
        "tls_offsets": offsets,
        "runtime": runtime,
        "runtime_bytes": ctypes.string_at(runtime, RUNTIME_BYTES).hex(),
        "codes": {f.__name__: id(f.__code__) for f in (spin, nap, recurse, main)},
        "version": list(sys.version_info[:2]),
    }


def main() -> None:
    depth, seconds = int(sys.argv[1]), float(sys.argv[2])
    print(json.dumps(describe()), flush=True)
    sys.stdin.read(1)
    recurse(depth, spin, time.thread_time() + seconds)
    recurse(depth, nap, time.monotonic() + seconds)


if __name__ == "__main__":
    main()
