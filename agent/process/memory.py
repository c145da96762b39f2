"""Process stage: reading another process's memory (the interpreter readers under agent/process/python).

This module owns `ProcessMemory`, which reads a live process's address space by pid with
`process_vm_readv(2)` (one copy, no ptrace stop, no file descriptor), and falls back to pread on
`/proc/PID/mem` when the system call is refused outright (ENOSYS, or EPERM from a seccomp filter that
blocks it while ptrace access itself is allowed). Both need the same ptrace access to the target.

Every failure is a `MemoryReadError` with a reason: `fault` (nothing mapped there), `short` (the read
crossed into unmapped memory part way), `gone` (the process exited), `denied` (no ptrace access), or
`too_large` (a size past `MAX_READ`: lengths read from foreign memory can be garbage, so a read is
bounded before anything is allocated).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from agent.errors import AgentError

MAX_READ = 4 << 20  # bytes in one read; code objects, strings and line tables are far smaller
ADDRESS_LIMIT = 1 << 64
_SCRATCH_SIZE = 4096  # reads up to this size go through one reused buffer

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")


class MemoryErrorReason(enum.StrEnum):
    FAULT = "fault"  # the address (its first page) is not mapped in the target
    SHORT = "short"  # the read ran into unmapped memory after some bytes
    GONE = "gone"  # the process no longer exists
    DENIED = "denied"  # no ptrace access to the process (EPERM/EACCES on both paths)
    TOO_LARGE = "too_large"  # refused before reading: more than MAX_READ bytes


class MemoryReadError(AgentError):
    """One read of one process failed; callers count `reason` and go on."""

    def __init__(self, pid: int, address: int, size: int, reason: MemoryErrorReason, detail: str = "") -> None:
        suffix = f": {detail}" if detail else ""
        super().__init__(f"pid {pid}: read of {size} bytes at {address:#x}: {reason}{suffix}")
        self.pid = pid
        self.address = address
        self.size = size
        self.reason = reason


class MemoryReader(Protocol):
    """What the object readers need of a process's memory (`ProcessMemory`, or a fixture in tests)."""

    pid: int

    def read(self, address: int, size: int) -> bytes:
        """Exactly `size` bytes at `address`, or a MemoryReadError."""
        ...


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _load_process_vm_readv() -> Callable[..., int] | None:
    """libc's process_vm_readv, or None where the C library lacks it (then /proc/PID/mem is used)."""
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        function: Any = ctypes.CDLL(name, use_errno=True).process_vm_readv
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_ssize_t
    function.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_Iovec),
        ctypes.c_ulong,
        ctypes.POINTER(_Iovec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    return function


_PROCESS_VM_READV = _load_process_vm_readv()
_GONE_ERRNOS = frozenset({errno.ESRCH, errno.ENOENT})
_DENIED_ERRNOS = frozenset({errno.EPERM, errno.EACCES})


class ProcessMemory:
    """Reads of one process's memory by address; not tied to a mapping, so a container needs nothing more.

    `method` says which path reads ("process_vm_readv" or "proc_mem"); it moves to "proc_mem" for good
    the first time the system call is refused and the file works. `prefer_syscall=False` starts there.
    """

    def __init__(self, pid: int, proc_root: str | Path = "/proc", *, prefer_syscall: bool = True) -> None:
        self.pid = pid
        self._mem_path = Path(proc_root) / str(pid) / "mem"
        self._use_syscall = prefer_syscall and _PROCESS_VM_READV is not None
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._scratch_lock = threading.Lock()
        self._scratch = ctypes.create_string_buffer(_SCRATCH_SIZE)
        self._local = _Iovec(ctypes.addressof(self._scratch), _SCRATCH_SIZE)
        self._remote = _Iovec(0, 0)
        self.reads = 0
        self.bytes_read = 0

    @property
    def method(self) -> str:
        return "process_vm_readv" if self._use_syscall else "proc_mem"

    def read(self, address: int, size: int) -> bytes:
        """Exactly `size` bytes at `address`, or a MemoryReadError saying why not."""
        if size > MAX_READ or size < 0:
            raise MemoryReadError(self.pid, address, size, MemoryErrorReason.TOO_LARGE, f"limit {MAX_READ}")
        if size == 0:
            return b""
        if address <= 0 or address + size > ADDRESS_LIMIT:
            raise MemoryReadError(self.pid, address, size, MemoryErrorReason.FAULT, "address out of range")
        data = self._read_syscall(address, size) if self._use_syscall else None
        if data is None:
            data = self._read_file(address, size)
        self.reads += 1
        self.bytes_read += len(data)
        return data

    def read_u64(self, address: int) -> int:
        return int(_U64.unpack(self.read(address, 8))[0])

    def read_ptr(self, address: int) -> int:
        """A pointer of the target (x86-64: 8 bytes, little-endian)."""
        return self.read_u64(address)

    def read_u32(self, address: int) -> int:
        return int(_U32.unpack(self.read(address, 4))[0])

    def read_i32(self, address: int) -> int:
        return int(_I32.unpack(self.read(address, 4))[0])

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> ProcessMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_syscall(self, address: int, size: int) -> bytes | None:
        """The bytes, or None when the system call itself is refused (then the file is tried)."""
        assert _PROCESS_VM_READV is not None
        if size > _SCRATCH_SIZE:
            buffer = ctypes.create_string_buffer(size)
            got, err, data = self._syscall(buffer, address, size)
        else:
            with self._scratch_lock:  # small reads (nearly all) reuse one buffer and its iovecs
                got, err, data = self._syscall(self._scratch, address, size)
        if got == size:
            return data
        if got >= 0:
            raise MemoryReadError(self.pid, address, size, MemoryErrorReason.SHORT, f"got {got}")
        if err == errno.EFAULT:
            raise MemoryReadError(self.pid, address, size, MemoryErrorReason.FAULT)
        if err in _GONE_ERRNOS:
            raise MemoryReadError(self.pid, address, size, MemoryErrorReason.GONE)
        if err in (errno.EPERM, errno.ENOSYS):
            return None  # refused (seccomp, no syscall): /proc/PID/mem may still be allowed
        raise MemoryReadError(self.pid, address, size, MemoryErrorReason.FAULT, os.strerror(err))

    def _syscall(self, buffer: ctypes.Array[ctypes.c_char], address: int, size: int) -> tuple[int, int, bytes]:
        """(bytes transferred, errno, the bytes when all came) of one process_vm_readv into `buffer`."""
        assert _PROCESS_VM_READV is not None
        if buffer is self._scratch:  # under _scratch_lock: the iovecs are reused too
            local, remote = self._local, self._remote
            local.iov_len, remote.iov_base, remote.iov_len = size, address, size
        else:
            local, remote = _Iovec(ctypes.addressof(buffer), size), _Iovec(address, size)
        got = _PROCESS_VM_READV(self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got == size:
            return got, 0, ctypes.string_at(buffer, size)
        return got, ctypes.get_errno() if got < 0 else 0, b""

    def _read_file(self, address: int, size: int) -> bytes:
        fd = self._open(address, size)
        try:
            data = os.pread(fd, size, address)
        except OSError as e:
            raise self._file_error(address, size, e) from e
        except OverflowError as e:  # an address past the signed file offset range
            raise MemoryReadError(self.pid, address, size, MemoryErrorReason.FAULT, "offset overflow") from e
        if len(data) == size:
            if self._use_syscall:
                self._use_syscall = False  # the syscall was refused but the file works: keep to it
            return data
        if not data:
            reason = MemoryErrorReason.FAULT if self._alive() else MemoryErrorReason.GONE
            raise MemoryReadError(self.pid, address, size, reason)
        raise MemoryReadError(self.pid, address, size, MemoryErrorReason.SHORT, f"got {len(data)}")

    def _open(self, address: int, size: int) -> int:
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open(self._mem_path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise self._file_error(address, size, e) from e
            return self._fd

    def _file_error(self, address: int, size: int, error: OSError) -> MemoryReadError:
        if error.errno in _GONE_ERRNOS:
            reason = MemoryErrorReason.GONE
        elif error.errno in _DENIED_ERRNOS:
            reason = MemoryErrorReason.DENIED
        elif error.errno == errno.EIO and not self._alive():
            reason = MemoryErrorReason.GONE
        else:
            reason = MemoryErrorReason.FAULT  # EIO: nothing mapped at that offset; EINVAL: out of range
        return MemoryReadError(self.pid, address, size, reason, os.strerror(error.errno or 0))

    def _alive(self) -> bool:
        """Whether the process still has an address space (a reaped or zombie one reads nothing)."""
        try:
            status = (self._mem_path.parent / "stat").read_text()
        except OSError:
            return False
        return status.rpartition(")")[2].split()[:1] != ["Z"]
