"""Process stage: HotSpot interpreter frames, as a frame-pointer chain in a thread's stack.

An interpreted Java method runs in the template interpreter's code (one region, `AbstractInterpreter::
_code`) with rbp as its frame pointer, and keeps its state at fixed words below it (frame_x86.hpp):
the Method* three words down and the bytecode pointer eight words down, just under the two words
vmStructs does export (`frame::interpreter_frame_sender_sp_offset` -1 and `..._last_sp_offset` -2).
The caller's rbp and return address sit at rbp and rbp + 8, as in any frame-pointer frame.

This module owns `InterpreterFrames`: the interpreter's code range and those offsets for one JVM, and
`walk`, which follows the chain from a (fp, pc) through the interpreter frames, reading words through
a callback (live memory here; a stack copy for the profiler's samples). It also owns `java_threads`,
the JVM's thread list with each thread's last Java frame (set while the thread is in native or VM
code, as a sleeping or blocked one is), which the live tests and the validation walk start from.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from agent.process.jvm.methods import MethodReadError
from agent.process.jvm.vmstructs import VmStructs
from agent.process.memory import MemoryReader, MemoryReadError

WORD = 8
MAX_FRAMES = 1024
MAX_THREADS = 100_000
_U64 = struct.Struct("<Q")
_I32 = struct.Struct("<i")

ReadWord = Callable[[int], int]  # an address's word, or a MemoryReadError / MethodReadError


@dataclass(frozen=True, slots=True)
class InterpretedFrame:
    fp: int
    pc: int
    method: int  # Method*
    bcp: int  # bytecode pointer: the ConstMethod's code base plus the bci


@dataclass(frozen=True, slots=True)
class InterpreterFrames:
    code_start: int
    code_end: int
    method_offset: int  # bytes from fp to the Method* (negative)
    bcp_offset: int  # bytes from fp to the bytecode pointer (negative)

    @classmethod
    def of(cls, memory: MemoryReader, tables: VmStructs) -> InterpreterFrames:
        """The interpreter's code range (read from the JVM) and frame offsets; MethodReadError when
        this JVM does not describe them."""
        try:
            queue = _word(memory, tables.static_address("AbstractInterpreter", "_code"))
            buffer = _word(memory, queue + tables.offset("StubQueue", "_stub_buffer"))
            limit = _I32.unpack(_read(memory, queue + tables.offset("StubQueue", "_buffer_limit"), 4))[0]
            last_sp = tables.int_constants["frame::interpreter_frame_last_sp_offset"]
        except KeyError as e:
            raise MethodReadError(f"this JVM's vmStructs lack {e.args[0]}") from None
        if not buffer or limit <= 0:
            raise MethodReadError("the interpreter's code is not generated yet")
        # method = last_sp - 1 and bcp = last_sp - 6 words: mirror, mdp, cache and locals lie between.
        return cls(buffer, buffer + limit, (last_sp - 1) * WORD, (last_sp - 6) * WORD)

    def holds(self, pc: int) -> bool:
        return self.code_start <= pc < self.code_end

    def walk(self, fp: int, pc: int, read_word: ReadWord) -> Iterator[InterpretedFrame]:
        """The interpreter frames from (fp, pc) outwards, while the pc is the interpreter's; stops at
        the first frame that is not (compiled code, a call stub), or at a chain that does not grow."""
        for _ in range(MAX_FRAMES):
            if not fp or not self.holds(pc):
                return
            yield InterpretedFrame(fp, pc, read_word(fp + self.method_offset), read_word(fp + self.bcp_offset))
            caller_fp, pc = read_word(fp), read_word(fp + WORD)
            if caller_fp <= fp:  # stacks grow down: a caller's frame is above its callee's
                return
            fp = caller_fp


@dataclass(frozen=True, slots=True)
class JavaThreadState:
    thread: int  # JavaThread*
    tid: int  # the OS thread id
    last_java_sp: int
    last_java_fp: int
    last_java_pc: int


def java_threads(memory: MemoryReader, tables: VmStructs) -> list[JavaThreadState]:
    """The JVM's Java threads (ThreadsSMRSupport's current list), each with its frame anchor."""
    try:
        listing = _word(memory, tables.static_address("ThreadsSMRSupport", "_java_thread_list"))
        count = _I32.unpack(_read(memory, listing + tables.offset("ThreadsList", "_length"), 4))[0]
        array = _word(memory, listing + tables.offset("ThreadsList", "_threads"))
        anchor = tables.offset("JavaThread", "_anchor")
        # JDK 21 moved _osthread from JavaThread up to Thread.
        osthread = (
            tables.offset("JavaThread", "_osthread")
            if ("JavaThread", "_osthread") in tables.fields
            else tables.offset("Thread", "_osthread")
        )
        thread_id = tables.offset("OSThread", "_thread_id")
        sp, fp, pc = (tables.offset("JavaFrameAnchor", f) for f in ("_last_Java_sp", "_last_Java_fp", "_last_Java_pc"))
    except KeyError as e:
        raise MethodReadError(f"this JVM's vmStructs lack {e.args[0]}") from None
    if not 0 <= count <= MAX_THREADS:
        raise MethodReadError(f"a thread list of {count}")
    raw = _read(memory, array, WORD * count) if count else b""
    threads = []
    for i in range(count):
        thread = _U64.unpack_from(raw, WORD * i)[0]
        os_thread = _word(memory, thread + osthread)
        tid = _I32.unpack(_read(memory, os_thread + thread_id, 4))[0] if os_thread else 0
        last_sp, last_fp, last_pc = (_word(memory, thread + anchor + offset) for offset in (sp, fp, pc))
        if last_sp and not last_pc:  # HotSpot leaves the pc out when it is the word just below the sp
            last_pc = _word(memory, last_sp - WORD)
        threads.append(JavaThreadState(thread, tid, last_sp, last_fp, last_pc))
    return threads


def memory_words(memory: MemoryReader) -> ReadWord:
    """A ReadWord over live memory."""
    return lambda address: _word(memory, address)


def _word(memory: MemoryReader, address: int) -> int:
    value: int = _U64.unpack(_read(memory, address, WORD))[0]
    return value


def _read(memory: MemoryReader, address: int, size: int) -> bytes:
    try:
        return memory.read(address, size)
    except MemoryReadError as e:
        raise MethodReadError(str(e)) from None
