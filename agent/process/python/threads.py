"""Process stage: how the BPF walker finds each thread's `PyThreadState` in one CPython process.

This module owns, all read from outside the process with a `MemoryReader`:
- `walk_threads`: every thread state of every interpreter (`_PyRuntime.interpreters.head`, then
  `interp->next`, each `interp->threads.head` and `tstate->next`), bounded and cycle-safe, each one
  checked to point back at its interpreter. `ThreadState.thread_id` is the thread's `pthread_t`,
  which on glibc and musl x86-64 is also its TLS base (fsbase): the key the BPF side looks threads up by.
- `read_tss_key`: the `Py_tss_t` (`_is_initialized`, `_key`) of `_PyRuntime.autoTSSkey`.
- `find_tls_slot`: where, from a thread's fsbase, glibc keeps `pthread_getspecific(key)`'s value:
  `specific_1stblock[key].data` for keys below 32 (struct pthread_key_data is {seq, data}), else
  `specific[key / 32][key % 32].data`. The offset is not assumed from a glibc version: it is found in
  each thread's own struct pthread as the word holding that thread's thread state (with an in-use, odd
  `seq` before it), and must be the same for every thread walked; glibc's `pthread_getspecific` code,
  when it has the known shape, must agree (see `agent.process.python.x86`).
- `thread_map`: {pthread_t: tstate}, what user space writes to `python_threads` (3.14+, or when the
  slot cannot be used).

Failures are `ThreadsError(reason)`, the reason a label the inspector counts.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from agent.errors import AgentError
from agent.process.memory import MemoryReader
from agent.process.python.layouts import NO_FIELD, PythonLayout
from agent.process.python.x86 import SpecificOffsets

MAX_INTERPRETERS = 64
MAX_THREADS = 4096  # a thread list longer than this is taken as garbage (or a cycle we did not see)
PTHREAD_KEYS_MAX = 1024  # glibc's and musl's limit: a larger key is not a key
KEYS_PER_BLOCK = 32  # PTHREAD_KEY_2NDLEVEL_SIZE
KEY_DATA_SIZE = 16  # struct pthread_key_data {uintptr_t seq; void *data;}
# How much of a thread's struct pthread is searched (glibc 2.36 has specific_1stblock at 0x310 and
# specific at 0x510; the struct is about 0x900 bytes). A thread's struct pthread is at the top of its
# stack mapping, so the window is read page by page and may end early.
PTHREAD_WINDOW = 0x1000
_PAGE = 4096
_UNREACHABLE = frozenset({"gone", "denied"})  # agent.process.memory.MemoryErrorReason values
USER_ADDRESS_END = 1 << 47  # x86-64 user space (4-level paging; 5-level user space is opt-in per mapping)


class ThreadsError(AgentError):
    """The thread states could not be found or used; `reason` is the counted label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"python threads: {reason}: {detail}")
        self.reason = reason


class ThreadState(NamedTuple):
    address: int  # the PyThreadState
    thread_id: int  # pthread_t: the thread's TLS base (fsbase)
    native_thread_id: int  # the kernel tid (3.11+), 0 when the layout has none


def read_u64(memory: MemoryReader, address: int) -> int:
    value: int = struct.unpack("<Q", read_bytes(memory, address, 8))[0]
    return value


def read_bytes(memory: MemoryReader, address: int, size: int) -> bytes:
    if not 0 < address <= USER_ADDRESS_END - size:
        raise ThreadsError("bad_pointer", f"{address:#x} is not a user address")
    try:
        data = memory.read(address, size)
    except (OSError, AgentError) as e:
        # The process gone or out of reach is a failed read; memory that is not mapped where a pointer
        # led is a structure that is not what the layout says.
        unreachable = str(getattr(e, "reason", "")) in _UNREACHABLE or isinstance(e, ProcessLookupError)
        reason = "read_failed" if unreachable else "bad_pointer"
        raise ThreadsError(reason, f"{size} bytes at {address:#x}: {e}") from e
    if len(data) != size:
        raise ThreadsError("bad_pointer", f"{size} bytes at {address:#x}: got {len(data)}")
    return data


def walk_threads(memory: MemoryReader, layout: PythonLayout, runtime: int) -> tuple[ThreadState, ...]:
    """Every thread state of every interpreter of the runtime at `runtime` (`_PyRuntime`'s address)."""
    for name in ("runtime_interpreters_head", "interp_threads_head", "tstate_next", "tstate_thread_id"):
        if getattr(layout, name) == NO_FIELD:
            raise ThreadsError("no_layout", f"{name} unknown for {layout.version}")
    threads: list[ThreadState] = []
    seen: set[int] = set()
    interp = read_u64(memory, runtime + layout.runtime_interpreters_head)
    for _ in range(MAX_INTERPRETERS):
        if not interp:
            return tuple(threads)
        threads.extend(_interpreter_threads(memory, layout, interp, seen))
        if layout.interp_next == NO_FIELD:
            return tuple(threads)
        interp = read_u64(memory, interp + layout.interp_next)
    raise ThreadsError("too_many_interpreters", f"more than {MAX_INTERPRETERS}")


def _interpreter_threads(memory: MemoryReader, layout: PythonLayout, interp: int, seen: set[int]) -> list[ThreadState]:
    out: list[ThreadState] = []
    tstate = read_u64(memory, interp + layout.interp_threads_head)
    while tstate:
        if tstate in seen:
            raise ThreadsError("thread_cycle", f"thread state {tstate:#x} seen twice")
        if len(seen) >= MAX_THREADS:
            raise ThreadsError("too_many_threads", f"more than {MAX_THREADS} thread states")
        seen.add(tstate)
        if layout.tstate_interp != NO_FIELD and read_u64(memory, tstate + layout.tstate_interp) != interp:
            raise ThreadsError("bad_thread_state", f"thread state {tstate:#x} is not its interpreter's")
        native = 0
        if layout.tstate_native_thread_id != NO_FIELD:
            native = read_u64(memory, tstate + layout.tstate_native_thread_id) & 0xFFFFFFFF
        out.append(ThreadState(tstate, read_u64(memory, tstate + layout.tstate_thread_id), native))
        tstate = read_u64(memory, tstate + layout.tstate_next)
    return out


def read_tss_key(memory: MemoryReader, address: int, key_field: int = 4) -> int:
    """The pthread key of the initialized `Py_tss_t` at `address`."""
    raw = read_bytes(memory, address, 8)
    initialized = struct.unpack_from("<i", raw, 0)[0]
    key: int = struct.unpack_from("<I", raw, key_field)[0]
    if initialized != 1:
        raise ThreadsError("tss_uninitialized", f"Py_tss_t at {address:#x}: _is_initialized={initialized}")
    if key >= PTHREAD_KEYS_MAX:
        raise ThreadsError("tss_bad_key", f"Py_tss_t at {address:#x}: key {key}")
    return key


@dataclass(frozen=True, slots=True)
class TlsSlot:
    """python_proc's tls_offset/tls_second_offset: the tstate is at fsbase + tls_offset, or (second
    nonzero) at *(fsbase + tls_offset) + tls_second_offset."""

    tls_offset: int
    tls_second_offset: int = 0


def bound_threads(threads: Iterable[ThreadState]) -> list[ThreadState]:
    """The thread states bound to a thread (3.12+ creates a new thread's state before it runs: id 0)."""
    return [t for t in threads if t.thread_id]


def find_tls_slot(
    memory: MemoryReader, threads: Sequence[ThreadState], key: int, libc: SpecificOffsets | None = None
) -> TlsSlot:
    """The TLS slot of pthread key `key`, the same for every bound thread in `threads` (see the module
    docstring); `libc` is what glibc's `pthread_getspecific` code says, when it could be decoded."""
    bound = bound_threads(threads)
    if not bound:
        raise ThreadsError("no_threads", "no thread state bound to a thread")
    if key < KEYS_PER_BLOCK:
        bases = [_first_block_candidates(memory, t, key) for t in bound]
        slot_base = _agreed(bases, "first block")
        if libc is not None and libc.first_block != slot_base:
            detail = f"found {slot_base:#x}, pthread_getspecific has {libc.first_block:#x}"
            raise ThreadsError("tls_libc_mismatch", detail)
        return TlsSlot(slot_base + KEY_DATA_SIZE * key + 8)
    specifics = [_specific_candidates(memory, t, key) for t in bound]
    specific = _agreed(specifics, "specific array")
    if libc is not None and libc.specific is not None and libc.specific != specific:
        raise ThreadsError("tls_libc_mismatch", f"found {specific:#x}, pthread_getspecific has {libc.specific:#x}")
    return TlsSlot(specific + 8 * (key // KEYS_PER_BLOCK), KEY_DATA_SIZE * (key % KEYS_PER_BLOCK) + 8)


def _agreed(candidates: list[set[int]], what: str) -> int:
    common = set.intersection(*candidates)
    if len(common) != 1:
        found = "no offset" if not common else f"{len(common)} offsets"
        raise ThreadsError("tls_slot_not_found", f"{found} of the {what} holds every thread's state")
    return common.pop()


def read_window(memory: MemoryReader, address: int, size: int = PTHREAD_WINDOW) -> bytes:
    """Up to `size` readable bytes at `address`, page by page; b"" when the first page is unreadable."""
    chunks: list[bytes] = []
    end, at = min(address + size, USER_ADDRESS_END), address
    while 0 < at < end:
        step = min(end, (at // _PAGE + 1) * _PAGE) - at
        try:
            data = memory.read(at, step)
        except (OSError, AgentError):
            break
        chunks.append(data)
        if len(data) != step:
            break
        at += step
    return b"".join(chunks)


def _words(window: bytes) -> tuple[int, ...]:
    return struct.unpack_from(f"<{len(window) // 8}Q", window)


def _first_block_candidates(memory: MemoryReader, thread: ThreadState, key: int) -> set[int]:
    """Offsets `base` where this thread's struct pthread has {odd seq, its tstate} at base + 16 * key."""
    words = _words(read_window(memory, thread.thread_id))
    into = KEY_DATA_SIZE * key + 8
    return {
        i * 8 - into
        for i, word in enumerate(words)
        if word == thread.address and i * 8 >= into and words[i - 1] & 1  # seq: odd while the key is in use
    }


def _specific_candidates(memory: MemoryReader, thread: ThreadState, key: int) -> set[int]:
    """Offsets of `specific` in this thread's struct pthread: specific[0] points back into the struct (at
    specific_1stblock), and specific[key / 32] at a block whose slot key % 32 holds the tstate."""
    fsbase = thread.thread_id
    window = read_window(memory, fsbase)
    words = _words(window)
    index, slot = key // KEYS_PER_BLOCK, KEY_DATA_SIZE * (key % KEYS_PER_BLOCK)
    found: set[int] = set()
    for i, word in enumerate(words):
        if not fsbase < word < fsbase + len(window) or i + index >= len(words):
            continue
        block = words[i + index]
        if not block:
            continue
        try:
            seq, data = struct.unpack("<QQ", read_bytes(memory, block + slot, 16))
        except ThreadsError:
            continue
        if data == thread.address and seq & 1:
            found.add(i * 8)
    return found


def read_tls_slot(memory: MemoryReader, fsbase: int, slot: TlsSlot) -> int:
    """What the BPF walker will read as this thread's tstate (the validation re-reads it)."""
    value = read_u64(memory, fsbase + slot.tls_offset)
    if slot.tls_second_offset:
        value = read_u64(memory, value + slot.tls_second_offset)
    return value


def thread_map(threads: Iterable[ThreadState]) -> dict[int, int]:
    """{pthread_t: tstate} of the bound threads: python_threads' entries for one process."""
    return {t.thread_id: t.address for t in threads if t.thread_id}
