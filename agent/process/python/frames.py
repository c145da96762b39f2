"""Process stage: the validation walk, a user-space walk of one thread's frame chain with a layout.

This module owns `walk_frames` (what the BPF walker will follow, read from outside the process: 3.10's
`tstate->frame`/`f_back`, 3.11/3.12's `tstate->cframe->current_frame`/`previous`, 3.13+'s
`tstate->current_frame`/`previous`, with C-stack shim frames (`owner == FRAME_OWNED_BY_CSTACK`, 3.12+)
marked) and `validate_frames`, which checks each non-shim frame's code object with a `CodeCheck`
(the inspector's: `ob_type == &PyCode_Type` and readable, sane names). It raises `ThreadsError`.

The process runs while it is read: a frame may be popped, and its memory reused, between reading the
pointer to it and reading it (a code object of 0, another frame's `previous`, a cycle). Such a torn walk
of one thread is walked again, up to `WALKS_PER_THREAD` times: garbage fails every walk the same way,
a live thread gives a consistent walk on the next try.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

from agent.process.python.layouts import NO_FIELD, PythonLayout
from agent.process.python.threads import MemoryReader, ThreadsError, ThreadState, read_bytes, read_u64

MAX_VALIDATION_FRAMES = 256  # deeper chains are checked this far (a cycle is caught sooner)
WALKS_PER_THREAD = 3  # a thread's walk that failed is walked again this many times in all
_CODE_TAG_BITS = 7  # 3.14+'s _PyStackRef tag bits

# The code object's address -> None when it is a code object with sane names, else why it is not.
CodeCheck = Callable[[int], str | None]


class FrameRef(NamedTuple):
    address: int
    code: int  # 0 for a shim frame
    shim: bool


def first_frame(memory: MemoryReader, layout: PythonLayout, tstate: int) -> int:
    """The thread's innermost frame's address (0: none), as the BPF walker finds it."""
    if layout.tstate_frame == NO_FIELD:
        raise ThreadsError("no_layout", "tstate_frame unknown")
    pointer = read_u64(memory, tstate + layout.tstate_frame)
    if layout.cframe_current_frame != NO_FIELD and pointer:  # 3.11/3.12: through _PyCFrame
        pointer = read_u64(memory, pointer + layout.cframe_current_frame)
    return pointer


def walk_frames(
    memory: MemoryReader, layout: PythonLayout, tstate: int, limit: int = MAX_VALIDATION_FRAMES
) -> list[FrameRef]:
    """The thread's frames, innermost first, at most `limit` of them."""
    for name in ("frame_previous", "frame_code"):
        if getattr(layout, name) == NO_FIELD:
            raise ThreadsError("no_layout", f"{name} unknown")
    frames: list[FrameRef] = []
    seen: set[int] = set()
    frame = first_frame(memory, layout, tstate)
    while frame and len(frames) < limit:
        if frame in seen:
            raise ThreadsError("frame_cycle", f"frame {frame:#x} seen twice")
        seen.add(frame)
        shim = False
        if layout.frame_owner != NO_FIELD:
            owner = read_bytes(memory, frame + layout.frame_owner, 1)[0]
            shim = owner == layout.owner_cstack
        code = 0 if shim else read_u64(memory, frame + layout.frame_code)
        if layout.code_tagged:
            code &= ~_CODE_TAG_BITS
        frames.append(FrameRef(frame, code, shim))
        frame = read_u64(memory, frame + layout.frame_previous)
    return frames


def validate_frames(
    memory: MemoryReader, layout: PythonLayout, threads: Iterable[ThreadState], check: CodeCheck, max_threads: int
) -> int:
    """Walk up to `max_threads` threads' frames and check every code object; the number checked (0 when
    every thread is idle: no Python frames). Raises ThreadsError("bad_code_object", ...) on the first
    frame whose code object fails, or the walk's own error."""
    checked = 0
    for thread in list(threads)[:max_threads]:
        for attempt in range(WALKS_PER_THREAD):
            try:
                checked += _validate_thread(memory, layout, thread, check)
                break
            except ThreadsError as e:
                if e.reason == "read_failed" or attempt == WALKS_PER_THREAD - 1:
                    raise  # gone, or failed on every walk: not a torn read
    return checked


def _validate_thread(memory: MemoryReader, layout: PythonLayout, thread: ThreadState, check: CodeCheck) -> int:
    checked = 0
    for frame in walk_frames(memory, layout, thread.address):
        if frame.shim:
            continue
        problem = check(frame.code)
        if problem is not None:
            detail = f"frame {frame.address:#x} of thread state {thread.address:#x}: code {frame.code:#x}: {problem}"
            raise ThreadsError("bad_code_object", detail)
        checked += 1
    return checked
