"""Base module: the value types every stage shares, from the probes to the exporters.

This module owns `Stack` (one captured stack of raw addresses, with the kernel's `StackStatus`),
`EMPTY_STACK`, `ValueType` and `ProfileSpec` (what one profiler's sample values mean), and
`ImageLayout` (where a process image lies, as its announcement says: the probes make it, the process
registry lays out a process that has gone from it). The probes make
stacks and declare specs, the unwind stage replaces user stacks, and the aggregate, symbolize, pprof
and export stages read both; keeping them here, upstream of every stage, lets each import them without
importing a stage downstream of itself (see tests/unit/test_layering.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class StackStatus(enum.IntEnum):
    """What the kernel said about one stack of one event."""

    OK = 0
    MISSING = 1  # bpf_get_stack returned -EFAULT for a task that has user space: no stack could be walked
    ERROR = 2  # any other negative result
    TRUNCATED = 3  # the walk hit the kernel's depth limit; callers beyond it are gone
    NOT_COLLECTED = 4  # no such stack (a user-mode sample's kernel stack, a kernel thread's user stack)


@dataclass(frozen=True, slots=True)
class Stack:
    """One captured stack, leaf first. Callers' entries are return addresses, as the kernel walked them."""

    status: StackStatus
    addresses: tuple[int, ...] = ()
    # A JVM's user stack only: for each frame that ran in HotSpot's template interpreter, three words,
    # (index in `addresses`, Method*, bytecode pointer), read from the frame as the stack copy was
    # unwound (agent/process/jvm/frames.py); the symbolize stage names the Java method from them.
    java: tuple[int, ...] = ()
    # Hashed once: stacks are dictionary keys at every stage (aggregation, symbolization), and a
    # generated __hash__ would hash every address again on each lookup.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.status, self.addresses, self.java)))

    def __hash__(self) -> int:
        return self._hash


EMPTY_STACK = Stack(StackStatus.NOT_COLLECTED)


class InterpreterStatus(enum.IntEnum):
    """What the BPF walker said about one event's interpreter (Python) frames; see docs/python.md."""

    NONE = 0  # the process is not walked as Python (not Python, not validated, or python.enabled off)
    OK = 1
    TRUNCATED = 2  # the walk stopped at python.max_frames: the outermost callers are gone
    NO_THREAD_STATE = 3  # a thread of a Python process with no thread state (not running Python)
    READ_FAILED = 4  # reading the interpreter's memory faulted mid-walk
    NO_FSBASE = 5  # the thread's TLS base could not be read


# InterpreterStack.frames flags, in the low bits of each frame's first word (bpf/common.h PYTHON_FRAME_*).
PYTHON_FRAME_ENTRY = 1  # 3.11: the first frame of one _PyEval_EvalFrameDefault call
PYTHON_FRAME_SHIM = 2  # 3.12+: a C-stack shim frame; the word is the shim frame's own address
PYTHON_FRAME_FLAGS = 7
# Above this bit, a frame's first word holds its code object's 16-bit fingerprint (bpf/common.h): with the
# flags masked off, the word is a code key, (fingerprint << 48) | address, which tells apart the code
# objects CPython allocated at one address over a process's life.
PYTHON_FINGERPRINT_SHIFT = 48
_ADDRESS_MASK = (1 << PYTHON_FINGERPRINT_SHIFT) - 1


def code_key(address: int, fingerprint: int) -> int:
    """The key of the code object at `address` whose fingerprint is `fingerprint`."""
    return fingerprint << PYTHON_FINGERPRINT_SHIFT | address


def split_code_key(key: int) -> tuple[int, int]:
    """(address, fingerprint) of a code key."""
    return key & _ADDRESS_MASK, key >> PYTHON_FINGERPRINT_SHIFT


@dataclass(frozen=True, slots=True)
class InterpreterStack:
    """One event's Python frames as the BPF walker sent them, leaf first: two words per frame,
    (code key | PYTHON_FRAME_* flags, raw instruction: f_lasti on 3.10, else the frame's instruction
    pointer); a code key is the code object's address with its fingerprint in the top bits. Naming
    them is the symbolize stage's job, with the code objects the process stage read while the process
    was alive."""

    status: InterpreterStatus
    frames: tuple[int, ...] = ()
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.status, self.frames)))

    def __hash__(self) -> int:
        return self._hash


NO_INTERPRETER_STACK = InterpreterStack(InterpreterStatus.NONE)


@dataclass(frozen=True, slots=True)
class ValueType:
    """A pprof/OTLP (type, unit) pair such as ("cpu", "nanoseconds")."""

    type: str
    unit: str


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    """What one profiler's samples mean: names the values and the sampling period."""

    name: str  # "cpu", "alloc", "offcpu": also the file prefix
    sample_types: tuple[ValueType, ...]
    period_type: ValueType
    period: int


@dataclass(frozen=True, slots=True)
class ImageLayout:
    """Where a process image's randomized regions lie and which executable it runs, read by BPF as the
    process was announced (bpf/common.h, struct proc_event). `exe_dev` is the kernel's dev_t encoding
    (major << 20 | minor), compared only with other announcements'."""

    exe_dev: int
    exe_ino: int
    start_code: int  # the executable's text: it moves with the executable's load base
    mmap_base: int  # the top of the mmap region: the dynamic loader and the shared libraries move with it
    vdso: int
    comm: str
