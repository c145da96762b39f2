"""Symbolize stage: a JVM's interpreted Java frames, in place of the template interpreter's native frames.

The unwind stage left, in a JVM's user stack, the Method* and bytecode pointer of each frame that ran
in HotSpot's interpreter (`Stack.java`). This module owns `JavaMerger`, which replaces each such native
frame (an unnamed address in the interpreter's anonymous code) with a `FrameKind.JVM` frame: the
function is `Class.method`, and the frame's source says the method's descriptor, source file, first line
and the line of the bytecode index. Methods are read through the process's `MethodReader` (the JVM flow
hands it over while the JVM lives) and kept by (pid, Method*, bytecode pointer) in a bounded memo, so
samples of a JVM that has exited since are still named from it. A method that cannot be read keeps its
native frame, and is counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from agent.process.cache import LruCache
from agent.process.jvm.methods import MethodReader, MethodReadError
from agent.symbolize.types import Frame, FrameKind, PythonSource
from agent.types import Stack

MEMO_SIZE = 65_536

ReaderOf = Callable[[int], MethodReader | None]


class JavaMerger:
    """Names interpreted Java frames; used from the report thread only."""

    def __init__(self, readers: ReaderOf | None) -> None:
        self._readers = readers
        self._memo: LruCache[tuple[int, int, int], Frame | None] = LruCache(MEMO_SIZE)
        self.named = 0  # frames named
        self.unnamed: Counter[str] = Counter()  # frames left native, by why: no_reader, unreadable

    def merge(self, pid: int, stack: Stack, frames: tuple[Frame, ...]) -> tuple[Frame, ...]:
        """`frames` (the user frames of `stack`, leaf first) with its interpreted frames named."""
        java = stack.java
        if not java:
            return frames
        merged = list(frames)
        reader = self._readers(pid) if self._readers is not None else None
        for i in range(0, len(java) - 2, 3):
            index, method, bcp = java[i], java[i + 1], java[i + 2]
            if index >= len(merged):
                continue
            frame = self._frame(pid, reader, method, bcp, merged[index])
            if frame is not None:
                merged[index] = frame
        return tuple(merged)

    def _frame(self, pid: int, reader: MethodReader | None, method: int, bcp: int, native: Frame) -> Frame | None:
        key = (pid, method, bcp)
        cached = self._memo.get(key)
        if cached is not None:
            self.named += 1
            return cached._replace(mapping=native.mapping)
        if reader is None:
            self.unnamed["no_reader"] += 1
            return None
        try:
            read = reader.method(method)
            bci = reader.bci(method, bcp)
        except MethodReadError:
            self.unnamed["unreadable"] += 1
            return None
        first_line = min((line for _, line in read.lines), default=0)
        line = read.line_at(bci) if bci >= 0 else 0
        source = PythonSource(read.name + read.signature, read.source_file, first_line, line)
        frame = Frame(FrameKind.JVM, 0, read.qualified, native.mapping, source)
        self._memo.put(key, frame)
        self.named += 1
        return frame
