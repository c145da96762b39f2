"""Process stage: ProcessMemory against a child process (no root needed: a parent may read its child).

The child lays out known bytes (a buffer, integers, the last 8 bytes of a page whose next page it
unmapped) and prints their addresses; both read paths (process_vm_readv and /proc/PID/mem) must return
them exactly and classify what cannot be read: unmapped (fault), crossing into unmapped (short), an
exited process (gone), oversized requests (too_large).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.process import memory as memory_module
from agent.process.memory import MAX_READ, MemoryErrorReason, MemoryReadError, ProcessMemory

CHILD = r"""
import ctypes, json, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
payload = bytes(range(256)) * 64
buffer = ctypes.create_string_buffer(payload, len(payload))
numbers = (ctypes.c_uint64 * 2)(0x1122334455667788, 0xFFFFFFFFFFFFFFFF)
small = (ctypes.c_int32 * 2)(-5, 0x7EADBEEF)
page = libc.mmap(None, 8192, 3, 0x22, -1, 0)  # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
ctypes.memmove(page + 4096 - 8, b"EDGEEDGE", 8)
assert libc.munmap(page + 4096, 4096) == 0
hole = libc.mmap(None, 4096, 3, 0x22, -1, 0)
assert libc.munmap(hole, 4096) == 0
print(json.dumps({
    "buffer": ctypes.addressof(buffer), "numbers": ctypes.addressof(numbers), "small": ctypes.addressof(small),
    "edge": page + 4096 - 8, "hole": hole,
}), flush=True)
sys.stdin.read()
"""


@pytest.fixture()
def child() -> Iterator[tuple[subprocess.Popen[str], dict[str, int]]]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    addresses = json.loads(proc.stdout.readline())
    yield proc, addresses
    proc.kill()
    proc.wait()


@pytest.fixture(params=[True, False], ids=["process_vm_readv", "proc_mem"])
def prefer_syscall(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _reason(memory: ProcessMemory, address: int, size: int) -> MemoryErrorReason:
    with pytest.raises(MemoryReadError) as err:
        memory.read(address, size)
    assert (err.value.pid, err.value.address, err.value.size) == (memory.pid, address, size)
    return err.value.reason


def test_reads_the_childs_bytes(child: tuple[subprocess.Popen[str], dict[str, int]], prefer_syscall: bool) -> None:
    proc, at = child
    with ProcessMemory(proc.pid, prefer_syscall=prefer_syscall) as memory:
        assert memory.method == ("process_vm_readv" if prefer_syscall else "proc_mem")
        assert memory.read(at["buffer"], 256 * 64) == bytes(range(256)) * 64
        assert memory.read(at["buffer"] + 250, 10) == bytes([250, 251, 252, 253, 254, 255, 0, 1, 2, 3])
        assert memory.read_u64(at["numbers"]) == 0x1122334455667788
        assert memory.read_ptr(at["numbers"] + 8) == 0xFFFFFFFFFFFFFFFF
        assert memory.read_u32(at["numbers"]) == 0x55667788
        assert memory.read_i32(at["small"]) == -5
        assert memory.read_i32(at["small"] + 4) == 0x7EADBEEF
        assert memory.read(at["edge"], 8) == b"EDGEEDGE"
        assert memory.read(at["buffer"], 0) == b""
        assert memory.reads == 8  # the empty read is not one
        assert memory.bytes_read == 256 * 64 + 10 + 8 + 8 + 4 + 4 + 4 + 8


def test_bad_addresses(child: tuple[subprocess.Popen[str], dict[str, int]], prefer_syscall: bool) -> None:
    proc, at = child
    with ProcessMemory(proc.pid, prefer_syscall=prefer_syscall) as memory:
        assert _reason(memory, 0, 8) == MemoryErrorReason.FAULT
        assert _reason(memory, 8, 8) == MemoryErrorReason.FAULT
        assert _reason(memory, at["hole"], 16) == MemoryErrorReason.FAULT
        assert _reason(memory, 0xFFFF_8000_0000_0000, 8) == MemoryErrorReason.FAULT  # kernel half
        assert _reason(memory, (1 << 64) - 4, 8) == MemoryErrorReason.FAULT  # wraps past the top
        assert _reason(memory, -4096, 8) == MemoryErrorReason.FAULT
        assert _reason(memory, at["edge"], 16) == MemoryErrorReason.SHORT
        assert _reason(memory, at["buffer"], MAX_READ + 1) == MemoryErrorReason.TOO_LARGE
        assert _reason(memory, at["buffer"], -1) == MemoryErrorReason.TOO_LARGE
        # The process is still readable after all that.
        assert memory.read(at["edge"], 8) == b"EDGEEDGE"


def test_a_process_that_exited(child: tuple[subprocess.Popen[str], dict[str, int]], prefer_syscall: bool) -> None:
    proc, at = child
    memory = ProcessMemory(proc.pid, prefer_syscall=prefer_syscall)
    assert memory.read(at["edge"], 8) == b"EDGEEDGE"  # opens /proc/PID/mem before the exit, on that path
    proc.kill()
    proc.wait()
    assert _reason(memory, at["edge"], 8) == MemoryErrorReason.GONE
    assert _reason(ProcessMemory(proc.pid, prefer_syscall=prefer_syscall), at["edge"], 8) == MemoryErrorReason.GONE
    memory.close()
    memory.close()  # twice is fine


def test_fake_proc_without_a_mem_file(tmp_path: Path) -> None:
    memory = ProcessMemory(4242, proc_root=tmp_path, prefer_syscall=False)
    assert _reason(memory, 0x1000, 8) == MemoryErrorReason.GONE


def _refusing_syscall(err: int) -> Callable[..., int]:
    def refuse(*args: object) -> int:
        ctypes.set_errno(err)
        return -1

    return refuse


@pytest.mark.parametrize("err", [errno.EPERM, errno.ENOSYS], ids=["EPERM", "ENOSYS"])
def test_falls_back_to_proc_mem_when_the_syscall_is_refused(
    child: tuple[subprocess.Popen[str], dict[str, int]], monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    proc, at = child
    monkeypatch.setattr(memory_module, "_PROCESS_VM_READV", _refusing_syscall(err))
    with ProcessMemory(proc.pid) as memory:
        assert memory.method == "process_vm_readv"
        assert memory.read(at["edge"], 8) == b"EDGEEDGE"
        assert memory.method == "proc_mem"  # kept for the following reads
        assert _reason(memory, at["hole"], 8) == MemoryErrorReason.FAULT


def test_denied_on_both_paths(
    child: tuple[subprocess.Popen[str], dict[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """EPERM from the syscall and EACCES opening /proc/PID/mem (what a non-root reader of a foreign pid gets)."""
    proc, at = child
    monkeypatch.setattr(memory_module, "_PROCESS_VM_READV", _refusing_syscall(errno.EPERM))
    real_open = os.open

    def no_access(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        if str(path).endswith(f"/{proc.pid}/mem"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(memory_module.os, "open", no_access)
    memory = ProcessMemory(proc.pid)
    assert _reason(memory, at["edge"], 8) == MemoryErrorReason.DENIED
    assert memory.method == "process_vm_readv"  # nothing worked, so nothing was switched
